"""GPU training throughput: PretrainLab's Ray Train loop against a plain PyTorch loop, and model-FLOPs utilisation.

    python benchmarks/gpu_train.py [--cases resnet50,vit_b16,mae_vit_b16] [--steps 30]   # one GPU
    python benchmarks/gpu_train.py --device cpu --tiny --plain-only --steps 3            # a CPU check, no Ray

``benchmarks/gpu_train.sh`` runs it with the settings of benchmarks/README.md. For each case,
at 224 px on synthetic images: the plain loop is timm ``benchmark.py``'s training loop (one
fixed batch already on the GPU, bf16 autocast, channels_last for CNNs, forward, backward,
optimizer step, synchronised timing); the Ray figure is the median of the ``train/throughput``
windows that :func:`pretrainlab.train.loop.train_loop_per_worker` logs (1 worker, 1 GPU, first
window dropped), reading the same synthetic images from Parquet shards through Ray Data, so it
includes decoding and host-to-device copies the plain loop never does. Same model, batch,
optimizer and precision on both sides. Model-FLOPs utilisation: forward + backward FLOPs of one
training image (``torch.utils.flop_counter``) x images/s, over the GPU's dense bf16 peak (the
datasheet figure where the GPU is known, and a large bf16 ``torch.mm`` measured here).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from pretrainlab.config import ExperimentConfig
from pretrainlab.data.masks import make_masks
from pretrainlab.data.shards import raw_classification_table, write_dataset
from pretrainlab.data.transforms import normalize
from pretrainlab.models.backbones import uses_convolutions
from pretrainlab.strategies import get_strategy
from pretrainlab.train.optim import build_optimizer
from pretrainlab.train.steps import autocast_for

WINDOW = 10  # optimizer steps per throughput window; the first window of each run is warm-up
NUM_CLASSES = 1000
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s), matched on torch's device name.
DATASHEET_BF16_PEAK = {
    "H200": 989e12,
    "H100 80GB HBM3": 989e12,  # SXM
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
}


@dataclass(frozen=True)
class Case:
    """One model to measure: a strategy, a timm backbone and the per-step batch."""

    strategy: str
    backbone: str
    batch_size: int
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    strategy_params: dict[str, Any] = field(default_factory=dict)
    mask: dict[str, Any] | None = None


CASES = {
    "resnet50": Case("supervised", "resnet50", 128),
    "vit_b16": Case("supervised", "vit_base_patch16_224", 128),
    "mae_vit_b16": Case(
        "mae",
        "vit_base_patch16_224",
        256,
        strategy_params={"decoder_dim": 512, "decoder_depth": 8, "decoder_heads": 16},
        mask={"kind": "random", "ratio": 0.75, "patch_size": 16},
    ),
}
# The same three at 32 px and a few layers, for checking the script on a CPU.
TINY_CASES = {
    "resnet50": Case("supervised", "resnet10t", 8),
    "vit_b16": Case("supervised", "vit_tiny_patch16_224", 8, {"img_size": 32, "patch_size": 8, "depth": 2}),
    "mae_vit_b16": Case(
        "mae",
        "vit_tiny_patch16_224",
        8,
        {"img_size": 32, "patch_size": 8, "depth": 2},
        {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 4},
        {"kind": "random", "ratio": 0.75, "patch_size": 8},
    ),
}


def experiment(name: str, case: Case, args: argparse.Namespace, data_folder: str, work: Path) -> ExperimentConfig:
    """The experiment config both loops train: AdamW, constant lr, one epoch of ``args.steps`` steps."""
    data: dict[str, Any] = {"dataset": data_folder, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    if case.mask is not None:
        data["mask"] = case.mask
    score = "val/top1" if case.strategy == "supervised" else "val/knn_top1"
    return ExperimentConfig.model_validate(
        {
            "name": f"gpu-bench-{name}",
            "strategy": case.strategy,
            "strategy_params": case.strategy_params,
            "model": {"backbone": case.backbone, "backbone_kwargs": case.backbone_kwargs},
            "data": data,
            "optim": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.05},
            "schedule": {"name": "constant"},
            "train": {
                "epochs": 1,
                "batch_size": case.batch_size,
                "num_workers": 1,
                "cpus_per_worker": args.cpus,
                "use_gpu": args.device == "cuda",
                "max_failures": 0,
                "log_every_n_steps": WINDOW,
                "eval_batch_size": case.batch_size,
                "storage_path": str(work / "runs"),
                "checkpoint": {"num_to_keep": 1, "score_metric": score},
            },
            "runtime": {"tracking_uri": f"sqlite:///{work}/mlflow.db", "experiment": "gpu-bench"},
        }
    )


def synthetic_dataset(out: Path, train_rows: int, val_rows: int, size: int, seed: int = 0) -> str:
    """Random RGB ``size`` x ``size`` images with random labels, written as a prepared classification dataset.

    The rows repeat a pool of 32 random images, so that zstd writes the shards quickly; reading and
    decoding them costs the same as for distinct images.
    """
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 256, size=(32, size, size, 3), dtype=np.uint8)
    splits = {}
    for split, rows in (("train", train_rows), ("val", val_rows)):
        images = pool[np.arange(rows) % len(pool)]
        labels = rng.integers(0, NUM_CLASSES, size=rows)
        ids = [f"synthetic:{split}:{i}" for i in range(rows)]
        splits[split] = raw_classification_table(images, labels, split=split, source_ids=ids)
    names = [f"class{i}" for i in range(NUM_CLASSES)]
    write_dataset(out, splits, name="synthetic", task="classification", class_names=names)
    return str(out)


def fixed_batch(cfg: ExperimentConfig, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One training batch on ``device``, as timm's benchmark makes it: random images (and MAE masks)."""
    n = cfg.train.batch_size
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=device)
    batch = {"image": normalize(images, cfg.data), "label": torch.randint(0, NUM_CLASSES, (n,), device=device)}
    if cfg.data.mask is not None:
        masks = make_masks(cfg.data.mask, n, size, size, np.random.default_rng(0))
        batch["mask"] = torch.from_numpy(masks).to(device)
    return batch


