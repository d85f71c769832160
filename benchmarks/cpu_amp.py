"""Training steps on CPU in full precision against bf16 autocast (``train.amp: bf16``), in one process.

    python benchmarks/cpu_amp.py [--steps 4] [--rounds 2]

For the scenes image-text configs (CLIP, BLIP retrieval / VQA / grounding) and the default
Fashion-MNIST classifier, at their real model sizes and batch sizes, the same batch is trained
(the job's ``Stepper``: forward, backward, optimizer and schedule step) with ``train.amp: off``
and ``bf16``, alternating so that load from elsewhere hits both alike. Prints per config the
median step times and the ratio off / bf16 (the speed-up). bf16 pays off on CPUs with AMX or
AVX-512 BF16 units (``lscpu``: ``amx_bf16``, ``avx512_bf16``); elsewhere it can be slower.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from pretrainlab.config import load_config
from pretrainlab.data.catalog import dataset_dir, dataset_info
from pretrainlab.data.dataset import load_split_annotated
from pretrainlab.data.pipeline import Preprocessor, to_model_inputs
from pretrainlab.data.shards import shard_paths
from pretrainlab.strategies import get_strategy
from pretrainlab.train.optim import build_optimizer
from pretrainlab.train.schedule import build_scheduler
from pretrainlab.train.steps import Stepper

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
BENCHMARKED = (
    "clip_resnet10t_scenes",
    "blip-retrieval_vit-d6w192-p8_scenes",
    "blip-vqa_vit-d6w192-p8_scenes",
    "blip-grounding_vit-d6w192-p8_scenes",
    "resnet10t_1xb128_fmnist",
)


def first_batch(cfg, folder: str) -> dict[str, torch.Tensor]:
    """The first ``train.batch_size`` training rows of ``folder``, preprocessed as a worker does."""
    table = pq.read_table(shard_paths(folder, "train")[0]).slice(0, cfg.train.batch_size)
    rows = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    return to_model_inputs(Preprocessor(cfg.data, train=True, seed=0)(rows), cfg.data, "cpu")


def step_seconds(stepper: Stepper, batch: dict[str, torch.Tensor], steps: int) -> float:
    """Median seconds of a training step after one warm-up step."""
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        stepper.micro_batch(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def first_test_images(folder: str, images: int) -> tuple[np.ndarray, dict[str, list], list[str]]:
    """(pixels, annotations, answer vocabulary) of the first ``images`` test images of ``folder``."""
    pixels, annotations = load_split_annotated(folder, "test")
    sliced = {name: rows[:images] for name, rows in annotations.items()}
    return pixels[:images], sliced, dataset_info(folder)["class_names"]


def untrained(name: str, overrides: list[str] | None = None):
    """(config, data folder, model with seed-0 random weights) of config ``name`` (``model.init_from`` not loaded)."""
    cfg = load_config(CONFIGS / f"{name}.yaml", overrides)
    folder = dataset_dir(cfg)  # a built-in set is converted on first use
    info = dataset_info(folder)
    torch.manual_seed(0)
    model = get_strategy(cfg.strategy).build_model(cfg, info["num_classes"], info["in_chans"], load_init_from=False)
    return cfg, folder, model


def compare(name: str, steps: int, rounds: int) -> tuple[float, float]:
    """(median step seconds in full precision, with bf16 autocast) of config ``name``."""
    cfg, folder, model = untrained(name)
    model.train()
    optimizer = build_optimizer(model, cfg.optim, cfg.optim.lr)
    scheduler = build_scheduler(optimizer, cfg.schedule, steps_per_epoch=100, epochs=cfg.train.epochs)
    batch = first_batch(cfg, folder)
    seconds = {"off": [], "bf16": []}
    for _ in range(rounds):
        for amp in seconds:
            train = cfg.train.model_copy(update={"amp": amp})
            stepper = Stepper(model, optimizer, scheduler, train, torch.device("cpu"))
            seconds[amp].append(step_seconds(stepper, batch, steps))
    return statistics.median(seconds["off"]), statistics.median(seconds["bf16"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per round and precision")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    for name in BENCHMARKED:
        full, bf16 = compare(name, args.steps, args.rounds)
        print(f"{name}: training step {full:.2f} s fp32, {bf16:.2f} s bf16 autocast: speed-up {full / bf16:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
