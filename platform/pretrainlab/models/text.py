"""The text tower of image-text models: open_clip's text transformer over the CLIP BPE vocabulary."""

from __future__ import annotations

from open_clip.transformer import TextTransformer

from pretrainlab.data.text import VOCAB_SIZE


def build_text_tower(
    context_length: int, width: int, layers: int, heads: int, output_dim: int, mlp_ratio: float = 4.0
) -> TextTransformer:
    """open_clip's causal text transformer, pooled at the end token and projected to ``output_dim``.

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