def build(cfg: ExperimentConfig, device: torch.device) -> tuple[torch.nn.Module, bool]:
    """The strategy's model on ``device``, in channels_last when its backbone is a CNN."""
    model = get_strategy(cfg.strategy).build_model(cfg, NUM_CLASSES, 3).to(device).train()
    channels_last = device.type == "cuda" and uses_convolutions(model.backbone)
    return (model.to(memory_format=torch.channels_last) if channels_last else model), channels_last


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(cfg: ExperimentConfig, size: int, steps: int, warmup: int, device: torch.device) -> float:
    """images/s of timm ``benchmark.py``'s training loop over one fixed batch, after ``warmup`` steps."""
    torch.manual_seed(cfg.runtime.seed)
    model, channels_last = build(cfg, device)
    optimizer = build_optimizer(model, cfg.optim, cfg.optim.lr)
    autocast, scaler = autocast_for(device)
    batch = fixed_batch(cfg, size, device)
    if channels_last:
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(device)
            start = time.perf_counter()
        with autocast:
            loss = model(batch)["loss"]
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    elapsed = time.perf_counter() - start
    del model, optimizer, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return steps * cfg.train.batch_size / elapsed


def ray_loop(cfg: ExperimentConfig, run_name: str) -> float:
    """images/s of the Ray Train loop, the median of the throughput windows it logs, first window dropped."""
    from pretrainlab.tracking.mlflow import client_for, start_or_resume_run
    from pretrainlab.train.trainer import build_trainer

    client = client_for(cfg.runtime.tracking_uri)
    run_id, _ = start_or_resume_run(client, cfg.runtime.experiment, run_name, {})
    build_trainer(cfg, run_name, cfg.data.dataset, {"uri": cfg.runtime.tracking_uri, "run_id": run_id}).fit()
    windows = [m.value for m in client.get_metric_history(run_id, "train/throughput")][1:]
    if not windows:
        raise RuntimeError(f"{run_name}: the Ray loop logged fewer than 2 throughput windows; raise --steps")
    return statistics.median(windows)


def train_flops_per_image(cfg: ExperimentConfig, size: int, device: torch.device) -> float:
    """Forward + backward FLOPs of one training image (matmuls and convolutions), counted by torch."""
    small = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": 2})})
    model, _ = build(small, device)
    autocast, _ = autocast_for(device)
    with FlopCounterMode(display=False) as counter, autocast:
        model(fixed_batch(small, size, device))["loss"].backward()
    return counter.get_total_flops() / 2


