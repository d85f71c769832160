"""BLIP decoding with the texts of one image attending to it together, against one image copy per text.

    python benchmarks/shared_image_decoding.py [--steps 4] [--rounds 2] [--images 48]

The multimodal decoder (:mod:`pretrainlab.models.decoder`) lays the texts of one image side by
side, so each cross-attention block normalises and projects each image's tokens to keys and
values once. The baseline is open_clip's layout: every text row its own copy of its image's
tokens (the decoder patched back to it; nothing else changes). Both sides alternate in one
process, so that load from elsewhere hits both alike. Measured, at the real model sizes:

- training steps (forward, backward, AdamW, the config's precision) of the scenes VQA model from
  the grounding model (bf16) with 3 and 6 questions per image, and of grounding (3 objects);
- VQA evaluation of ``--images`` test images: every question's answer generated, ranked over the
  answer vocabulary, and both about a blank image (``evaluate_vqa``), on the untrained model.

Prints per case the median seconds and the ratio copies / shared (the speed-up).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch
from open_clip.transformer import MultimodalTransformer

from pretrainlab.evaluation.generation import evaluate_vqa
from pretrainlab.models.decoder import MultimodalDecoder
from pretrainlab.train.optim import build_optimizer
from pretrainlab.train.schedule import build_scheduler
from pretrainlab.train.steps import Stepper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_amp import first_batch, first_test_images, step_seconds, untrained  # noqa: E402

TRAINING = (
    ("blip-vqa_vit-d6w192-p8_scenes-from-grounding", 3),
    ("blip-vqa_vit-d6w192-p8_scenes-from-grounding", 6),
    ("blip-grounding_vit-d6w192-p8_scenes", 3),
)


def one_copy_per_text(self, image_embs, text_embs, owners=None):
    """open_clip's decoder given each text row its own copy of its image's tokens (the baseline)."""
    return MultimodalTransformer.forward(self, image_embs if owners is None else image_embs[owners], text_embs)


def sides():
    """(name, context) of the two layouts, in the order each round times them."""
    return (("shared", nullcontext()), ("copies", mock.patch.object(MultimodalDecoder, "forward", one_copy_per_text)))


def compare_training(name: str, texts: int, steps: int, rounds: int) -> dict[str, float]:
    cfg, folder, model = untrained(name, [f"data.texts_per_image={texts}"])
    optimizer = build_optimizer(model.train(), cfg.optim, cfg.optim.lr)
    scheduler = build_scheduler(optimizer, cfg.schedule, steps_per_epoch=100, epochs=cfg.train.epochs)
    stepper = Stepper(model, optimizer, scheduler, cfg.train, torch.device("cpu"))
    batch = first_batch(cfg, folder)
    seconds = {"shared": [], "copies": []}
    for _ in range(rounds):
        for side, context in sides():
            with context:
                seconds[side].append(step_seconds(stepper, batch, steps))
    return {side: statistics.median(times) for side, times in seconds.items()}


def compare_vqa_evaluation(images: int, rounds: int) -> tuple[dict[str, float], int]:
    cfg, folder, model = untrained("blip-vqa_vit-d6w192-p8_scenes-from-grounding")
    pixels, annotations, vocabulary = first_test_images(folder, images)
    model.eval()
    seconds = {"shared": [], "copies": []}
    with torch.no_grad():
        for _ in range(rounds):
            for side, context in sides():
                with context:
                    start = time.perf_counter()
                    evaluate_vqa(model, pixels, annotations, cfg.data, vocabulary=vocabulary)
                    seconds[side].append(time.perf_counter() - start)
    questions = sum(map(len, annotations["questions"]))
    return {side: statistics.median(times) for side, times in seconds.items()}, questions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per round and side")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", type=int, default=48, help="test images whose questions are evaluated")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    for name, texts in TRAINING:
        times = compare_training(name, texts, args.steps, args.rounds)
        print(
            f"{name}, {texts} texts per image: training step {times['shared']:.2f} s shared, "
            f"{times['copies']:.2f} s copies: speed-up {times['copies'] / times['shared']:.2f}x"
        )
    times, questions = compare_vqa_evaluation(args.images, args.rounds)
    print(
        f"VQA evaluation of {args.images} images ({questions} questions): {times['shared']:.1f} s shared, "
        f"{times['copies']:.1f} s copies: speed-up {times['copies'] / times['shared']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
