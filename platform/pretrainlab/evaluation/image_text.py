"""Image-text models on whole splits: embeddings of images and texts, retrieval Recall@K.

Used by the training loop's validation (each worker embeds its shard of images and its part of
the texts, the parts are gathered) and by the evaluation job (one process, the whole split).
A model here has ``encode_image(images)`` and ``encode_text(token_ids)``, both returning
L2-normalised embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from pretrainlab.config import DataConfig
from pretrainlab.data.catalog import dataset_dir
from pretrainlab.data.dataset import load_split_annotated
from pretrainlab.data.scenes import GENERATOR_VERSION
from pretrainlab.data.scenes.language import caption_kind
from pretrainlab.data.shards import load_manifest
from pretrainlab.data.text import tokenize
from pretrainlab.distributed import gather_from_workers, gather_rows, rank_and_world
from pretrainlab.evaluation.classification import eval_batches
from pretrainlab.inference.loading import LoadedModel
from pretrainlab.metrics.retrieval import (
    recall_of_scores,
    rerank_top_k,
    retrieval_recall,
    text_gallery,
)
from pretrainlab.models.text import encode_texts


@torch.no_grad()
def encode_images(
    model: nn.Module, images: np.ndarray, cfg: DataConfig, batch_size: int = 512, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``N x D`` image embeddings of uint8 ``N x C x H x W`` images through the evaluation pipeline."""
    return torch.cat([model.encode_image(b).float().cpu() for b in eval_batches(images, cfg, batch_size, device)])


def _gather_objects(items: list) -> list:
    """Every worker's list, concatenated in rank order (``items`` itself outside a process group)."""
    return [item for part in gather_from_workers(items) for item in part]


def _shared_text_embeddings(
    model: nn.Module, texts: list[str], cfg: DataConfig, batch_size: int, device
) -> torch.Tensor:
    """Embeddings of all ``texts``: each worker embeds a contiguous part, the parts are gathered in order."""
    rank, world = rank_and_world()
    if len(texts) < world:  # too few to share
        return encode_texts(model, texts, cfg.context_length, batch_size, device)
    part = np.array_split(np.arange(len(texts)), world)[rank]
    mine = [texts[i] for i in part]
    return gather_rows(encode_texts(model, mine, cfg.context_length, batch_size, device))


def retrieval_validation(
    models: dict[str, nn.Module],
    batches: Iterable[tuple[torch.Tensor, list, list, list]],
    cfg: DataConfig,
    batch_size: int,
    device: torch.device | str,
) -> dict[str, dict[str, float]]:
    """Recall@K of each of ``models`` over every worker's validation rows together.

    Args:
        models: Name -> model (unwrapped from DDP).
        batches: This worker's (normalised images, their captions, their negatives, their ``also_true`` texts)
            batches.
        cfg: The data section (``context_length``).
        batch_size: Texts per forward pass.
        device: Where the models are.
    """
    image_parts: dict[str, list[torch.Tensor]] = {name: [] for name in models}
    texts_of_images: tuple[list[list[str]], ...] = ([], [], [])  # captions, negatives, also_true
    for images, *batch_texts in batches:
        for name, model in models.items():
            image_parts[name].append(model.encode_image(images).float().cpu())
        for gathered, batch in zip(texts_of_images, batch_texts, strict=True):
            gathered += batch
    texts, relevant = text_gallery(*(_gather_objects(gathered) for gathered in texts_of_images))
    results = {}
    for name, model in models.items():
        image_embeddings = gather_rows(torch.cat(image_parts[name]))
        text_embeddings = _shared_text_embeddings(model, texts, cfg, batch_size, device)
        results[name] = retrieval_recall(image_embeddings, text_embeddings, relevant)
    return results


