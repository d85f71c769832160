"""BLIP training steps and beam search on batches cut after their longest text, against the padded batches.

    python benchmarks/text_padding.py [--steps 4] [--rounds 2] [--images 32]

For each scenes BLIP config (retrieval, VQA, grounding: their real model sizes and context
lengths), the same batches are trained (forward + backward + AdamW step) with the token columns
cut after their longest text (what the model does) and whole (the baseline: the model's cut
turned off), alternating in one process so that load from elsewhere hits both alike. Then
captions of ``--images`` test images are generated with 3 beams, each step's rows cut after the
longest hypothesis (``BLIP.generate``) and whole. Prints per config the median step times and
the ratio padded / cut (the speed-up), and the same for beam search.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import pyarrow.parquet as pq
import torch

from pretrainlab.config import load_config
from pretrainlab.data.catalog import dataset_dir
from pretrainlab.data.pipeline import Preprocessor, to_model_inputs
from pretrainlab.data.shards import shard_paths
from pretrainlab.models.generation import beam_search
from pretrainlab.strategies import blip, get_strategy

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TASKS = ("retrieval", "vqa", "grounding")


def rows(folder: str, split: str, count: int) -> dict:
    table = pq.read_table(shard_paths(folder, split)[0]).slice(0, count)
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def step_seconds(model, optimizer, batch: dict, steps: int) -> float:
    """Median seconds of a training step after one warm-up step."""
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = model(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def padded_generate(model, images: torch.Tensor, prompts: list[list[int]], max_new_tokens: int) -> None:
    """``BLIP.generate`` for captions with every row whole (the baseline)."""
    image_tokens, _ = model.image_features(images)

    def log_probs(ids, positions, owners):
        states = model.decode(image_tokens, ids, owners)
        return model.token_logits(states[torch.arange(len(ids)), positions]).float().log_softmax(dim=1)

    beam_search(log_probs, prompts, model.context_length, model.end_id, max_new_tokens, 3)


def compare_training(task: str, steps: int, rounds: int) -> tuple[float, float]:
    cfg = load_config(CONFIGS / f"blip-{task}_vit-d6w192-p8_scenes.yaml")
    torch.manual_seed(0)
    model = get_strategy("blip").build_model(cfg, 0, 3).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    folder = dataset_dir(cfg)
    batch = to_model_inputs(
        Preprocessor(cfg.data, train=True, seed=0)(rows(folder, "train", cfg.train.batch_size)), cfg.data, "cpu"
    )
    cut, padded = [], []
    for _ in range(rounds):
        cut.append(step_seconds(model, optimizer, batch, steps))
        with mock.patch.object(blip, "_without_padding", lambda b: b):
            padded.append(step_seconds(model, optimizer, batch, steps))
    return statistics.median(cut), statistics.median(padded)


def compare_captioning(images: int, rounds: int) -> tuple[float, float]:
    cfg = load_config(CONFIGS / "blip-retrieval_vit-d6w192-p8_scenes.yaml")
    torch.manual_seed(0)
    model = get_strategy("blip").build_model(cfg, 0, 3).eval()
    folder = dataset_dir(cfg)
    pixels = to_model_inputs(Preprocessor(cfg.data, train=False)(rows(folder, "test", images)), cfg.data, "cpu")
    prompts = [[model.start_id]] * images
    cut, padded = [], []
    with torch.no_grad():
        for _ in range(rounds):
            start = time.perf_counter()
            model.generate(pixels["image"], prompts, max_new_tokens=40, num_beams=3)
            cut.append(time.perf_counter() - start)
            start = time.perf_counter()
            padded_generate(model, pixels["image"], prompts, max_new_tokens=40)
            padded.append(time.perf_counter() - start)
    return statistics.median(cut), statistics.median(padded)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per round and side")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", type=int, default=32, help="test images captioned per round and side")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    for task in TASKS:
        cut, padded = compare_training(task, args.steps, args.rounds)
        print(f"{task}: training step {cut:.2f} s cut, {padded:.2f} s padded: speed-up {padded / cut:.2f}x")
    cut, padded = compare_captioning(args.images, args.rounds)
    print(
        f"captions of {args.images} images, 3 beams: {cut:.1f} s cut, {padded:.1f} s padded: "
        f"speed-up {padded / cut:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
