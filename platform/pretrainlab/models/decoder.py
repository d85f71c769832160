"""The multimodal decoder: open_clip's ``MultimodalTransformer``, with the texts of one image attending to it together.

open_clip's decoder pairs text row ``i`` with image row ``i``, so several questions, objects, beams or candidate
answers about one image need that image's tokens repeated once per text, and every cross-attention block
normalises and projects the repeated tokens to keys and values again. Cross-attention lets each query token
attend to the image on its own (no mask, nothing shared between queries), so the texts of one image can instead
be laid side by side as one longer query sequence: the keys and values of each image are computed once, and the
result is the same. Self-attention (causal, within each text) and the MLPs still see one text per row.

The weights, their names and the case without ``owners`` are open_clip's.
"""

from __future__ import annotations

import torch
from open_clip.transformer import MultimodalTransformer


class TextGroups:
    """Lays out text rows (``T x length x width``) as one row per image (``images x slots*length x width``), each
    image's texts side by side in the order they come, and back. ``owners[i]``: the image of text row ``i``."""

    def __init__(self, owners: torch.Tensor, images: int) -> None:
        order = torch.argsort(owners, stable=True)
        counts = torch.bincount(owners, minlength=images)
        first = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(owners)
        slot[order] = torch.arange(len(owners), device=owners.device) - first[owners[order]]
        self.owners, self.slot = owners, slot
        self.images, self.slots = images, int(counts.max()) if len(owners) else 0

    def group(self, texts: torch.Tensor) -> torch.Tensor:
        """``images x slots*length x width``; the slots an image lacks are zeros."""
        length, width = texts.shape[1:]
        grouped = texts.new_zeros(self.images, self.slots, length, width)
        grouped[self.owners, self.slot] = texts
        return grouped.view(self.images, self.slots * length, width)

    def ungroup(self, grouped: torch.Tensor) -> torch.Tensor:
        """The text rows of :meth:`group`'s layout, in their first order."""
        return grouped.view(self.images, self.slots, -1, grouped.shape[-1])[self.owners, self.slot]


class MultimodalDecoder(MultimodalTransformer):
    """Causal self-attention over each text, cross-attention to the tokens of the text's image, per block."""

    def forward(
        self, image_embs: torch.Tensor, text_embs: torch.Tensor, owners: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Decoder states (``T x length x output_dim``) of the text embeddings ``text_embs`` (``T x length x
        width``), text row ``i`` attending to the tokens of image ``owners[i]`` of ``image_embs`` (``images x
        tokens x width``), or to image row ``i`` when ``owners`` is None."""
        if owners is None:
            return super().forward(image_embs, text_embs)
        used, owners = torch.unique(owners, return_inverse=True)  # images without a text get no row of padding
        image_embs = image_embs[used]
        groups = TextGroups(owners, len(used))
        causal = self.attn_mask[: text_embs.shape[1], : text_embs.shape[1]]
        states = text_embs
        for self_attention, cross_attention in zip(self.resblocks, self.cross_attn, strict=True):
            states = self_attention(states, attn_mask=causal)
            states = groups.ungroup(cross_attention(groups.group(states), k_x=image_embs, v_x=image_embs))
        return self.ln_final(states) @ self.text_projection
