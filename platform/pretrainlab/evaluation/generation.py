"""Generative image-text models on whole splits: captioning, VQA and grounding metrics with their sanity baselines.

A model here is the BLIP-style model (:mod:`pretrainlab.strategies.blip`): ``generate(images, prompts, ...)``
continues one prompt per image row. Each evaluation returns the task's metrics next to a baseline
that the model should beat by a wide margin:

- captioning, ``shuffled/*``: the predicted captions scored against the references of other images
  (a fixed permutation, seed 0);
- VQA, ``question_only/*``: the same model answering every question about a blank image (an
  all-zero normalised input: every pixel the colour ``data.mean``), so only the question informs it;
  answers are generated, and also picked from the answer vocabulary by likelihood (``ranked/*``,
  baseline ``question_only/ranked/*``);
- grounding, ``centre_box/*``: for every expression, a box centred in the image whose width and
  height are the means over the evaluated samples' target boxes (:func:`centre_box`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from pretrainlab.checkpoint import CheckpointError
from pretrainlab.config import DataConfig
from pretrainlab.data.catalog import dataset_dir
from pretrainlab.data.dataset import load_split_annotated
from pretrainlab.data.errors import DatasetError
from pretrainlab.data.scenes.language import caption_kind, expression_kind
from pretrainlab.data.text import GROUNDING_PROMPT, VQA_PROMPT, bpe_ids, detokenize, prompted_sequences
from pretrainlab.evaluation.classification import eval_batches
from pretrainlab.evaluation.figures import plot_samples
from pretrainlab.evaluation.image_text import evaluate_retrieval, scenes_text_kind
from pretrainlab.inference.loading import LoadedModel
from pretrainlab.metrics.captioning import caption_scores
from pretrainlab.metrics.grounding import grounding_scores
from pretrainlab.metrics.vqa import vqa_scores
from pretrainlab.models.generation import Hypothesis

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Box = list[float]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_best(
    model: nn.Module,
    images: np.ndarray,
    owners: Sequence[int],
    prompts: Sequence[list[int]],
    data_cfg: DataConfig,
    batch_size: int = 64,
    **generate_kwargs,
) -> list[Hypothesis]:
    """The best hypothesis of ``model.generate`` for each sample: prompt ``prompts[i]`` about image ``owners[i]``.

    Images go through the evaluation pipeline ``batch_size`` at a time; the samples of those images
    are generated ``batch_size`` rows at a time, each image encoded once for the rows about it.

    Args:
        model: A generative image-text model in eval mode.
        images: uint8 ``N x C x H x W``.
        owners: Image index of each sample, in non-decreasing order.
        prompts: Start token + prompt ids of each sample.
        data_cfg: The model's data section (evaluation pipeline).
        batch_size: Images per pipeline batch and rows per ``generate`` call.
        generate_kwargs: ``max_new_tokens``, ``num_beams``, ``length_penalty``, ``boxes``.
    """

    def best(images: torch.Tensor, owners: torch.Tensor, chunk: list[list[int]]) -> list[Hypothesis]:
        return [hypotheses[0] for hypotheses in model.generate(images, chunk, owners=owners, **generate_kwargs)]

    return _per_sample(best, model, images, owners, prompts, data_cfg, batch_size)


@torch.no_grad()
def predicted_boxes(
    model: nn.Module,
    images: np.ndarray,
    owners: Sequence[int],
    prompts: Sequence[list[int]],
    data_cfg: DataConfig,
    batch_size: int = 64,
    num_beams: int = 1,
) -> list[Box]:
    """The pixel box ``model.predict_boxes`` finds for each sample: prompt ``prompts[i]`` (start token +
    ``EXPRESSION box:`` ids) about image ``owners[i]``; batched as :func:`generate_best`."""
    height, width = images.shape[2:]
    scale = [width, height, width, height]

    def boxes(images: torch.Tensor, owners: torch.Tensor, chunk: list[list[int]]) -> list[Box]:
        found = model.predict_boxes(images, chunk, num_beams, owners=owners)
        return [[v * s for v, s in zip(box, scale, strict=True)] for box, _ in found]

    return _per_sample(boxes, model, images, owners, prompts, data_cfg, batch_size)


def _per_sample(
    call: Callable[[torch.Tensor, torch.Tensor, list[list[int]]], list],
    model: nn.Module,
    images: np.ndarray,
    owners: Sequence[int],
    prompts: Sequence[list[int]],
    data_cfg: DataConfig,
    batch_size: int,
) -> list:
    """``call(images, owners, prompts)`` over every sample, ``batch_size`` rows at a time (prompt ``i`` about
    ``images[owners[i]]``, the images those rows are about); the results in sample order."""
    owners = np.asarray(owners, dtype=np.int64)
    if len(owners) != len(prompts):
        raise ValueError(f"got {len(owners)} image indices for {len(prompts)} prompts")
    if len(owners) and ((np.diff(owners) < 0).any() or owners[0] < 0 or owners[-1] >= len(images)):
        raise ValueError(f"image indices must be sorted and within 0..{len(images) - 1}")
    results: list = []
    for start, batch in zip(
        range(0, len(images), batch_size), eval_batches(images, data_cfg, batch_size, _device(model)), strict=True
    ):
        first, stop = np.searchsorted(owners, [start, start + len(batch)])
        for lo in range(first, stop, batch_size):
            rows = torch.from_numpy(owners[lo : min(stop, lo + batch_size)] - start).to(batch.device)
            used, owners_in_chunk = torch.unique(rows, return_inverse=True)
            results += call(batch[used], owners_in_chunk, list(prompts[lo : lo + len(rows)]))
    return results


@torch.no_grad()
def most_likely_answers(
    model: nn.Module,
    images: np.ndarray,
    owners: Sequence[int],
    prompts: Sequence[list[int]],
    vocabulary: Sequence[str],
    data_cfg: DataConfig,
    batch_size: int = 64,
    blank: bool = False,
) -> list[str]:
    """For each sample (prompt ids ``prompts[i]``, without the start token, about image ``owners[i]``), the text of
    ``vocabulary`` the decoder gives the highest likelihood after the prompt: closed-vocabulary VQA, as BLIP ranks
    its answer list. ``blank``: every sample is about a blank image instead (the question-only baseline)."""
    if not vocabulary:
        raise ValueError("no answer vocabulary to rank")
    device = _device(model)
    answers = bpe_ids(list(vocabulary))

    def pick(tokens: torch.Tensor, rows: torch.Tensor, chunk: Sequence[list[int]]) -> list[int]:
        questions = [prompt for prompt in chunk for _ in answers]
        ids, mask = prompted_sequences(questions, answers * len(chunk), model.context_length)
        likelihood = model.target_log_likelihood(
            tokens,
            torch.from_numpy(ids).to(device),
            torch.from_numpy(mask).to(device),
            rows.repeat_interleave(len(answers)),
        )
        return likelihood.view(len(chunk), len(answers)).argmax(dim=1).tolist()

    chosen: list[int] = []
    if blank:  # the same question about the blank image has one answer: rank each distinct prompt once
        tokens = model.image_features(_blank_image(images, data_cfg, device))[0]
        distinct = list(dict.fromkeys(tuple(p) for p in prompts))
        for lo in range(0, len(distinct), batch_size):
            chunk = [list(p) for p in distinct[lo : lo + batch_size]]
            chosen += pick(tokens, torch.zeros(len(chunk), dtype=torch.long, device=device), chunk)
        best = dict(zip(distinct, chosen, strict=True))
        return [vocabulary[best[tuple(p)]] for p in prompts]
    owners = np.asarray(owners, dtype=np.int64)
    for start, batch in zip(
        range(0, len(images), batch_size), eval_batches(images, data_cfg, batch_size, device), strict=True
    ):
        tokens = model.image_features(batch)[0]
        first, stop = np.searchsorted(owners, [start, start + len(batch)])
        for lo in range(first, stop, batch_size):
            rows = torch.from_numpy(owners[lo : min(stop, lo + batch_size)] - start).to(device)
            chosen += pick(tokens, rows, prompts[lo : lo + len(rows)])
    return [vocabulary[i] for i in chosen]


def _blank_image(images: np.ndarray, data_cfg: DataConfig, device: torch.device) -> torch.Tensor:
    """One all-zero normalised model input (every pixel ``data.mean``) of the evaluation pipeline's shape."""
    return torch.zeros_like(next(eval_batches(images[:1], data_cfg, 1, device)))


