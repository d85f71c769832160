"""Texts to token ids and back: the CLIP BPE tokenizer that ships inside open-clip-torch.

Texts are tokenised on the CPU with the images they come with (in the ``Preprocessor``), to
``context_length`` token ids: the start token, the BPE tokens (cut at ``context_length - 2``),
the end token, then zeros. The end token has the largest id of the vocabulary, which is how
the text transformer finds the position it pools.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from open_clip.tokenizer import SimpleTokenizer

VOCAB_SIZE = 49408
"""Token ids of the CLIP BPE vocabulary (including the start and end tokens)."""
_SPACE_BEFORE_PUNCTUATION = re.compile(r" ([,.:;?!'])")


@functools.cache
def tokenizer(context_length: int) -> SimpleTokenizer:
    """The CLIP BPE tokenizer, padding or cutting to ``context_length`` token ids."""
    if context_length < 3:
        raise ValueError(f"context_length must be at least 3 (start, one token, end), got {context_length}")
    return SimpleTokenizer(context_length=context_length)


def tokenize(texts: Sequence[str], context_length: int) -> np.ndarray:
    """int64 ``len(texts) x context_length`` token ids of ``texts``."""
    if isinstance(texts, str):
        raise TypeError("tokenize takes a sequence of texts, not one string")
    return tokenizer(context_length)(list(texts)).numpy().astype(np.int64)


def detokenize(ids: torch.Tensor | np.ndarray | Sequence[int], context_length: int) -> str:
    """The text of one row of token ids, without start, end, padding and location tokens."""
    tok = tokenizer(context_length)
    kept = [int(i) for i in ids if int(i) not in (0, tok.sot_token_id, tok.eot_token_id) and int(i) < VOCAB_SIZE]
    return _SPACE_BEFORE_PUNCTUATION.sub(r"\1", tok.decode(kept).strip())


LOCATION_BINS = 64
"""Location tokens of the decoders that emit boxes: one per bin of a normalised image coordinate."""
FIRST_LOCATION_ID = VOCAB_SIZE
"""Location token ``b`` has id ``FIRST_LOCATION_ID + b``, after the CLIP vocabulary."""
DECODER_VOCAB_SIZE = VOCAB_SIZE + LOCATION_BINS
"""Token ids a decoder reads and writes: the CLIP vocabulary, then the location tokens."""
VQA_PROMPT = "question: {} answer:"
GROUNDING_PROMPT = "{} box:"
"""The prompts before the decoder's answer and box; captions have none."""


def bpe_ids(texts: Sequence[str]) -> list[list[int]]:
    """The CLIP BPE token ids of each text, without start and end tokens."""
    tok = tokenizer(3)
    return [tok.encode(text) for text in texts]


def box_to_tokens(box: Sequence[float], width: float, height: float) -> list[int]:
    """Location token ids of a pixel box ``x1, y1, x2, y2``: each coordinate over the image size, in
    ``LOCATION_BINS`` bins (Pix2Seq). Coordinates outside the image are clipped to it."""
    scale = (width, height, width, height)
    bins = [min(LOCATION_BINS - 1, max(0, int(v / s * LOCATION_BINS))) for v, s in zip(box, scale, strict=True)]
    return [FIRST_LOCATION_ID + b for b in bins]


def tokens_to_box(ids: Sequence[int], width: float, height: float) -> list[float]:
    """The pixel box of four location token ids: the centres of their bins.

    Raises:
        ValueError: not four location tokens.
    """
    bins = [int(i) - FIRST_LOCATION_ID for i in ids]
    if len(bins) != 4 or not all(0 <= b < LOCATION_BINS for b in bins):
        raise ValueError(
            f"a box is 4 location tokens (ids {FIRST_LOCATION_ID}..{DECODER_VOCAB_SIZE - 1}), got {list(ids)}"
        )
    scale = (width, height, width, height)
    return [(b + 0.5) / LOCATION_BINS * s for b, s in zip(bins, scale, strict=True)]


def generated_box(ids: Sequence[int], width: float, height: float) -> list[float]:
    """The pixel box ``x1 <= x2, y1 <= y2`` of the location tokens a decoder wrote (:func:`tokens_to_box`);
    anything but four tokens (a box cut short by the context length) gives the empty box at the origin."""
    if len(ids) != 4:
        return [0.0, 0.0, 0.0, 0.0]
    x1, y1, x2, y2 = tokens_to_box(ids, width, height)
    return [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]


