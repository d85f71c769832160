"""Serving throughput and latency: dynamic batching against batching off and a plain FastAPI app, same run.

    python benchmarks/serve_load.py [--requests 300] [--clients 1 8 32] [--max-batch-size 16]

Closed-loop clients (each sends its next request when the last one answered) post single
Fashion-MNIST test images to ``/v1/classify`` on 127.0.0.1. Three servers of the same
checkpoint (the default config's ResNet-10-T, randomly initialised: weights do not change
the cost; ``--set model.backbone=resnet18`` etc. for a heavier model) are measured in turn:

- the Serve app with ``@serve.batch`` (``--max-batch-size``, 10 ms wait);
- the same app with batching off (``max_batch_size: 1``);
- a plain single-process FastAPI + uvicorn app calling the same inferencer per request.

Every level sends ``--requests`` requests (bounded in count; a request that takes over
``--timeout`` seconds counts as an error). Prints requests/s, p50/p99 latency and errors per
level, then the ratios the targets name: batched / batching-off requests/s at the largest
client count (target >= 2), batched p99 at that count / batching-off p99 at 1 client
(target <= 2), zero errors.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pretrainlab  # noqa: F401  # isort: skip  # first: it keeps a local Ray on 127.0.0.1
import httpx
import ray
import torch
from fastapi import FastAPI, UploadFile  # module level: FastAPI resolves the route's annotations here
from PIL import Image
from ray import serve

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrainlab.checkpoint import checkpoint_meta, save_checkpoint  # noqa: E402
from pretrainlab.config import load_config  # noqa: E402
from pretrainlab.data.catalog import dataset_dir, dataset_info  # noqa: E402
from pretrainlab.data.dataset import load_split_numpy  # noqa: E402
from pretrainlab.strategies import get_strategy  # noqa: E402
from serve.app import build_app  # noqa: E402
from serve.schemas import ServeArgs  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "resnet10t_1xb128_fmnist.yaml"


def make_checkpoint(out: Path, overrides: list[str]) -> tuple[Path, list[bytes]]:
    """A checkpoint of the default config's model (with ``overrides``) and 64 test images as PNG bytes."""
    cfg = load_config(CONFIG, overrides)
    folder = dataset_dir(cfg)
    info = dataset_info(folder)
    torch.manual_seed(0)
    model = get_strategy(cfg.strategy).build_model(cfg, info["num_classes"], info["in_chans"])
    images, _ = load_split_numpy(folder, "test")
    pngs = []
    for image in images[:64]:
        buffer = io.BytesIO()
        Image.fromarray(image[0]).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return save_checkpoint(out, model.state_dict(), checkpoint_meta(cfg, info, 0, 0, {}, None)), pngs


async def closed_loop(url: str, images: list[bytes], clients: int, requests: int, timeout: float) -> dict:
    """``clients`` concurrent loops sharing ``requests`` requests; latencies in seconds and the error count."""
    latencies: list[float] = []
    errors = 0
    remaining = iter(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in remaining:
            start = time.perf_counter()
            try:
                files = {"file": ("x.png", images[i % len(images)], "image/png")}
                response = await http.post(url, files=files, timeout=timeout)
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - start)
            errors += not ok

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    ordered = sorted(latencies)
    return {
        "rps": len(latencies) / elapsed,
        "p50": statistics.median(ordered),
        "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "errors": errors,
    }


def measure(name: str, url: str, images: list[bytes], args: argparse.Namespace) -> dict[int, dict]:
    asyncio.run(closed_loop(url, images, 4, 40, args.timeout))  # warm-up
    results = {}
    for clients in args.clients:
        results[clients] = asyncio.run(closed_loop(url, images, clients, args.requests, args.timeout))
        r = results[clients]
        print(
            f"{name:<22} {clients:>3} clients: {r['rps']:7.1f} req/s  p50 {1000 * r['p50']:7.1f} ms  "
            f"p99 {1000 * r['p99']:7.1f} ms  errors {r['errors']}",
            flush=True,
        )
    return results


def serve_app(checkpoint: Path, max_batch_size: int, port: int) -> str:
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = ServeArgs(
        models={"fmnist": str(checkpoint)},
        max_batch_size=max_batch_size,
        batch_wait_timeout_s=0.01,
        max_ongoing_requests=64,
        max_queued_requests=-1,
        torch_threads=1,
    )
    serve.run(build_app(args), name="bench", route_prefix="/")
    return f"http://127.0.0.1:{port}/v1/classify"


def plain_fastapi(checkpoint: str, port: int) -> None:
    """A single-process FastAPI + uvicorn app classifying one uploaded image per request."""
    import uvicorn

    from pretrainlab import ImageClassificationInferencer, get_model

    torch.set_num_threads(1)
    inferencer = ImageClassificationInferencer(get_model(checkpoint))
    app = FastAPI()

    @app.post("/v1/classify")
    async def classify(file: UploadFile) -> dict:
        result = inferencer(await file.read())[0]
        return {"pred_label": result["pred_label"], "pred_score": result["pred_score"]}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def wait_until_up(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url.rsplit("/v1/", 1)[0] + "/docs", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not come up in {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per client level")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the model config")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="pretrainlab-serve-bench-"))
    checkpoint, images = make_checkpoint(work / "checkpoint", args.set)

    ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False)
    results = {}
    for name, batch in (("batched", args.max_batch_size), ("batching off", 1)):
        url = serve_app(checkpoint, batch, args.port)
        results[name] = measure(f"Serve, {name}", url, images, args)
        serve.shutdown()
    ray.shutdown()

    plain_port = args.port + 1  # Serve's proxy may still hold its port for a moment after shutdown
    process = multiprocessing.get_context("spawn").Process(target=plain_fastapi, args=(str(checkpoint), plain_port))
    process.start()
    try:
        url = f"http://127.0.0.1:{plain_port}/v1/classify"
        wait_until_up(url)
        results["plain"] = measure("FastAPI + uvicorn", url, images, args)
    finally:
        process.terminate()
        process.join(10)

    most, one = max(args.clients), min(args.clients)
    batched, unbatched, plain = results["batched"], results["batching off"], results["plain"]
    errors = sum(r["errors"] for level in results.values() for r in level.values())
    speedup = batched[most]["rps"] / unbatched[most]["rps"]
    print(f"\nat {most} clients: batched / batching off = {speedup:.2f}x req/s (target >= 2)")
    print(f"                 batched / plain FastAPI = {batched[most]['rps'] / plain[most]['rps']:.2f}x req/s")
    print(
        f"batched p99 at {most} clients / batching-off p99 at {one} client = "
        f"{batched[most]['p99'] / unbatched[one]['p99']:.2f} (target <= 2)"
    )
    low_load = batched[one]["p99"] / unbatched[one]["p99"]
    print(f"batched p99 at {one} client / batching-off p99 at {one} client = {low_load:.2f}")
    print(f"errors: {errors} (target 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