@torch.no_grad()
def _blank_answers(
    model: nn.Module, images: np.ndarray, prompts: list[list[int]], data_cfg: DataConfig, batch_size: int, **kwargs
) -> list[Hypothesis]:
    """The best hypothesis for each prompt about a blank image; each distinct prompt is generated once."""
    distinct = list(dict.fromkeys(tuple(p) for p in prompts))
    blank = _blank_image(images, data_cfg, _device(model))
    found: dict[tuple[int, ...], Hypothesis] = {}
    for lo in range(0, len(distinct), batch_size):
        chunk = distinct[lo : lo + batch_size]
        owners = torch.zeros(len(chunk), dtype=torch.long, device=blank.device)
        results = model.generate(blank, [list(p) for p in chunk], owners=owners, **kwargs)
        found.update({p: hypotheses[0] for p, hypotheses in zip(chunk, results, strict=True)})
    return [found[tuple(p)] for p in prompts]


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}/{key}": value for key, value in metrics.items()}


def _captions(model: nn.Module, images: np.ndarray, data_cfg: DataConfig, batch_size: int, **kwargs) -> list[str]:
    """One caption generated per image, from the start token alone (captions have no prompt)."""
    owners, prompts = list(range(len(images))), [[model.start_id]] * len(images)
    best = generate_best(model, images, owners, prompts, data_cfg, batch_size, **kwargs)
    return [detokenize(h.tokens, model.context_length) for h in best]


