"""Inferencers: a model from :func:`get_model` run on images, one result per input.

Each takes a model (or a zoo name / checkpoint source, built with :func:`get_model`) and
is called with one input or a list of inputs (see :mod:`pretrainlab.inference.inputs`),
batched ``batch_size`` at a time; the preprocessing is the model's evaluation
preprocessing, so batched and one-by-one calls give the same results.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pretrainlab.data.catalog import dataset_location
from pretrainlab.data.text import GROUNDING_PROMPT, VQA_PROMPT, bpe_ids, detokenize
from pretrainlab.inference.inputs import ImageInput, as_list, load_image
from pretrainlab.inference.zoo import get_model, model_info
from pretrainlab.models.generation import Hypothesis
from pretrainlab.models.text import encode_texts

ModelSource = nn.Module | str | os.PathLike


class _Inferencer:
    """A model, its :class:`ModelInfo` and its preprocessing; runs it on inputs in batches."""

    def __init__(
        self, model: ModelSource, pretrained: bool | str | os.PathLike = False, device: str | torch.device | None = None
    ) -> None:
        self.model = model if isinstance(model, nn.Module) else get_model(model, pretrained, device)
        self.info = model_info(self.model)
        self.preprocess = self.info.preprocessor()
        self.device = next(self.model.parameters()).device

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def _outputs(self, inputs: ImageInput | Sequence[ImageInput], batch_size: int) -> torch.Tensor:
        """One output row per input, computed ``batch_size`` inputs at a time, as float32 on the CPU."""
        items = as_list(inputs)
        if not items:
            raise ValueError("no inputs given")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        chunks = [
            self._forward(self.preprocess(items[start : start + batch_size], start).to(self.device)).float().cpu()
            for start in range(0, len(items), batch_size)
        ]
        return torch.cat(chunks)


class ImageClassificationInferencer(_Inferencer):
    """Class probabilities of a classification model.

    Each result holds ``pred_scores`` (float32 array of every class's probability),
    ``pred_label`` (int), ``pred_score`` (float), ``pred_class`` (str) and, with ``topk``,
    ``pred_topk``: the ``topk`` best as ``{"label", "score", "class"}`` dicts, best first.
    """

    def __init__(
        self, model: ModelSource, pretrained: bool | str | os.PathLike = False, device: str | torch.device | None = None
    ) -> None:
        super().__init__(model, pretrained, device)
        if self.info.task != "classification":
            raise ValueError(f"{self.info.name} is a {self.info.task} model, not a classification model")

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model({"image": images})["logits"]

    def __call__(
        self, inputs: ImageInput | Sequence[ImageInput], batch_size: int = 8, topk: int | None = None
    ) -> list[dict[str, Any]]:
        scores = self._outputs(inputs, batch_size).softmax(dim=1).numpy()
        return [self._result(row, topk) for row in scores]

    def _result(self, scores: np.ndarray, topk: int | None) -> dict[str, Any]:
        label = int(scores.argmax())
        result = {
            "pred_scores": scores,
            "pred_label": label,
            "pred_score": float(scores[label]),
            "pred_class": self.info.class_names[label],
        }
        if topk is not None:
            best = np.argsort(-scores, kind="stable")[:topk]
            result["pred_topk"] = [
                {"label": int(i), "score": float(scores[i]), "class": self.info.class_names[i]} for i in best
            ]
        return result


class FeatureExtractor(_Inferencer):
    """The backbone's pooled features (before any head), one float32 array per input."""

    def __init__(
        self, model: ModelSource, pretrained: bool | str | os.PathLike = False, device: str | torch.device | None = None
    ) -> None:
        super().__init__(model, pretrained, device)
        if not isinstance(getattr(self.model, "backbone", None), nn.Module):
            raise ValueError(f"{self.info.name}: {type(self.model).__name__} has no backbone to take features from")

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.backbone(images)

    def __call__(self, inputs: ImageInput | Sequence[ImageInput], batch_size: int = 8) -> list[np.ndarray]:
        return list(self.features(inputs, batch_size).numpy())

    def features(self, inputs: ImageInput | Sequence[ImageInput], batch_size: int = 8) -> torch.Tensor:
        """The features as one ``N x D`` tensor."""
        return self._outputs(inputs, batch_size)


class ImageRetrievalInferencer:
    """The gallery images most similar to each query: cosine similarity of backbone features.

    The gallery's features are computed once, at construction. Each result holds
    ``match_score`` (similarities, best first) and ``sample_idx`` (gallery indices) of the
    ``topk`` best matches.

    Args:
        model: As for the other inferencers.
        gallery: The gallery images (inputs of any supported kind).
        batch_size: Gallery images per forward pass.
    """

    def __init__(
        self,
        model: ModelSource,
        gallery: Sequence[ImageInput],
        pretrained: bool | str | os.PathLike = False,
        device: str | torch.device | None = None,
        batch_size: int = 32,
    ) -> None:
        self.extractor = FeatureExtractor(model, pretrained, device)
        self.gallery = F.normalize(self.extractor.features(list(gallery), batch_size), dim=1)

    @classmethod
    def from_split(
        cls,
        model: ModelSource,
        split: str = "train",
        dataset: str | os.PathLike | None = None,
        pretrained: bool | str | os.PathLike = False,
        device: str | torch.device | None = None,
        batch_size: int = 32,
    ) -> ImageRetrievalInferencer:
        """A gallery of a prepared (labelled) dataset split; ``sample_idx`` are row numbers in shard order.

        ``dataset`` is the prepared folder; default: the model's own dataset.
        """
        from pretrainlab.data.dataset import load_split_numpy  # deferred: it imports Ray Data

        extractor = FeatureExtractor(model, pretrained, device)
        folder = dataset if dataset is not None else dataset_location(extractor.info.config)
        images, _ = load_split_numpy(folder, split)
        return cls(extractor.model, list(images.transpose(0, 2, 3, 1)), batch_size=batch_size)

    def __call__(
        self, inputs: ImageInput | Sequence[ImageInput], batch_size: int = 8, topk: int = 5
    ) -> list[dict[str, Any]]:
        queries = F.normalize(self.extractor.features(inputs, batch_size), dim=1)
        scores, indices = (queries @ self.gallery.T).topk(min(topk, len(self.gallery)), dim=1)
        return [{"match_score": s.tolist(), "sample_idx": i.tolist()} for s, i in zip(scores, indices, strict=True)]


class ImageTextInferencer(_Inferencer):
    """Image-text models (CLIP): which of some texts fits each image best (zero-shot classification).

    Each result holds ``scores`` (float32 array, the softmax over ``texts`` of the model's
    logit scale x cosine similarity), ``pred_index``, ``pred_text`` and ``pred_score``. The
    embeddings themselves come from :meth:`encode_images` and :meth:`encode_texts`
    (L2-normalised, so their dot product is the cosine similarity).
    """

    def __init__(
        self, model: ModelSource, pretrained: bool | str | os.PathLike = False, device: str | torch.device | None = None
    ) -> None:
        super().__init__(model, pretrained, device)
        if self.info.task not in ("image_text", "retrieval"):
            raise ValueError(f"{self.info.name} is a {self.info.task} model, not an image-text model")

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def encode_images(self, inputs: ImageInput | Sequence[ImageInput], batch_size: int = 8) -> torch.Tensor:
        """``N x D`` image embeddings."""
        return self._outputs(inputs, batch_size)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """``len(texts) x D`` text embeddings."""
        if isinstance(texts, str) or not texts:
            raise ValueError("texts must be a non-empty list of strings")
        return encode_texts(self.model, texts, self.info.config.data.context_length, batch_size, self.device)

    def __call__(
        self, inputs: ImageInput | Sequence[ImageInput], texts: Sequence[str], batch_size: int = 8
    ) -> list[dict[str, Any]]:
        scale = self.model.logit_scale.exp().item()
        logits = scale * self.encode_images(inputs, batch_size) @ self.encode_texts(texts).T
        probabilities = logits.softmax(dim=1).numpy()
        best = probabilities.argmax(axis=1)
        return [
            {"scores": row, "pred_index": int(i), "pred_text": texts[i], "pred_score": float(row[i])}
            for row, i in zip(probabilities, best, strict=True)
        ]


class _GenerationInferencer(_Inferencer):
    """A generation model (BLIP-style) continuing a prompt per image with beam search."""

    task = ""

    def __init__(
        self, model: ModelSource, pretrained: bool | str | os.PathLike = False, device: str | torch.device | None = None
    ) -> None:
        super().__init__(model, pretrained, device)
        if self.info.task != self.task:
            raise ValueError(f"{self.info.name} is a {self.info.task} model, not a {self.task} model")

    def _generate(
        self,
        inputs: ImageInput | Sequence[ImageInput],
        prompts: Sequence[str] | None,
        batch_size: int,
        max_new_tokens: int,
        num_beams: int,
        length_penalty: float,
    ) -> list[Hypothesis]:
        """The best hypothesis for each input, its prompt (None: start token only) before it."""
        best = []
        for images, prompt_ids in self._prompted_batches(inputs, prompts, batch_size):
            hypotheses = self.model.generate(images, prompt_ids, max_new_tokens, num_beams, length_penalty)
            best += [ranked[0] for ranked in hypotheses]
        return best

    def _prompted_batches(
        self, inputs: ImageInput | Sequence[ImageInput], prompts: Sequence[str] | None, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, list[list[int]]]]:
        """``batch_size`` inputs at a time, preprocessed, with their prompts' ids after the start token (None:
        the start token alone)."""
        items = as_list(inputs)
        if not items:
            raise ValueError("no inputs given")
        if prompts is not None and len(prompts) != len(items):
            raise ValueError(f"{len(prompts)} prompts for {len(items)} images: give one per image")
        start = [self.model.start_id]
        prompt_ids = [start] * len(items) if prompts is None else [start + ids for ids in bpe_ids(prompts)]
        for first in range(0, len(items), batch_size):  # generate and predict_boxes run without gradients
            images = self.preprocess(items[first : first + batch_size], first).to(self.device)
            yield images, prompt_ids[first : first + batch_size]

    def _text(self, hypothesis: Hypothesis) -> str:
        return detokenize(hypothesis.tokens, self.model.context_length)


