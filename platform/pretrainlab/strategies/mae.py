"""MAE (He et al., 2022): a ViT encodes the visible patches only, a light decoder predicts the masked pixels.

    strategy: mae
    strategy_params: {decoder_dim: 64, decoder_depth: 2, decoder_heads: 4, norm_pix_loss: true}
    data:
      mask: {kind: random, ratio: 0.75, patch_size: 4}   # patch_size = the ViT's patch size

The encoder is ``backbone``, a headless timm ``VisionTransformer``: patch embedding, position
embedding, then only the unmasked tokens (with the class token) through its blocks and norm. The
decoder embeds them to ``decoder_dim``, puts a shared mask token at every masked position, adds
fixed 2-D sine-cosine positions, runs ``decoder_depth`` transformer blocks and predicts each
patch's pixels. The loss is the mean squared error on the masked patches only, against the
patch's pixels normalised by their own mean and variance (``norm_pix_loss``) or the pixels as they are.

The patch helpers here (:func:`patchify`, :func:`unpatchify`, :func:`check_vit_masking`...) are
shared with :mod:`pretrainlab.strategies.simmim`.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from pretrainlab.config import ExperimentConfig
from pretrainlab.models.init import build_backbone
from pretrainlab.models.interop import LoadReport
from pretrainlab.strategy_params import MaeParams

TASK = "embedding"
DATASET_TASKS = ("classification",)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``N x C x H x W`` images to ``N x L x (p * p * C)`` patches, in the ViT's token order (rows, then columns)."""
    n, c, h, w = images.shape
    p = patch_size
    x = images.reshape(n, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int) -> torch.Tensor:
    """The inverse of :func:`patchify`: ``N x L x (p * p * C)`` patches on a ``grid`` to ``N x C x H x W`` images."""
    n = patches.shape[0]
    rows, cols = grid
    p = patch_size
    x = patches.reshape(n, rows, cols, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(n, channels, rows * p, cols * p)


def fill_masked(images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``images`` with each masked patch (``mask``: N x h x w, True = masked) replaced by its ``pred`` patch."""
    patches = torch.where(mask.flatten(1).unsqueeze(-1), pred, patchify(images, patch_size))
    return unpatchify(patches, patch_size, tuple(mask.shape[1:]), images.shape[1])


def normalized_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each patch as ``(x - mean) / sqrt(var + eps)`` over its own values (biased variance): MAE's norm_pix targets."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, unbiased=False, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def masked_mse_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum_{masked patches i} mean_d (pred_id - target_id)^2 / #masked``: the squared error of masked patches only.

    Args:
        pred, target: ``N x L x D`` patches.
        mask: ``N x L`` bool, True where the patch was masked.
    """
    per_patch = (pred - target).pow(2).mean(dim=-1)
    weight = mask.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum().clamp_min(1)


def visible_indices(mask: torch.Tensor) -> torch.Tensor:
    """``N x K`` positions of the unmasked patches of each row of an ``N x L`` mask, ascending.

    Raises:
        ValueError: Rows keep different numbers of patches.
    """
    kept = (~mask).sum(dim=1)
    if (kept != kept[0]).any():
        raise ValueError(f"mask: every image must keep as many patches visible; got {sorted(set(kept.tolist()))}")
    return (~mask).nonzero()[:, 1].reshape(mask.shape[0], int(kept[0]))


def select_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The ``N x K x D`` tokens at ``indices`` (``N x K``) of ``N x L x D`` tokens."""
    return tokens.gather(1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def place_tokens(tokens: torch.Tensor, indices: torch.Tensor, filler: torch.Tensor, length: int) -> torch.Tensor:
    """``N x length x D`` tokens: ``tokens`` (``N x K x D``) at ``indices``, the ``filler`` (``D``) everywhere else."""
    n, _, d = tokens.shape
    full = filler.reshape(1, 1, d).expand(n, length, d).to(tokens.dtype)
    return full.scatter(1, indices.unsqueeze(-1).expand(-1, -1, d), tokens)


def sincos_2d(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """``rows * cols x dim`` fixed position embeddings: sin and cos of the row, then of the column, at dim/4 rates.

    ``dim`` must be a multiple of 4.
    """
    rates = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij"
    )
    angles_r = rows.reshape(-1, 1) * rates
    angles_c = cols.reshape(-1, 1) * rates
    return torch.cat([angles_r.sin(), angles_r.cos(), angles_c.sin(), angles_c.cos()], dim=1).float()


def vit_patch_size(backbone: nn.Module) -> int:
    """The square patch size of a timm ViT's patch embedding."""
    height, width = backbone.patch_embed.patch_size
    if height != width:
        raise ValueError(
            f"model.backbone_kwargs.patch_size: masked image modelling needs square patches, got {height}x{width}"
        )
    return height


def check_vit_masking(cfg: ExperimentConfig, backbone: nn.Module, method: str) -> None:
    """Raise a ``ValueError`` naming the config key unless ``backbone`` is a timm ViT and ``data.mask`` fits it."""
    if not isinstance(backbone, VisionTransformer) or backbone.pos_embed is None:
        raise ValueError(
            f"model.backbone: {method} needs a timm VisionTransformer with a learned position embedding, "
            f"got {cfg.model.backbone!r} ({type(backbone).__name__})"
        )
    if cfg.data.views:
        raise ValueError(f"data.views: {method} trains on one image per row (data.train_pipeline); remove data.views")
    if cfg.data.mask is None:
        raise ValueError(f"data.mask: {method} needs patch masks, e.g. {{kind: random, ratio: 0.75, patch_size: 4}}")
    patch = vit_patch_size(backbone)
    if cfg.data.mask.patch_size != patch:
        raise ValueError(
            f"data.mask.patch_size {cfg.data.mask.patch_size} must equal the ViT's patch size "
            f"(model.backbone_kwargs.patch_size) {patch}"
        )
    crop = _pipeline_size(cfg.data.train_pipeline)
    if crop is not None and crop != tuple(backbone.patch_embed.img_size):
        raise ValueError(
            f"data.train_pipeline makes {crop[0]}x{crop[1]} images but the ViT takes "
            f"{backbone.patch_embed.img_size[0]}x{backbone.patch_embed.img_size[1]} (model.backbone_kwargs.img_size)"
        )


def _pipeline_size(pipeline: list[dict]) -> tuple[int, int] | None:
    """The image size set by the last resizing or cropping op of a pipeline, if any."""
    sizes = [op["size"] for op in pipeline if op.get("type") in _SIZED_OPS and "size" in op]
    if not sizes:
        return None
    size = sizes[-1]
    return (size, size) if isinstance(size, int) else (size[0], size[-1])


_SIZED_OPS = ("RandomResizedCrop", "RandomCrop", "CenterCrop", "Resize")


def check_batch(backbone: VisionTransformer, images: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise a ``ValueError`` naming the config key when the images or the mask do not fit the ViT."""
    expected = tuple(backbone.patch_embed.img_size)
    if tuple(images.shape[-2:]) != expected:
        raise ValueError(
            f"model.backbone_kwargs.img_size: the ViT takes {expected[0]}x{expected[1]} images, the batch holds "
            f"{images.shape[-2]}x{images.shape[-1]}"
        )
    grid = tuple(backbone.patch_embed.grid_size)
    if tuple(mask.shape[1:]) != grid:
        raise ValueError(
            f"data.mask.patch_size: the masks are {tuple(mask.shape[1:])} patches, the ViT's grid is {grid}"
        )


def embed_patches(backbone: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """The patch embeddings ``N x L x D``, in row-major grid order (flattened where timm keeps ``N x h x w x D``)."""
    tokens = backbone.patch_embed(images)
    return tokens.flatten(1, 2) if tokens.ndim == 4 else tokens


def prefix_tokens(backbone: VisionTransformer, count: int) -> torch.Tensor:
    """The class (and register) tokens, with their own position embeddings, for ``count`` images: ``N x P x D``."""
    tokens = [t for t in (backbone.cls_token, backbone.reg_token) if t is not None]
    if not tokens:
        return backbone.pos_embed.new_zeros(count, 0, backbone.embed_dim)
    prefix = torch.cat(tokens, dim=1)
    if not backbone.no_embed_class:
        prefix = prefix + backbone.pos_embed[:, : prefix.shape[1]]
    return prefix.expand(count, -1, -1)


def patch_positions(backbone: VisionTransformer) -> torch.Tensor:
    """The position embeddings of the patch tokens (those of the prefix tokens left out): ``1 x L x D``."""
    return backbone.pos_embed if backbone.no_embed_class else backbone.pos_embed[:, backbone.num_prefix_tokens :]


def encode_tokens(backbone: VisionTransformer, prefix: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """The ViT's blocks and final norm on ``[prefix; patches]`` tokens (position embeddings already added)."""
    x = backbone.pos_drop(torch.cat([prefix, patches], dim=1))
    x = backbone.norm_pre(x)
    return backbone.norm(backbone.blocks(x))


class MaeDecoder(nn.Module):
    """Encoder tokens to ``decoder_dim``, mask tokens at the masked positions, blocks, then pixels per patch."""

    def __init__(self, encoder_dim: int, grid: tuple[int, int], patch_pixels: int, params: MaeParams) -> None:
        super().__init__()
        self.grid = grid
        self.embed = nn.Linear(encoder_dim, params.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(params.decoder_dim))
        self.register_buffer("pos_embed", sincos_2d(grid, params.decoder_dim).unsqueeze(0), persistent=False)
        self.blocks = nn.Sequential(
            *(
                Block(params.decoder_dim, params.decoder_heads, params.decoder_mlp_ratio, qkv_bias=True)
                for _ in range(params.decoder_depth)
            )
        )
        self.norm = nn.LayerNorm(params.decoder_dim)
        self.pred = nn.Linear(params.decoder_dim, patch_pixels)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, prefix: torch.Tensor, visible: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``N x L x patch_pixels`` predictions from encoded prefix tokens and visible tokens at ``indices``."""
        num_prefix = prefix.shape[1]
        patches = place_tokens(self.embed(visible), indices, self.mask_token, self.grid[0] * self.grid[1])
        x = torch.cat([self.embed(prefix), patches + self.pos_embed], dim=1)
        x = self.norm(self.blocks(x))
        return self.pred(x[:, num_prefix:])


class MAE(nn.Module):
    """``backbone`` (the kept ViT encoder) + :class:`MaeDecoder`; ``forward`` returns the masked-patch loss."""

    init_report: LoadReport | None = None

    def __init__(self, backbone: VisionTransformer, params: MaeParams, in_chans: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.patch_size = vit_patch_size(backbone)
        self.norm_pix_loss = params.norm_pix_loss
        self.norm_pix_eps = params.norm_pix_eps
        grid = tuple(backbone.patch_embed.grid_size)
        self.decoder = MaeDecoder(backbone.embed_dim, grid, self.patch_size**2 * in_chans, params)

    def encode_visible(self, images: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder on the patches at ``indices`` only: ``(prefix tokens N x P x D, visible tokens N x K x D)``."""
        patches = embed_patches(self.backbone, images) + patch_positions(self.backbone)
        prefix = prefix_tokens(self.backbone, images.shape[0])
        x = encode_tokens(self.backbone, prefix, select_tokens(patches, indices))
        return x[:, : prefix.shape[1]], x[:, prefix.shape[1] :]

    def predict(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predicted pixels of every patch, ``N x L x (p * p * C)``, in the target's space (normalised or not)."""
        check_batch(self.backbone, images, mask)
        indices = visible_indices(mask.flatten(1))
        prefix, visible = self.encode_visible(images, indices)
        return self.decoder(prefix, visible, indices)

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """The patches the decoder learns to predict: normalised per patch with ``norm_pix_loss``, else as they are."""
        patches = patchify(images, self.patch_size)
        return normalized_patches(patches, self.norm_pix_eps) if self.norm_pix_loss else patches

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, mask = batch["image"], batch["mask"]
        pred = self.predict(images, mask)
        loss = masked_mse_loss(pred, self.targets(images), mask.flatten(1))
        return {"loss": loss}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Images whose masked patches are the model's predictions and visible patches the input's.

        With ``norm_pix_loss`` the predictions are mapped back with each input patch's own mean and variance.
        """
        pred = self.predict(images, mask)
        patches = patchify(images, self.patch_size)
        if self.norm_pix_loss:
            mean = patches.mean(dim=-1, keepdim=True)
            std = (patches.var(dim=-1, unbiased=False, keepdim=True) + self.norm_pix_eps).sqrt()
            pred = pred * std + mean
        return fill_masked(images, pred, mask, self.patch_size)


def check_dataset(cfg: ExperimentConfig, info: dict) -> None:
    """Any classification dataset will do (its labels only serve evaluation): nothing to check."""


def build_model(cfg: ExperimentConfig, num_classes: int, in_chans: int, load_init_from: bool = True) -> MAE:
    """MAE on ``cfg.model``'s ViT (``num_classes`` unused: no labels).

    Raises:
        ValueError: The backbone is not a timm ViT, or ``data.mask`` / ``data.views`` / the crop size do not fit it.
    """
    params = MaeParams.model_validate(cfg.strategy_params)
    backbone, init_report = build_backbone(cfg, in_chans, load_init_from)
    check_vit_masking(cfg, backbone, "mae")
    model = MAE(backbone, params, in_chans)
    model.init_report = init_report
    return model
