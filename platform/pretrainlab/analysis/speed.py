"""Inference speed of a model: images per second of its forward pass at several batch sizes.

    python -m pretrainlab.analysis.speed resnet50 [--batch-sizes 1 8 32] [--input-size 224] [--iters 10]
    python -m pretrainlab.analysis.speed configs/resnet10t_1xb128_fmnist.yaml --threads 2 --out speed.md

The model (a timm name with its classifier head, or a config's backbone + head, built as
``flops`` builds it, randomly initialised) runs in eval mode under ``torch.inference_mode``
on random images: ``--warmup`` untimed passes, then ``--iters`` timed passes per batch
size. On a GPU every pass is synchronised before the clock is read.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from pretrainlab.analysis.flops import ModelSpecError, add_model_arguments, builder_from, markdown
from pretrainlab.analysis.outputs import add_output_arguments, publish, write_csv
from pretrainlab.config import ConfigError
from pretrainlab.data.errors import DatasetError

COLUMNS = ["batch_size", "images_per_s", "ms_per_batch_median", "ms_per_batch_min", "iters", "device", "threads"]


def pick_device(name: str) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelSpecError("--device cuda: no GPU is available here")
    return torch.device(name)


def measure(built, device: torch.device, batch_sizes: list[int], warmup: int, iters: int) -> list[dict]:
    """Time ``built.forward`` at each batch size; one row per batch size."""
    model = built.model.to(device).eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for batch_size in batch_sizes:
        images = torch.randn((batch_size, *built.input_shape), device=device)
        times = []
        with torch.inference_mode():
            for i in range(warmup + iters):
                sync()
                start = time.perf_counter()
                built.forward(model, images)
                sync()
                if i >= warmup:
                    times.append(time.perf_counter() - start)
        rows.append(
            {
                "batch_size": batch_size,
                "images_per_s": round(batch_size * len(times) / sum(times), 2),
                "ms_per_batch_median": round(1000 * statistics.median(times), 3),
                "ms_per_batch_min": round(1000 * min(times), 3),
                "iters": iters,
                "device": str(device),
                "threads": torch.get_num_threads(),
            }
        )
        print(f"batch {batch_size:>4}: {rows[-1]['images_per_s']:>10.1f} images/s", flush=True)
    return rows


def write(rows: list[dict], out: Path, description: str) -> None:
    """CSV for ``*.csv``, else markdown with the model's description."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        write_csv(rows, COLUMNS, out)
    else:
        out.write_text(f"- model: {description}\n\n{markdown(rows)}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], metavar="N")
    parser.add_argument("--warmup", type=int, default=3, help="untimed passes per batch size (default: 3)")
    parser.add_argument("--iters", type=int, default=10, help="timed passes per batch size (default: 10)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto, the GPU if any)")
    add_output_arguments(parser, "speed.csv")
    args = parser.parse_args(argv)
    try:
        if min(args.batch_sizes) < 1 or args.iters < 1 or args.warmup < 0:
            raise ModelSpecError("--batch-sizes and --iters must be >= 1, --warmup >= 0")
        if args.threads is not None:
            if args.threads < 1:
                raise ModelSpecError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        device = pick_device(args.device)
        built = builder_from(args)("cpu")
    except (ModelSpecError, ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # an unknown --device string
        print(f"error: {err}", file=sys.stderr)
        return 2
    shape = "x".join(map(str, built.input_shape))
    print(f"model: {built.description}; images {shape}; {device}, {torch.get_num_threads()} CPU threads")
    try:
        rows = measure(built, device, args.batch_sizes, args.warmup, args.iters)
    except torch.cuda.OutOfMemoryError as err:
        print(f"error: out of GPU memory: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # the model's own forward failed for this input
        print(f"error: forward of {args.model} failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    print(markdown(rows))
    write(rows, Path(args.out), built.description)
    publish(args.out, args, "speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