def prompted_sequences(
    prompts: Sequence[list[int]], targets: Sequence[list[int]], context_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Decoder sequences ``start, prompt, target, end, padding`` and where the decoder is taught.

    Args:
        prompts: Token ids of each prompt (may be empty).
        targets: Token ids of each target (text or location tokens).
        context_length: Sequence length; a target that does not fit is cut, its end token kept.

    Returns:
        (int64 ``N x context_length`` ids, bool ``N x context_length`` mask: true at the target's
        tokens and its end token, the positions whose token the decoder learns to predict).

    Raises:
        ValueError: a prompt leaves no room for a target token.
    """
    tok = tokenizer(context_length)
    ids = np.zeros((len(prompts), context_length), dtype=np.int64)
    mask = np.zeros((len(prompts), context_length), dtype=bool)
    for row, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        room = context_length - 2 - len(prompt)
        if room < 1:
            raise ValueError(f"row {row}: a prompt of {len(prompt)} tokens leaves no room in {context_length}")
        sequence = [tok.sot_token_id, *prompt, *target[:room], tok.eot_token_id]
        ids[row, : len(sequence)] = sequence
        mask[row, 1 + len(prompt) : len(sequence)] = True
    return ids, mask


def text_columns(
    batch: dict[str, np.ndarray], context_length: int, rng: np.random.Generator | None, texts_per_image: int = 1
) -> dict:
    """The token columns of a batch of image-text rows, by which annotations the rows carry.

    - ``captions`` (caption and retrieval rows): ``text``, one caption per row; with ``negatives``
      also ``negative_text``, the row's negative at the chosen caption's index (all zeros past its last
      negative). Scenes rows list one negative per caption that has a false variant, in caption order, so
      it is made from that caption or, after a caption without one, from a later caption of the image.
    - ``questions`` (VQA rows): ``sequence`` = ``question: Q answer: A`` and ``target_mask`` on ``A``,
      per question with its most common answer.
    - ``refs`` (grounding rows): ``sequence`` = ``EXPRESSION box:`` then the box's four location tokens
      (see :func:`box_to_tokens`), and ``target_mask`` on them; per object, one of its expressions; and
      ``box``, the object's ``x1, y1, x2, y2`` as fractions of the image's width and height (a box head's target).

    ``sequence`` and ``target_mask`` are ``N x texts_per_image x context_length`` (``box``:
    ``N x texts_per_image x 4``): that many of each image's questions / objects, all zeros in the slots of an
    image that has fewer.

    Args:
        batch: Shard rows as numpy columns (with ``width`` and ``height`` for grounding rows).
        context_length: Tokens per sequence.
        rng: Draws which caption / questions / objects / expressions; None takes the first ones.
        texts_per_image: Questions or objects per image (VQA and grounding rows).
    """

    def pick(items: Sequence) -> int:
        return 0 if rng is None else int(rng.integers(len(items)))

    def some(items: Sequence) -> list:
        count = min(texts_per_image, len(items))
        return list(items[:count]) if rng is None else [items[i] for i in rng.permutation(len(items))[:count]]

    out = {}
    if "captions" in batch:
        chosen = [pick(texts) for texts in batch["captions"]]
        out["text"] = tokenize([texts[i] for texts, i in zip(batch["captions"], chosen, strict=True)], context_length)
        if "negatives" in batch:
            negatives = [negs[i] if i < len(negs) else "" for negs, i in zip(batch["negatives"], chosen, strict=True)]
            out["negative_text"] = tokenize(negatives, context_length)
            out["negative_text"][[not text for text in negatives]] = 0
    if "questions" in batch:
        questions = [some(qs) for qs in batch["questions"]]
        prompts = [bpe_ids([VQA_PROMPT.format(q["question"]) for q in qs]) for qs in questions]
        answers = [bpe_ids([Counter(q["answers"]).most_common(1)[0][0] for q in qs]) for qs in questions]
        out["sequence"], out["target_mask"] = _per_image_sequences(prompts, answers, texts_per_image, context_length)
    if "refs" in batch:
        refs = [some(refs) for refs in batch["refs"]]
        prompts = [
            bpe_ids([GROUNDING_PROMPT.format(ref["expressions"][pick(ref["expressions"])]) for ref in image_refs])
            for image_refs in refs
        ]
        boxes = [
            [box_to_tokens(ref["box"], width, height) for ref in image_refs]
            for image_refs, width, height in zip(refs, batch["width"], batch["height"], strict=True)
        ]
        out["sequence"], out["target_mask"] = _per_image_sequences(prompts, boxes, texts_per_image, context_length)
        out["box"] = np.zeros((len(refs), texts_per_image, 4), dtype=np.float32)
        for image, (image_refs, width, height) in enumerate(zip(refs, batch["width"], batch["height"], strict=True)):
            scale = np.array([width, height, width, height], dtype=np.float32)
            out["box"][image, : len(image_refs)] = [np.clip(np.asarray(ref["box"]) / scale, 0, 1) for ref in image_refs]
    return out


def _per_image_sequences(
    prompts: Sequence[list[list[int]]], targets: Sequence[list[list[int]]], slots: int, context_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`prompted_sequences` of each image's prompts and targets, ``N x slots x context_length``."""
    ids = np.zeros((len(prompts), slots, context_length), dtype=np.int64)
    mask = np.zeros((len(prompts), slots, context_length), dtype=bool)
    for image, (image_prompts, image_targets) in enumerate(zip(prompts, targets, strict=True)):
        count = len(image_prompts)
        ids[image, :count], mask[image, :count] = prompted_sequences(image_prompts, image_targets, context_length)
    return ids, mask
