"""Image-text retrieval: Recall@K in both directions, with every text that describes an image relevant to it.

Captions of generated or crowd-sourced sets repeat ("there are three objects"); a query text
is matched when any image among the top K has that text among its own captions, and an image
is matched when any of its captions is among the top K texts. A generated set knows more: which
other images' captions and hard negatives are true of an image too ("two green objects" of
every image with exactly two green objects); a dataset's ``also_true`` texts count as its image's
captions here. The text gallery is every distinct caption and hard-negative text of the gallery images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

RECALL_KS = (1, 5, 10)


def text_gallery(
    captions: Sequence[Sequence[str]],
    negatives: Sequence[Sequence[str]] | None = None,
    also_true: Sequence[Sequence[str]] | None = None,
) -> tuple[list[str], np.ndarray]:
    """The distinct texts of a gallery and which image each describes.

    Args:
        captions: Each image's captions.
        negatives: Each image's hard-negative texts (distractors in the text gallery).
        also_true: Each image's further true texts among other images' captions and negatives; those
            not in the gallery are ignored.

    Returns:
        (texts: every distinct caption, then every distinct negative that is no caption,
        relevant: bool ``images x texts``, true where the text is one of the image's captions or
        ``also_true`` texts).

    Raises:
        ValueError: an image without captions, or ``negatives`` or ``also_true`` of another length.
    """
    for name, lists in (("negatives", negatives), ("also_true", also_true)):
        if lists is not None and len(lists) != len(captions):
            raise ValueError(f"{len(lists)} lists of {name} for {len(captions)} images")
    index: dict[str, int] = {}
    for image, texts in enumerate(captions):
        if len(texts) == 0:
            raise ValueError(f"image {image} has no captions")
        for text in texts:
            index.setdefault(text, len(index))
    for texts in negatives or ():
        for text in texts:
            index.setdefault(text, len(index))
    relevant = np.zeros((len(captions), len(index)), dtype=bool)
    for image, texts in enumerate(captions):
        relevant[image, [index[text] for text in texts]] = True
    for image, texts in enumerate(also_true or ()):
        relevant[image, [index[text] for text in texts if text in index]] = True
    return list(index), relevant


def retrieval_recall(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    relevant: np.ndarray | torch.Tensor,
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, float]:
    """Recall@K in percent, image->text (``i2t_r<K>``) and text->image (``t2i_r<K>``), and their sum ``rsum``.

    Args:
        image_embeddings: ``I x D``; the similarity is the dot product (normalise first for cosine).
        text_embeddings: ``T x D``.
        relevant: bool ``I x T``. Texts relevant to no image (pure distractors) are not queries.
        ks: The K of each Recall@K.
    """
    if tuple(np.shape(relevant)) != (len(image_embeddings), len(text_embeddings)):
        raise ValueError(
            f"relevant is {tuple(np.shape(relevant))}, not images x texts "
            f"({len(image_embeddings)}, {len(text_embeddings)})"
        )
    similarity = image_embeddings.float() @ text_embeddings.float().T
    return recall_of_scores(similarity, similarity.T, relevant, ks)


def recall_of_scores(
    image_to_text: torch.Tensor,
    text_to_image: torch.Tensor,
    relevant: np.ndarray | torch.Tensor,
    ks: Sequence[int] = RECALL_KS,
    text_groups: Sequence[str] | None = None,
) -> dict[str, float]:
    """:func:`retrieval_recall` from scores: each image's for each text (``I x T``) and each text's for each image
    (``T x I``); the two differ once each direction's candidates are re-ranked (:func:`rerank_top_k`).

    ``text_groups``: the group of each text (for example its kind of caption); with it, text->image Recall@K
    also within each group of query texts (``t2i_r<K>/<group>``) and each group's number of queries
    (``t2i_queries/<group>``); groups without a query are left out.
    """
    relevant = torch.as_tensor(relevant, dtype=torch.bool)
    if relevant.shape != image_to_text.shape or relevant.T.shape != text_to_image.shape:
        raise ValueError(
            f"relevant is {tuple(relevant.shape)}, not images x texts {tuple(image_to_text.shape)} "
            f"(text scores {tuple(text_to_image.shape)})"
        )
    if text_groups is not None and len(text_groups) != len(text_to_image):
        raise ValueError(f"{len(text_groups)} groups for {len(text_to_image)} texts")
    metrics, ranks = {}, {}
    for name, scores, hits in (("i2t", image_to_text, relevant), ("t2i", text_to_image, relevant.T)):
        queries = hits.any(dim=1)
        if not queries.any():
            raise ValueError(f"{name}: no query has a relevant item")
        ranks[name] = (queries, _best_relevant_rank(scores[queries].float(), hits[queries]))
        for k in ks:
            metrics[f"{name}_r{k}"] = 100.0 * (ranks[name][1] < k).float().mean().item()
    metrics["rsum"] = sum(metrics.values())
    if text_groups is not None:
        queries, rank = ranks["t2i"]
        query_groups = np.asarray(text_groups, dtype=object)[queries.numpy()]
        for group in dict.fromkeys(query_groups):
            group_ranks = rank[torch.from_numpy(query_groups == group)]
            metrics |= {f"t2i_r{k}/{group}": 100.0 * (group_ranks < k).float().mean().item() for k in ks}
            metrics[f"t2i_queries/{group}"] = float(len(group_ranks))
    return metrics


def rerank_top_k(
    scores: torch.Tensor,
    k: int,
    score_pairs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``scores`` (queries x items) with each query's ``k`` best items re-scored and ranked first.

    Args:
        scores: First-stage scores, e.g. contrastive similarity.
        k: Candidates per query.
        score_pairs: ``(query indices, item indices) -> scores`` of those pairs, e.g. a matching head's.
        rows: bool per query; only these are re-ranked (e.g. texts that describe some image).

    Returns:
        New scores: a query's candidates above all its other items, ordered by ``score_pairs``; the
        other items keep their order below them.
    """
    queries = torch.arange(len(scores)) if rows is None else torch.as_tensor(rows).nonzero().flatten()
    candidates = scores[queries].topk(min(k, scores.shape[1]), dim=1).indices
    query_index = queries.repeat_interleave(candidates.shape[1])
    second = score_pairs(query_index, candidates.flatten()).float()
    reranked = scores.float().clone()
    floor = reranked.max() + 1.0  # every candidate above every first-stage score
    reranked[query_index, candidates.flatten()] = floor + second - second.min()
    return reranked


def _best_relevant_rank(scores: torch.Tensor, hits: torch.Tensor) -> torch.Tensor:
    """Per query (row), how many items score above its best-scoring relevant item (0: a match ranked first)."""
    best_relevant = scores.masked_fill(~hits, float("-inf")).max(dim=1, keepdim=True).values
    return (scores > best_relevant).sum(dim=1)
