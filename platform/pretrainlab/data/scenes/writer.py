"""Writing the scenes datasets: images generated in parallel blocks, four task datasets via ``write_dataset``.

Images are generated in blocks of ``BLOCK_SIZE`` consecutive indices of one split,
each block by one worker process. Everything about an image depends only on
(seed, split, index), except which of its candidate questions are asked: that
depends on the answer counts of the images before it in its block. Blocks are
fixed by the split sizes, so the output is the same for any number of workers.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pretrainlab.data.scenes.grammar import COLORS, SHAPES, SIZES
from pretrainlab.data.scenes.language import captions, hard_negative, referring_expressions, true_claims
from pretrainlab.data.scenes.questions import (
    MAX_ANSWER_SHARE,
    MAX_TEMPLATE_ANSWER_SHARE,
    QUESTION_TYPES,
    AnswerBalancer,
    candidate_questions,
)
from pretrainlab.data.scenes.render import encode_png
from pretrainlab.data.scenes.scene import TEXT_STREAM, Scene, check_image_size, generate_scene, image_rng
from pretrainlab.data.scenes.splits import held_out_combinations, split_sizes
from pretrainlab.data.shards import GROUNDING_SCHEMA, VQA_SCHEMA, write_dataset

GENERATOR_VERSION = "scenes-2"
"""Recorded in every manifest; changes whenever the same seed would give other data."""

BLOCK_SIZE = 512
"""Images per unit of parallel work, and per run of answer rebalancing."""

TASKS = ("caption", "vqa", "grounding", "retrieval")

Block = tuple[str, int, int]  # split, first index, one past the last index


def write_scenes(
    out_dir: str | os.PathLike,
    *,
    num_images: int = 10000,
    image_size: int = 96,
    seed: int = 0,
    textures: bool = True,
    shard_size: int = 5000,
    workers: int | None = None,
) -> dict[str, Path]:
    """Generates the scenes image-text set and writes it as four datasets of the same images.

    ``out_dir/caption``, ``out_dir/vqa``, ``out_dir/grounding`` and
    ``out_dir/retrieval`` each get the splits train (80% of ``num_images``), val
    (5%), test (10%) and test_compositional (5%, the held-out (shape, colour)
    combinations). Each manifest's metadata records the generator version, seed,
    image size, textures flag and held-out combinations; vqa's adds
    ``answer_vocab`` (every answer, most frequent first), grounding's ``categories``.

    Args:
        out_dir: the parent folder of the four datasets.
        num_images: images in all splits together, at least 20.
        image_size: side of the square PNG images, 64 to 128 pixels.
        seed: fixes every image, text and the held-out combinations; the same
            arguments give byte-identical shards.
        textures: scikit-image texture backgrounds rather than plain ones.
        shard_size: most rows per Parquet shard.
        workers: processes generating images; None uses every CPU this process may run on.

    Returns:
        Task name -> dataset folder, for each of ``TASKS``.
    """
    sizes = split_sizes(num_images)
    check_image_size(image_size)
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1 or None, got {workers}")
    blocks = [
        (split, start, min(start + BLOCK_SIZE, n)) for split, n in sizes.items() for start in range(0, n, BLOCK_SIZE)
    ]
    generate = functools.partial(_generate_block, seed=seed, image_size=image_size, textures=textures)
    rows: dict[str, list[dict[str, Any]]] = {split: [] for split in sizes}
    for (split, _, _), block_rows in zip(blocks, _map(generate, blocks, workers), strict=True):
        rows[split].extend(block_rows)
    for split_rows in rows.values():
        _keep_also_true_of_split(split_rows)

    answers = Counter(q["answers"][0] for split_rows in rows.values() for row in split_rows for q in row["questions"])
    answer_vocab = sorted(answers, key=lambda a: (-answers[a], a))
    metadata = {
        "generator": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "textures": textures,
        "num_images": num_images,
        "held_out": [list(combo) for combo in sorted(held_out_combinations(seed))],
        "shapes": list(SHAPES),
        "colors": list(COLORS),
        "sizes": list(SIZES),
    }
    extra = {
        "vqa": {
            "answer_vocab": answer_vocab,
            "question_types": list(QUESTION_TYPES),
            "answer_balance": {
                "block_size": BLOCK_SIZE,
                "max_answer_share_over_chance": MAX_ANSWER_SHARE,
                "max_template_answer_share_over_chance": MAX_TEMPLATE_ANSWER_SHARE,
            },
        },
        "grounding": {"categories": list(SHAPES)},
    }
    class_names = {"vqa": answer_vocab, "grounding": list(SHAPES)}
    images = {split: _image_columns(split, split_rows, image_size) for split, split_rows in rows.items()}
    out = Path(out_dir)
    for task in TASKS:
        write_dataset(
            out / task,
            {split: pa.table({**images[split], **_text_columns(task, rows[split])}) for split in rows},
            name=f"scenes-{task}",
            task=task,
            class_names=class_names.get(task, []),
            shard_size=shard_size,
            metadata={**metadata, **extra.get(task, {})},
        )
    return {task: out / task for task in TASKS}


def describe_scene(scene: Scene, balancer: AnswerBalancer) -> dict[str, Any]:
    """Everything written about one scene, as a row of the four datasets (without the image fields).

    Args:
        scene: the scene.
        balancer: the answer balancer of the scene's block; its counts are updated.

    Returns:
        ``source_id``; ``captions`` and hard ``negatives`` (texts); ``true_texts``, every
        text a caption or hard negative of any scene could have that is true of this one
        (``language.true_claims``); ``questions`` and ``refs`` (lists of dicts in the vqa and
        grounding schemas' struct layout).
    """
    rng = image_rng(scene.seed, scene.split, scene.index, TEXT_STREAM)
    claims = captions(scene.objects, rng)
    negatives = [negative for claim in claims if (negative := hard_negative(claim, scene.objects, rng)) is not None]
    references = referring_expressions(scene.objects, rng)
    pools = candidate_questions(scene.objects, rng)
    questions = [q for kind in QUESTION_TYPES if (q := balancer.choose(pools[kind], rng)) is not None]
    source_id = scene.source_id
    return {
        "source_id": source_id,
        "captions": [claim.text() for claim in claims],
        "negatives": [negative.text() for negative in negatives],
        "true_texts": sorted(claim.text() for claim in true_claims(scene.objects)),
        "questions": [
            {"question_id": f"{source_id}:q{k}", "question": q.text, "answers": [q.answer], "question_type": q.type}
            for k, q in enumerate(questions)
        ],
        "refs": [
            {
                "ref_id": f"{source_id}:r{i}",
                "expressions": [r.text() for r in refs],
                "box": list(scene.objects[i].box),
                "category": scene.objects[i].shape,
            }
            for i, refs in references.items()
        ],
    }


def _keep_also_true_of_split(rows: Sequence[dict[str, Any]]) -> None:
    """Replaces each row's ``true_texts`` by ``also_true``: the captions and hard negatives of the split's other
    images that are true of this image too (a retrieval gallery of the split counts them as matches)."""
    gallery = {text for row in rows for text in (*row["captions"], *row["negatives"])}
    for row in rows:
        own = set(row["captions"])
        row["also_true"] = [text for text in row.pop("true_texts") if text in gallery and text not in own]


def _generate_block(block: Block, *, seed: int, image_size: int, textures: bool) -> list[dict[str, Any]]:
    """The rows of one block: each image as PNG with its text, questions balanced over the block."""
    split, start, stop = block
    balancer = AnswerBalancer()
    rows = []
    for index in range(start, stop):
        scene = generate_scene(index, split, seed, image_size, textures=textures)
        rows.append({"image": encode_png(scene.image), **describe_scene(scene, balancer)})
    return rows


def _map(function: Callable[[Block], Any], blocks: Sequence[Block], workers: int | None) -> Iterator[Any]:
    """``map`` over blocks, in order, in a pool of ``workers`` processes when more than one is useful."""
    workers = min(len(os.sched_getaffinity(0)) if workers is None else workers, len(blocks))
    if workers <= 1:
        yield from map(function, blocks)
        return
    # fork: starts in milliseconds with the parent's caches, and needs no `if __name__ == "__main__"` guard
    # in the caller's script; the children only run numpy and Pillow code, never the parent's threads' code.
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(function, blocks)


def _image_columns(split: str, rows: Sequence[dict[str, Any]], image_size: int) -> dict[str, pa.Array]:
    """The columns every task's table shares: PNG images, split and source ids."""
    n = len(rows)
    return {
        "image": pa.array([r["image"] for r in rows], pa.binary()),
        "image_format": pa.array(["png"] * n),
        "height": pa.array(np.full(n, image_size, np.int32)),
        "width": pa.array(np.full(n, image_size, np.int32)),
        "channels": pa.array(np.full(n, 3, np.int32)),
        "split": pa.array([split] * n),
        "source_id": pa.array([r["source_id"] for r in rows]),
    }


def _text_columns(task: str, rows: Sequence[dict[str, Any]]) -> dict[str, pa.Array]:
    """The columns of one task's table that hold its text."""
    texts = pa.list_(pa.string())
    if task == "caption":
        return {"captions": pa.array([r["captions"] for r in rows], texts)}
    if task == "retrieval":
        return {
            "captions": pa.array([r["captions"] for r in rows], texts),
            "negatives": pa.array([r["negatives"] for r in rows], texts),
            "also_true": pa.array([r["also_true"] for r in rows], texts),
        }
    if task == "vqa":
        return {"questions": pa.array([r["questions"] for r in rows], VQA_SCHEMA.field("questions").type)}
    return {"refs": pa.array([r["refs"] for r in rows], GROUNDING_SCHEMA.field("refs").type)}
