"""Training steps with glibc's default malloc settings against :func:`keep_freed_memory`.

    python benchmarks/allocator.py [--steps 4] [--rounds 2]

The settings cannot be undone inside a process, so each side runs in a fresh process, and the
sides alternate round by round so that load from elsewhere hits both alike. Each process trains
the same first batch of a config (the job's ``Stepper``: forward, backward, optimizer and
schedule step) at its real model and batch size, and reports the median step time after a
warm-up step and the minor page faults per step. Prints per config the medians over rounds and
the ratio default / kept (the speed-up). The same for the evaluation of the scenes VQA model
(``evaluate_vqa``: generated and ranked answers, and both about a blank image) on ``--images``
test images, untrained.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from pretrainlab.evaluation.generation import evaluate_vqa
from pretrainlab.train.allocator import keep_freed_memory
from pretrainlab.train.optim import build_optimizer
from pretrainlab.train.schedule import build_scheduler
from pretrainlab.train.steps import Stepper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_amp import first_batch, first_test_images, step_seconds, untrained  # noqa: E402

BENCHMARKED = (
    ("blip-vqa_vit-d6w192-p8_scenes-from-grounding", ["data.texts_per_image=6", "train.amp=auto"]),
    ("blip-grounding_vit-d6w192-p8_scenes", []),
    ("clip_resnet10t_scenes", []),
)


VQA_EVALUATION = ("blip-vqa_vit-d6w192-p8_scenes-from-grounding", ["train.amp=auto"])


def build(name: str, overrides: list[str], keep: bool):
    """(config, data folder, untrained model) of config ``name``, after keeping freed memory if ``keep``."""
    if keep and not keep_freed_memory():
        raise SystemExit("keep_freed_memory() changed nothing: not glibc, or MALLOC_*_ set in the environment")
    torch.set_num_threads(2)
    return untrained(name, overrides)


def measure(name: str, overrides: list[str], steps: int, keep: bool) -> dict[str, float]:
    """Median step seconds and minor page faults per step of config ``name``, in this process."""
    cfg, folder, model = build(name, overrides, keep)
    optimizer = build_optimizer(model.train(), cfg.optim, cfg.optim.lr)
    scheduler = build_scheduler(optimizer, cfg.schedule, steps_per_epoch=100, epochs=cfg.train.epochs)
    stepper = Stepper(model, optimizer, scheduler, cfg.train, torch.device("cpu"))
    batch = first_batch(cfg, folder)
    stepper.micro_batch(batch)  # the first step allocates the optimizer state
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    seconds = step_seconds(stepper, batch, steps)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"seconds": seconds, "faults": faults / (steps + 1)}


def measure_vqa_evaluation(images: int, keep: bool) -> dict[str, float]:
    """Seconds and minor page faults of evaluating the VQA model on ``images`` test images, in this process."""
    cfg, folder, model = build(*VQA_EVALUATION, keep)
    pixels, annotations, vocabulary = first_test_images(folder, images)
    faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    with torch.no_grad():
        evaluate_vqa(model.eval(), pixels, annotations, cfg.data, vocabulary=vocabulary)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}


def in_fresh_process(arguments: list[str], keep: bool) -> dict[str, float]:
    """This script with ``arguments`` (one measurement) run by a new Python process."""
    command = [sys.executable, __file__, *arguments]
    if keep:
        command.append("--keep")
    result = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare(arguments: list[str], rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """(median seconds, median page faults) per side of one measurement, the sides alternating."""
    runs = {"default": [], "kept": []}
    for _ in range(rounds):
        for side in runs:
            runs[side].append(in_fresh_process(arguments, keep=side == "kept"))
    seconds = {side: statistics.median(run["seconds"] for run in results) for side, results in runs.items()}
    faults = {side: statistics.median(run["faults"] for run in results) for side, results in runs.items()}
    return seconds, faults


def report(what: str, seconds: dict[str, float], faults: dict[str, float]) -> None:
    print(
        f"{what}: {seconds['default']:.2f} s default, {seconds['kept']:.2f} s keeping freed memory: "
        f"speed-up {seconds['default'] / seconds['kept']:.2f}x; minor page faults {faults['default']:,.0f} / "
        f"{faults['kept']:,.0f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per process")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", type=int, default=16, help="test images of the VQA evaluation")
    parser.add_argument("--measure", metavar="CONFIG", help=argparse.SUPPRESS)
    parser.add_argument("--measure-evaluation", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, overrides, args.steps, args.keep)))
        return 0
    if args.measure_evaluation:
        print(json.dumps(measure_vqa_evaluation(args.images, args.keep)))
        return 0
    for name, config_overrides in BENCHMARKED:
        arguments = ["--steps", str(args.steps), "--measure", name, *config_overrides]
        report(f"{' '.join([name, *config_overrides])}, training step", *compare(arguments, args.rounds))
    arguments = ["--images", str(args.images), "--measure-evaluation"]
    report(f"VQA evaluation of {args.images} test images", *compare(arguments, args.rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