def matmul_peak(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of a large ``torch.mm`` (bf16 on GPU, fp32 on CPU), best of ``repeats``."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def datasheet_peak(device: torch.device) -> tuple[str, float | None]:
    """The GPU's name and its datasheet dense bf16 peak, when listed in :data:`DATASHEET_BF16_PEAK`."""
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    for key, peak in DATASHEET_BF16_PEAK.items():  # most specific names first
        if key in name:
            return name, peak
    return name, None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps per loop")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps of the plain loop")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--cpus", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 2)), help="Ray worker CPUs")
    parser.add_argument("--tiny", action="store_true", help="32 px and small models: checks the script on a CPU")
    parser.add_argument("--plain-only", action="store_true", help="skip the Ray Train loop (Ray is not started)")
    args = parser.parse_args(argv)
    cases = TINY_CASES if args.tiny else CASES
    args.cases = [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = [name for name in args.cases if name not in cases]
    if unknown or not args.cases:
        parser.error(f"--cases: unknown {unknown or 'none given'}; valid: {', '.join(cases)}")
    if args.steps < 2 * WINDOW and not args.plain_only:
        parser.error(f"--steps {args.steps}: the Ray loop needs at least {2 * WINDOW} (two {WINDOW}-step windows)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU here (use --device cpu --tiny --plain-only for a check)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = {name: (TINY_CASES if args.tiny else CASES)[name] for name in args.cases}
    size = 32 if args.tiny else 224
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="pretrainlab-gpu-bench-"))
    os.environ["PRETRAINLAB_HOME"] = str(work)
    if not args.plain_only:
        from pretrainlab.cluster import init_ray

        init_ray(num_cpus=args.cpus + 2, num_gpus=1 if device.type == "cuda" else 0)

    gpu_name, sheet = datasheet_peak(device)
    measured_peak = matmul_peak(device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    print(f"device {gpu_name}; {precision} matmul measured {measured_peak / 1e12:.1f} TFLOP/s", end="")
    print(f", datasheet {sheet / 1e12:.0f} TFLOP/s" if sheet else ", datasheet peak unknown")
    rows = []
    for name, case in cases.items():
        folder = work / f"synthetic-{case.batch_size}"  # one epoch = warm-up window + args.steps steps
        if not args.plain_only and not folder.exists():
            synthetic_dataset(folder, (args.steps + WINDOW) * case.batch_size, case.batch_size, size)
        cfg = experiment(name, case, args, str(folder), work)
        flops = train_flops_per_image(cfg, size, device)
        plain = plain_loop(cfg, size, args.steps, args.warmup, device)
        ray_ips = None if args.plain_only else ray_loop(cfg, f"{name}-{int(time.time())}")
        rows.append((name, case, flops, plain, ray_ips))
        ray_text = "skipped" if ray_ips is None else f"{ray_ips:8.1f} img/s, ratio {ray_ips / plain:.3f}"
        print(f"{name}: plain {plain:8.1f} img/s; Ray Train {ray_text}", flush=True)

    peak = sheet or measured_peak
    peak_name = "datasheet" if sheet else "measured matmul"
    print(f"\n{size} px, synthetic images, {precision} (autocast on GPU); MFU over the")
    print(f"{peak_name} peak ({peak / 1e12:.1f} TFLOP/s); target: Ray / plain >= 0.95")
    print(
        f"{'case':<13}{'batch':>6}{'GFLOP/img':>10}{'plain img/s':>12}{'MFU':>7}{'Ray img/s':>11}{'MFU':>7}{'ratio':>7}"
    )
    for name, case, flops, plain, ray_ips in rows:
        ray_cols = f"{'-':>11}{'-':>7}{'-':>7}"
        if ray_ips is not None:
            ray_cols = f"{ray_ips:11.1f}{ray_ips * flops / peak:7.1%}{ray_ips / plain:7.3f}"
        line = f"{name:<13}{case.batch_size:6d}{flops / 1e9:10.2f}{plain:12.1f}{plain * flops / peak:7.1%}{ray_cols}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