def _vqa_samples(annotations: dict[str, list], start_id: int) -> tuple[list[int], list[list[int]], list[dict]]:
    """One sample per question of every image: (image indices, ``VQA_PROMPT`` prompts, the questions)."""
    questions = [(i, q) for i, row in enumerate(annotations["questions"]) for q in row]
    prompts = bpe_ids([VQA_PROMPT.format(q["question"]) for _, q in questions])
    return [i for i, _ in questions], [[start_id, *p] for p in prompts], [q for _, q in questions]


def _grounding_samples(
    annotations: dict[str, list], start_id: int
) -> tuple[list[int], list[list[int]], list[Box], list[str]]:
    """One sample per expression of every ref (as RefCOCO evaluation counts them):
    (image indices, ``GROUNDING_PROMPT`` prompts, target pixel boxes, the expressions)."""
    pairs = [
        (i, text, ref["box"]) for i, row in enumerate(annotations["refs"]) for ref in row for text in ref["expressions"]
    ]
    texts = [text for _, text, _ in pairs]
    prompts = [[start_id, *p] for p in bpe_ids([GROUNDING_PROMPT.format(text) for text in texts])]
    return [i for i, _, _ in pairs], prompts, [[float(v) for v in box] for _, _, box in pairs], texts


def centre_box(target_boxes: Sequence[Sequence[float]], width: float, height: float) -> Box:
    """The centre-box baseline: a box centred in a ``width x height`` image, as wide and as tall as the
    ``target_boxes`` (``x1, y1, x2, y2``) are on average."""
    boxes = np.asarray(target_boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or not len(boxes):
        raise ValueError(f"target_boxes must be a non-empty N x 4 list of boxes, got shape {boxes.shape}")
    half_w, half_h = (boxes[:, 2] - boxes[:, 0]).mean() / 2, (boxes[:, 3] - boxes[:, 1]).mean() / 2
    return [width / 2 - half_w, height / 2 - half_h, width / 2 + half_w, height / 2 + half_h]


def evaluate_captioning(
    model: nn.Module,
    images: np.ndarray,
    annotations: dict[str, list],
    data_cfg: DataConfig,
    batch_size: int = 64,
    num_beams: int = 3,
    max_new_tokens: int = 40,
    length_penalty: float = 1.0,
) -> tuple[dict[str, float], list[str]]:
    """BLEU-1..4 and CIDEr of one caption generated per image, next to the ``shuffled/*`` baseline.

    Args:
        model: A generative image-text model in eval mode.
        images: uint8 ``N x C x H x W``.
        annotations: The split's ``captions``, one list of references per image.
        data_cfg: The model's data section.
        batch_size: Images per generation batch.
        num_beams, max_new_tokens, length_penalty: Beam search settings.

    Returns:
        (metrics, the predicted caption of each image).
    """
    search = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "length_penalty": length_penalty}
    predictions = _captions(model, images, data_cfg, batch_size, **search)
    references = annotations["captions"]
    permutation = np.random.default_rng(0).permutation(len(references))
    shuffled = caption_scores(predictions, [references[j] for j in permutation])
    return {**caption_scores(predictions, references), **_prefixed("shuffled", shuffled)}, predictions