def _one_per_image(texts: str | Sequence[str], count: int, name: str) -> list[str]:
    """``texts`` as one string per image: a single string applies to every image."""
    if isinstance(texts, str):
        return [texts] * count
    texts = list(texts)
    if len(texts) != count:
        raise ValueError(f"{len(texts)} {name} for {count} images: give one per image, or one for all")
    return texts


class ImageCaptionInferencer(_GenerationInferencer):
    """Captions written by the decoder. Each result holds ``pred_caption`` and its ``score`` (mean log-probability
    per token with ``length_penalty`` 1)."""

    task = "caption"

    def __call__(
        self,
        inputs: ImageInput | Sequence[ImageInput],
        batch_size: int = 8,
        num_beams: int = 3,
        max_new_tokens: int = 40,
        length_penalty: float = 1.0,
    ) -> list[dict[str, Any]]:
        best = self._generate(inputs, None, batch_size, max_new_tokens, num_beams, length_penalty)
        return [{"pred_caption": self._text(h), "score": h.score} for h in best]


class VisualQuestionAnsweringInferencer(_GenerationInferencer):
    """Answers to questions about images, generated by the decoder (open vocabulary). Each result holds
    ``question``, ``pred_answer`` and its ``score``."""

    task = "vqa"

    def __call__(
        self,
        inputs: ImageInput | Sequence[ImageInput],
        questions: str | Sequence[str],
        batch_size: int = 8,
        num_beams: int = 1,
        max_new_tokens: int = 8,
        length_penalty: float = 1.0,
    ) -> list[dict[str, Any]]:
        questions = _one_per_image(questions, len(as_list(inputs)), "questions")
        prompts = [VQA_PROMPT.format(q) for q in questions]
        best = self._generate(inputs, prompts, batch_size, max_new_tokens, num_beams, length_penalty)
        return [
            {"question": q, "pred_answer": self._text(h), "score": h.score}
            for q, h in zip(questions, best, strict=True)
        ]


