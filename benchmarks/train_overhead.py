"""Ray Train loop overhead against a plain PyTorch loop, and the distance to the machine's fp32 peak.

    python benchmarks/train_overhead.py [--config configs/resnet10t_1xb128_fmnist.yaml] [--steps 60] [--rounds 2]

Same model, data, batch size, augmentation and thread count on both sides; the two are
run alternately in one process so that load from elsewhere hits both alike. Prints:

- images/s of the Ray Train loop (1 worker, torch threads = the CPUs it holds) over the
  plain loop: target >= 0.90 on CPU;
- 2 workers x 1 thread against 1 worker x 2 threads (same global batch);
- model FLOPs/s of the Ray loop as a fraction of a large fp32 ``torch.mm``'s FLOPs/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from pretrainlab.cluster import init_ray
from pretrainlab.config import ExperimentConfig, load_config
from pretrainlab.data.catalog import dataset_dir, dataset_info
from pretrainlab.data.dataset import load_split_numpy
from pretrainlab.data.shards import load_manifest, raw_classification_table, write_dataset
from pretrainlab.data.transforms import normalize, train_views
from pretrainlab.strategies import get_strategy
from pretrainlab.tracking.mlflow import client_for, start_or_resume_run
from pretrainlab.train.optim import build_optimizer
from pretrainlab.train.trainer import build_trainer

WINDOW = 10  # steps per throughput window; the first window of each run is warm-up


def subset(folder: str, out: Path, train_rows: int, val_rows: int) -> str:
    """A copy of the first rows of a prepared dataset, so that one epoch is a fixed number of steps."""
    splits = {}
    for split, rows in (("train", train_rows), ("val", val_rows)):
        images, labels = load_split_numpy(folder, split)
        chosen = images[:rows].transpose(0, 2, 3, 1)
        splits[split] = raw_classification_table(
            chosen, labels[:rows], split=split, source_ids=[f"{split}:{i}" for i in range(len(chosen))]
        )
    manifest = load_manifest(folder)
    write_dataset(out, splits, name="bench", task="classification", class_names=manifest["class_names"])
    return str(out)


def plain_loop(cfg: ExperimentConfig, images: np.ndarray, labels: np.ndarray, steps: int, info: dict) -> float:
    """images/s of a single-process loop over in-memory tensors, after one warm-up window."""
    torch.set_num_threads(cfg.train.cpus_per_worker * cfg.train.num_workers)
    torch.manual_seed(cfg.runtime.seed)
    model = get_strategy(cfg.strategy).build_model(cfg, info["num_classes"], info["in_chans"]).train()
    optimizer = build_optimizer(model, cfg.optim, cfg.optim.lr)
    (pipeline,) = train_views(cfg.data)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    batch = cfg.train.batch_size * cfg.train.num_workers
    order = torch.randperm(len(x))
    for step in range(steps):
        if step == WINDOW:
            start = time.perf_counter()
        idx = order[(step * batch) % (len(x) - batch) :][:batch]
        loss = model({"image": normalize(pipeline(x[idx]), cfg.data), "label": y[idx]})["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (steps - WINDOW) * batch / (time.perf_counter() - start)


def ray_loop(cfg: ExperimentConfig, folder: str, tracking_uri: str, name: str) -> float:
    """images/s of the Ray Train loop, read back from the throughput it logs, first window dropped."""
    client = client_for(tracking_uri)
    run_id, _ = start_or_resume_run(client, "benchmark", name, {})
    build_trainer(cfg, name, folder, {"uri": tracking_uri, "run_id": run_id}).fit()
    history = client.get_metric_history(run_id, "train/throughput")
    return statistics.median(m.value for m in history[1:])


def train_flops_per_image(cfg: ExperimentConfig, info: dict, shape: tuple[int, ...]) -> float:
    """Forward + backward FLOPs of one training image, counted by torch."""
    model = get_strategy(cfg.strategy).build_model(cfg, info["num_classes"], info["in_chans"]).train()
    batch = {"image": torch.randn(8, *shape), "label": torch.zeros(8, dtype=torch.long)}
    with FlopCounterMode(display=False) as counter:
        model(batch)["loss"].backward()
    return counter.get_total_flops() / 8


def matmul_peak(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """fp32 FLOPs/s of a large ``torch.mm`` with ``threads`` threads (best of ``repeats``)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def with_train(cfg: ExperimentConfig, **updates) -> ExperimentConfig:
    """``cfg`` with some ``train`` keys replaced."""
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=updates)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/resnet10t_1xb128_fmnist.yaml")
    parser.add_argument("--steps", type=int, default=60, help="training steps per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of each measurement")
    args = parser.parse_args(argv)

    base = load_config(args.config, ["train.epochs=1", f"train.log_every_n_steps={WINDOW}", "train.max_failures=0"])
    cpus = base.train.cpus_per_worker * base.train.num_workers
    half = max(1, cpus // 2)
    one_worker = with_train(base, num_workers=1, cpus_per_worker=cpus)
    two_workers = with_train(base, num_workers=2, cpus_per_worker=half, batch_size=base.train.batch_size // 2)
    work = Path(tempfile.mkdtemp(prefix="pretrainlab-bench-"))
    source = dataset_dir(base)
    os.environ["PRETRAINLAB_HOME"] = str(work)
    tracking_uri = f"sqlite:///{work}/mlflow.db"
    folder = subset(source, work / "subset", args.steps * base.train.batch_size, 512)
    info = dataset_info(folder)
    images, labels = load_split_numpy(folder, "train")

    init_ray(num_cpus=cpus)
    plain, ray_1x, ray_2x = [], [], []
    for round_ in range(args.rounds):
        plain.append(plain_loop(one_worker, images, labels, args.steps, info))
        ray_1x.append(ray_loop(one_worker, folder, tracking_uri, f"ray-1x{cpus}-{round_}"))
        ray_2x.append(ray_loop(two_workers, folder, tracking_uri, f"ray-2x{half}-{round_}"))
        print(
            f"round {round_} img/s: plain {plain[-1]:.0f}, ray 1x{cpus} {ray_1x[-1]:.0f}, ray 2x{half} {ray_2x[-1]:.0f}"
        )

    flops = train_flops_per_image(one_worker, info, images.shape[1:])
    peak = matmul_peak(cpus)
    plain_m, ray_1x_m, ray_2x_m = (statistics.median(v) for v in (plain, ray_1x, ray_2x))
    shape = tuple(images.shape[1:])
    print(f"\n{base.model.backbone}, global batch {base.train.batch_size}, input {shape}, {cpus} CPU threads in all")
    print(f"plain PyTorch loop            {plain_m:7.1f} img/s")
    print(
        f"Ray Train 1 worker x {cpus} threads {ray_1x_m:7.1f} img/s  ratio to plain {ray_1x_m / plain_m:.3f} (>= 0.90)"
    )
    print(f"Ray Train 2 workers x {half} thread {ray_2x_m:7.1f} img/s  ratio to 1 worker {ray_2x_m / ray_1x_m:.3f}")
    print(f"training FLOPs/image {flops / 1e6:.1f} M: the Ray loop runs {ray_1x_m * flops / 1e9:.1f} GFLOP/s")
    print(f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s: the Ray loop reaches {ray_1x_m * flops / peak:.1%} of it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
