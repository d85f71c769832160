"""Texts to token ids and back: the CLIP BPE tokenizer that ships inside open-clip-torch.

Texts are tokenised on the CPU with the images they come with (in the ``Preprocessor``), to
``context_length`` token ids: the start token, the BPE tokens (cut at ``context_length - 2``),
the end token, then zeros. The end token has the largest id of the vocabulary, which is how
the text transformer finds the position it pools.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from open_clip.tokenizer import SimpleTokenizer

VOCAB_SIZE = 49408
"""Token ids of the CLIP BPE vocabulary (including the start and end tokens)."""


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
    """The text of one row of token ids, without start, end and padding tokens."""
    tok = tokenizer(context_length)
    kept = [int(i) for i in ids if int(i) not in (0, tok.sot_token_id, tok.eot_token_id)]
    return tok.decode(kept).strip()