class VisualGroundingInferencer(_GenerationInferencer):
    """The box of the object a referring expression names: four location tokens written by the decoder, or the
    box head's box (``strategy_params.box_head``).

    Each result holds ``text``, ``pred_bbox`` (``[x1, y1, x2, y2]`` in the input image's own pixels) and its
    ``score`` (see ``predict_boxes`` of the model).
    """

    task = "grounding"

    def __call__(
        self,
        inputs: ImageInput | Sequence[ImageInput],
        texts: str | Sequence[str],
        batch_size: int = 8,
        num_beams: int = 1,
    ) -> list[dict[str, Any]]:
        items = as_list(inputs)
        texts = _one_per_image(texts, len(items), "texts")
        pixels = [load_image(item, self.info.in_chans, i) for i, item in enumerate(items)]
        arrays = [p.permute(1, 2, 0).numpy() for p in pixels]
        sizes = [p.shape[1:] for p in pixels]
        prompts = [GROUNDING_PROMPT.format(text) for text in texts]
        found = []
        for images, prompt_ids in self._prompted_batches(arrays, prompts, batch_size):
            found += self.model.predict_boxes(images, prompt_ids, num_beams)
        return [
            {"text": text, "pred_bbox": [v * s for v, s in zip(box, (width, height) * 2, strict=True)], "score": score}
            for text, (height, width), (box, score) in zip(texts, sizes, found, strict=True)
        ]


TASK_INFERENCERS: dict[str, type[_Inferencer]] = {
    "classification": ImageClassificationInferencer,
    "embedding": FeatureExtractor,
    "image_text": ImageTextInferencer,
    "retrieval": ImageTextInferencer,
    "caption": ImageCaptionInferencer,
    "vqa": VisualQuestionAnsweringInferencer,
    "grounding": VisualGroundingInferencer,
}
"""The inferencer that ``inference_model`` runs for each task."""


def inferencer_for(task: str) -> type[_Inferencer]:
    """The inferencer class of ``task``."""
    try:
        return TASK_INFERENCERS[task]
    except KeyError:
        raise ValueError(
            f"no inferencer for {task!r} models yet (tasks with one: {', '.join(TASK_INFERENCERS)}); "
            "FeatureExtractor and ImageRetrievalInferencer work with any model that has a backbone"
        ) from None