def evaluate_vqa(
    model: nn.Module,
    images: np.ndarray,
    annotations: dict[str, list],
    data_cfg: DataConfig,
    batch_size: int = 64,
    num_beams: int = 1,
    max_new_tokens: int = 5,
    length_penalty: float = 1.0,
    vocabulary: Sequence[str] | None = None,
) -> tuple[dict[str, float], list[str]]:
    """Exact match and VQAv2 accuracy (overall and per question type) of one generated answer per question,
    next to the ``question_only/*`` baseline (the same questions about a blank image).

    Args:
        model: A generative image-text model in eval mode.
        images: uint8 ``N x C x H x W``.
        annotations: The split's ``questions``, one list per image.
        data_cfg: The model's data section.
        batch_size: Images per pipeline batch and questions per generation batch.
        num_beams, max_new_tokens, length_penalty: Search settings (default greedy).
        vocabulary: The dataset's answers; with it, the same metrics also for the most likely answer of the
            vocabulary (``ranked/*``, ``question_only/ranked/*``; :func:`most_likely_answers`).

    Returns:
        (metrics, the generated answer of each question, in image then question order).
    """
    owners, prompts, questions = _vqa_samples(annotations, model.start_id)
    kwargs = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "length_penalty": length_penalty}
    best = generate_best(model, images, owners, prompts, data_cfg, batch_size, **kwargs)
    blank = _blank_answers(model, images, prompts, data_cfg, batch_size, **kwargs)
    predictions = [detokenize(h.tokens, model.context_length) for h in best]
    question_only = [detokenize(h.tokens, model.context_length) for h in blank]
    answers = [q["answers"] for q in questions]
    types = [q["question_type"] for q in questions]
    metrics = vqa_scores(predictions, answers, types)
    metrics |= _prefixed("question_only", vqa_scores(question_only, answers, types))
    if vocabulary is not None:
        unprompted = [prompt[1:] for prompt in prompts]  # without the start token
        for prefix, blank_image in (("ranked", False), ("question_only/ranked", True)):
            ranked = most_likely_answers(
                model, images, owners, unprompted, vocabulary, data_cfg, batch_size, blank=blank_image
            )
            metrics |= _prefixed(prefix, vqa_scores(ranked, answers, types))
    return metrics, predictions


def evaluate_grounding(
    model: nn.Module,
    images: np.ndarray,
    annotations: dict[str, list],
    data_cfg: DataConfig,
    batch_size: int = 64,
    num_beams: int = 1,
    expression_group: Callable[[str], str] | None = None,
) -> tuple[dict[str, float], list[Box]]:
    """Accuracy at IoU >= 0.5 and mean IoU of one box predicted per (ref, expression), next to the
    ``centre_box/*`` baseline (:func:`centre_box` of the samples' targets); with ``expression_group``, also
    per group of expressions (``acc_iou50/<group>``, ``miou/<group>``, ``samples/<group>``).

    Args:
        model: A generative image-text model in eval mode that finds boxes (``predict_boxes``).
        images: uint8 ``N x C x H x W``; boxes are in these images' pixels.
        annotations: The split's ``refs``, one list per image.
        data_cfg: The model's data section.
        batch_size: Images per pipeline batch and expressions per generation batch.
        num_beams: Search setting of a decoder that writes location tokens (default greedy).
        expression_group: Names the group of an expression (on the scenes set, its kind:
            :func:`~pretrainlab.data.scenes.language.expression_kind`).

    Returns:
        (metrics, the predicted pixel box of each sample, in image, ref, expression order).
    """
    owners, prompts, targets, texts = _grounding_samples(annotations, model.start_id)
    groups = list(map(expression_group, texts)) if expression_group else None
    height, width = images.shape[2:]
    boxes = predicted_boxes(model, images, owners, prompts, data_cfg, batch_size, num_beams)
    centre = [centre_box(targets, width, height)] * len(targets)
    baseline = grounding_scores(centre, targets, groups)
    baseline = _prefixed("centre_box", {key: v for key, v in baseline.items() if not key.startswith("samples/")})
    return {**grounding_scores(boxes, targets, groups), **baseline}, boxes