def evaluate_retrieval(
    model: nn.Module,
    images: np.ndarray,
    annotations: dict[str, list],
    cfg: DataConfig,
    batch_size: int = 512,
    text_group: Callable[[str], str] | None = None,
    rerank_k: int = 0,
) -> dict[str, float]:
    """Recall@K of ``model`` on one split, next to the shuffled-image baseline (``shuffled/*``).

    The gallery is every image of the split and every distinct caption and hard negative of
    them (an image's ``also_true`` texts count as its captions); the baseline pairs each image's
    embedding with another image's texts (a fixed permutation), which puts Recall@K at chance.

    Args:
        model: An image-text model in eval mode.
        images: uint8 ``N x C x H x W``.
        annotations: The split's ``captions`` (and ``negatives``, ``also_true``), one list per image.
        cfg: The model's data section (evaluation pipeline, ``context_length``).
        batch_size: Images or texts per forward pass.
        text_group: The group of a text (e.g. its kind of caption); with it, text->image Recall@K
            is also reported per group (``t2i_r<K>/<group>``, ``t2i_queries/<group>``).
        rerank_k: With a model that has a matching head (``image_features`` and
            ``match_probability``), each query's ``rerank_k`` best contrastive candidates are
            re-ranked by it, both ways; those figures are reported under ``itm/``.
    """
    device = next(model.parameters()).device
    texts, relevant = text_gallery(annotations["captions"], annotations.get("negatives"), annotations.get("also_true"))
    image_embeddings = encode_images(model, images, cfg, batch_size, device)
    text_embeddings = encode_texts(model, texts, cfg.context_length, batch_size, device)
    shuffled = torch.from_numpy(np.random.default_rng(0).permutation(len(images)))
    baseline = retrieval_recall(image_embeddings[shuffled], text_embeddings, relevant)
    similarity = image_embeddings @ text_embeddings.T
    scores = {"": (similarity, similarity.T)}
    if rerank_k:
        scores["itm/"] = _matching_head_scores(model, images, texts, relevant, similarity, cfg, rerank_k, batch_size)
    groups = None if text_group is None else [text_group(text) for text in texts]
    metrics = {}
    for prefix, (image_to_text, text_to_image) in scores.items():
        found = recall_of_scores(image_to_text, text_to_image, relevant, text_groups=groups)
        metrics |= {prefix + key: value for key, value in found.items()}
    return {**metrics, **{f"shuffled/{key}": value for key, value in baseline.items()}}


@torch.no_grad()
def _matching_head_scores(
    model: nn.Module,
    images: np.ndarray,
    texts: list[str],
    relevant: np.ndarray,
    similarity: torch.Tensor,
    cfg: DataConfig,
    k: int,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image->text, text->image) scores with each query's ``k`` best contrastive candidates re-ranked by the
    model's matching head (``match_probability`` of image tokens and text token ids)."""
    device = next(model.parameters()).device
    tokens = torch.cat([model.image_features(b)[0].cpu() for b in eval_batches(images, cfg, batch_size, device)])
    ids = torch.from_numpy(tokenize(texts, cfg.context_length))

    def match(image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        parts = [
            model.match_probability(
                tokens[image_index[i : i + batch_size]].to(device), ids[text_index[i : i + batch_size]].to(device)
            ).cpu()
            for i in range(0, len(image_index), batch_size)
        ]
        return torch.cat(parts)

    image_to_text = rerank_top_k(similarity, k, match)
    queries = torch.from_numpy(relevant.any(axis=0))  # texts that describe some image
    text_to_image = rerank_top_k(similarity.T, k, lambda text, image: match(image, text), rows=queries)
    return image_to_text, text_to_image


def scenes_text_kind(folder: str, kind: Callable[[str], str]) -> Callable[[str], str] | None:
    """``kind`` (a function of :mod:`pretrainlab.data.scenes.language` that names the kind of a text, such as
    ``caption_kind``) for a dataset this scenes generator wrote, else None."""
    generated_by = load_manifest(folder).get("metadata", {}).get("generator")
    return kind if generated_by == GENERATOR_VERSION else None


def evaluate_retrieval_split(
    loaded: LoadedModel, split: str, data_folder: str | None = None, batch_size: int = 512
) -> dict[str, float]:
    """:func:`evaluate_retrieval` of a loaded checkpoint on ``split`` of its dataset (or of ``data_folder``); on
    the scenes set, text->image Recall@K also per kind of caption (``t2i_r1/spatial_relation``, ...)."""
    folder = data_folder or dataset_dir(loaded.config)
    images, annotations = load_split_annotated(folder, split)
    text_group = scenes_text_kind(folder, caption_kind)
    return evaluate_retrieval(loaded.model, images, annotations, loaded.config.data, batch_size, text_group)
