"""The text tower of image-text models: open_clip's text transformer over the CLIP BPE vocabulary.

Token ids are zero-padded to the context length. Under causal attention a position's state does not
depend on the positions after it, so a batch cut after its last filled position (:func:`filled_length`)
gives the same states for what it keeps, at the cost of its longest text instead of the context length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from open_clip import transformer
from torch import nn

from pretrainlab.data.text import VOCAB_SIZE, tokenize


class TextTransformer(transformer.TextTransformer):
    """open_clip's causal text transformer, which also reads sequences shorter than its context length.

    open_clip cuts its causal mask to the sequence only when it also masks padding (not in causal mode).
    """

    def _embeds(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, attn_mask = super()._embeds(text)
        if attn_mask is not None and attn_mask.ndim == 2:
            attn_mask = attn_mask[: x.shape[1], : x.shape[1]]
        return x, attn_mask


def filled_length(*ids: torch.Tensor) -> int:
    """One past the last position that any row of ``ids`` (token ids, zero-padded on the last axis) fills;
    at least 1."""
    filled = torch.zeros(ids[0].shape[-1], dtype=torch.bool, device=ids[0].device)
    for tokens in ids:
        filled |= (tokens != 0).reshape(-1, tokens.shape[-1]).any(dim=0)
    return int(filled.nonzero().max()) + 1 if filled.any() else 1


def build_text_tower(
    context_length: int, width: int, layers: int, heads: int, output_dim: int, mlp_ratio: float = 4.0
) -> TextTransformer:
    """The causal text transformer, pooled at the end token and projected to ``output_dim``.

    Raises:
        ValueError: ``width`` is not a multiple of ``heads``.
    """
    if width % heads:
        raise ValueError(f"text width {width} is not a multiple of text heads {heads}")
    return TextTransformer(
        context_length=context_length,
        vocab_size=VOCAB_SIZE,
        width=width,
        heads=heads,
        layers=layers,
        mlp_ratio=mlp_ratio,
        output_dim=output_dim,
    )


@torch.no_grad()
def encode_texts(
    model: nn.Module,
    texts: Sequence[str],
    context_length: int,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``len(texts) x D`` text embeddings, computed ``batch_size`` texts at a time, float32 on the CPU."""
    parts = [
        model.encode_text(torch.from_numpy(tokenize(texts[start : start + batch_size], context_length)).to(device))
        for start in range(0, len(texts), batch_size)
    ]
    if not parts:
        raise ValueError("no texts to encode")
    return torch.cat([p.float().cpu() for p in parts])