_COLUMN = {"caption": "captions", "retrieval": "captions", "vqa": "questions", "grounding": "refs"}
"""The annotation column each dataset task is evaluated on (retrieval rows: captioning of their captions)."""


def _split_of(loaded: LoadedModel, split: str, data_folder: str | None) -> tuple[str, str, np.ndarray, dict[str, list]]:
    """(the checkpoint's dataset task, the dataset's folder, the split's images, its annotations for that task)."""
    task = loaded.meta.get("dataset_task")
    if task not in _COLUMN:
        raise CheckpointError(
            f"{loaded.checkpoint_dir}: dataset task {task!r}; generative models are evaluated on {', '.join(_COLUMN)}"
        )
    folder = data_folder or dataset_dir(loaded.config)
    images, annotations = load_split_annotated(folder, split)
    column = _COLUMN[task]
    if column not in annotations:
        raise DatasetError(f"{folder}: has no {column!r} column to evaluate a model trained on {task} rows")
    return task, folder, images, annotations


def evaluate_generation_split(
    loaded: LoadedModel, split: str, data_folder: str | None = None, batch_size: int = 64
) -> dict[str, float]:
    """The task's metrics and baseline of a loaded generative checkpoint on ``split`` of its dataset (or of
    ``data_folder``): captioning on caption and retrieval datasets (on retrieval datasets also Recall@K of
    the contrastive embeddings), VQA, or grounding, by the dataset task the checkpoint was trained on. On the
    scenes set, retrieval and grounding are also reported per kind of caption / referring expression."""
    task, folder, images, annotations = _split_of(loaded, split, data_folder)
    data_cfg = loaded.config.data
    if task == "vqa":
        vocabulary = loaded.class_names if loaded.model.params.rank_answers and loaded.class_names else None
        return evaluate_vqa(loaded.model, images, annotations, data_cfg, batch_size, vocabulary=vocabulary)[0]
    if task == "grounding":
        group = scenes_text_kind(folder, expression_kind)
        return evaluate_grounding(loaded.model, images, annotations, data_cfg, batch_size, expression_group=group)[0]
    metrics = evaluate_captioning(loaded.model, images, annotations, data_cfg, batch_size)[0]
    if task == "retrieval":  # Recall@K both ways: contrastive, and re-ranked by the matching head (itm/*)
        text_group = scenes_text_kind(folder, caption_kind)
        rerank_k = loaded.model.params.rerank_k
        metrics |= evaluate_retrieval(loaded.model, images, annotations, data_cfg, batch_size, text_group, rerank_k)
    return metrics


def generation_samples_figure(
    loaded: LoadedModel, split: str, data_folder: str | None = None, count: int = 16
) -> Figure:
    """A grid of the first ``count`` images of ``split`` with the model's caption, answer (to each image's first
    question) or box (for each image's first expression) next to the reference."""
    task, _, images, annotations = _split_of(loaded, split, data_folder)
    model, data_cfg = loaded.model, loaded.config.data
    images = images[:count]
    annotations = {key: values[:count] for key, values in annotations.items()}
    owners = list(range(len(images)))
    if task == "vqa":
        questions = [row[0] for row in annotations["questions"]]
        prompts = [[model.start_id, *p] for p in bpe_ids([VQA_PROMPT.format(q["question"]) for q in questions])]
        best = generate_best(model, images, owners, prompts, data_cfg, max_new_tokens=5)
        lines = [
            [f"Q: {q['question']}", f"pred: {detokenize(h.tokens, model.context_length)}", f"ref: {q['answers'][0]}"]
            for q, h in zip(questions, best, strict=True)
        ]
        return plot_samples(images, lines)
    if task == "grounding":
        refs = [row[0] for row in annotations["refs"]]
        texts = [ref["expressions"][0] for ref in refs]
        prompts = [[model.start_id, *p] for p in bpe_ids([GROUNDING_PROMPT.format(text) for text in texts])]
        found = predicted_boxes(model, images, owners, prompts, data_cfg)
        boxes = [(box, ref["box"]) for box, ref in zip(found, refs, strict=True)]
        return plot_samples(images, [[text] for text in texts], boxes)
    predictions = _captions(model, images, data_cfg, 64, max_new_tokens=40, num_beams=3)
    lines = [[f"pred: {p}", f"ref: {refs[0]}"] for p, refs in zip(predictions, annotations["captions"], strict=True)]
    return plot_samples(images, lines)
