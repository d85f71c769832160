"""The typed ``strategy_params`` of every training strategy, and the table of strategy names.

A config's ``strategy`` is one of ``StrategyName``; its ``strategy_params`` are validated
(unknown keys fail, defaults filled in) against ``STRATEGY_PARAMS[strategy]``. The models live in
:mod:`pretrainlab.strategies`, one module per strategy; this module is the config's view of them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrategyParams(BaseModel):
    """Base of a strategy's ``strategy_params`` model (unknown keys fail)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SimClrParams(StrategyParams):
    """``strategy_params`` of SimCLR."""

    proj_hidden_dim: int = Field(2048, ge=1, description="Width of the projector's hidden layers.")
    proj_dim: int = Field(128, ge=1, description="Width of the embeddings the loss compares.")
    proj_layers: int = Field(2, ge=1, description="Linear layers of the projector.")
    temperature: float = Field(0.1, gt=0, description="Softmax temperature of NT-Xent (0.1-0.5 in the paper).")


class MocoV3Params(StrategyParams):
    """``strategy_params`` of MoCo v3."""

    proj_hidden_dim: int = Field(4096, ge=1, description="Width of the projector's hidden layers.")
    proj_dim: int = Field(256, ge=1, description="Width of the projector's and predictor's outputs.")
    proj_layers: int = Field(3, ge=1, description="Linear layers of the projector (3 in the paper).")
    pred_hidden_dim: int = Field(4096, ge=1, description="Width of the predictor's hidden layer.")
    pred_layers: int = Field(2, ge=1, description="Linear layers of the predictor (2 in the paper).")
    temperature: float = Field(0.2, gt=0, description="Softmax temperature of the contrastive loss.")
    base_momentum: float = Field(
        0.99, ge=0, le=1, description="Momentum of the key encoder at step 0, rising to 1 along a half cosine."
    )


class ByolParams(StrategyParams):
    """BYOL's ``strategy_params`` (the paper: 4096 hidden, 256 out, momentum 0.996 -> 1)."""

    proj_hidden_dim: int = Field(1024, ge=1, description="Hidden width of the projector and the predictor.")
    proj_dim: int = Field(256, ge=1, description="Output width of the projector and the predictor.")
    base_momentum: float = Field(0.99, ge=0, le=1, description="Target momentum at step 0, cosine-ramped to 1.")
    final_momentum: float = Field(1.0, ge=0, le=1, description="Target momentum at the last step.")

    @model_validator(mode="after")
    def _momentum_rises(self) -> ByolParams:
        if self.final_momentum < self.base_momentum:
            raise ValueError(
                f"strategy_params.final_momentum {self.final_momentum} is below base_momentum {self.base_momentum}"
            )
        return self


class SimSiamParams(StrategyParams):
    """SimSiam's ``strategy_params`` (the paper: projector 2048 wide, predictor bottleneck 512)."""

    proj_hidden_dim: int = Field(512, ge=1, description="Hidden width of the projector.")
    proj_dim: int = Field(512, ge=1, description="Output width of the projector and the predictor.")
    pred_hidden_dim: int = Field(128, ge=1, description="The predictor's bottleneck width.")


class BarlowTwinsParams(StrategyParams):
    """Barlow Twins' ``strategy_params`` (the paper: 8192 x 3 projector, lambda 0.0051)."""

    proj_hidden_dim: int = Field(1024, ge=1, description="Hidden width of the projector.")
    proj_dim: int = Field(1024, ge=1, description="Output width of the projector: C is proj_dim x proj_dim.")
    off_diagonal_weight: float | None = Field(
        0.0051, gt=0, description="lambda, the weight of the off-diagonal (redundancy) term; null: 1 / proj_dim."
    )
    loss_scale: float = Field(
        1.0,
        gt=0,
        description="Factor on the whole loss (solo-learn's scale_loss 0.1). Under LARS it changes the steps of the "
        "parameters LARS does not adapt (norms, biases) and where trust_clip caps the others; under SGD it acts "
        "like the lr.",
    )


class DinoParams(StrategyParams):
    """``strategy_params`` of DINO."""

    out_dim: int = Field(4096, ge=2, description="Prototypes: the width of the head's output.")
    hidden_dim: int = Field(2048, ge=1, description="Width of the head's two hidden layers.")
    bottleneck_dim: int = Field(256, ge=1, description="Width of the L2-normalised layer before the prototypes.")
    norm_last_layer: bool = Field(True, description="Keep the prototypes' weight-norm scale fixed at 1.")
    student_temp: float = Field(0.1, gt=0)
    teacher_temp: float = Field(0.07, gt=0, description="Teacher temperature after the warmup.")
    warmup_teacher_temp: float = Field(0.04, gt=0, description="Teacher temperature at the first step.")
    warmup_teacher_temp_fraction: float = Field(
        0.3, ge=0, le=1, description="Fraction of all training steps over which the teacher temperature rises."
    )
    center_momentum: float = Field(0.9, ge=0, lt=1, description="Momentum of the running mean of teacher outputs.")
    base_momentum: float = Field(0.996, ge=0, le=1, description="Teacher momentum at the start; rises to 1.")


class MaeParams(StrategyParams):
    """MAE's decoder and target."""

    decoder_dim: int = Field(64, ge=8, description="Width of the decoder's tokens.")
    decoder_depth: int = Field(2, ge=1, description="Transformer blocks in the decoder.")
    decoder_heads: int = Field(4, ge=1, description="Attention heads per decoder block; must divide decoder_dim.")
    decoder_mlp_ratio: float = Field(4.0, gt=0)
    norm_pix_loss: bool = Field(True, description="Targets are each patch's pixels normalised by its mean and var.")
    norm_pix_eps: float = Field(1e-6, gt=0, description="Added to the patch variance before its square root.")

    @model_validator(mode="after")
    def _decoder_fits(self) -> MaeParams:
        if self.decoder_dim % 4:
            raise ValueError(
                f"strategy_params.decoder_dim {self.decoder_dim} must be a multiple of 4 (2-D sine-cosine positions)"
            )
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(
                f"strategy_params.decoder_heads {self.decoder_heads} must divide decoder_dim {self.decoder_dim}"
            )
        return self


class SimMimParams(StrategyParams):
    """SimMIM has no settings of its own: the mask is ``data.mask``, the head one linear layer."""


class ClipParams(StrategyParams):
    """``strategy_params`` of CLIP."""

    embed_dim: int = Field(256, ge=1, description="Width of the joint image-text embedding space.")
    text_width: int = Field(256, ge=1, description="Width of the text transformer.")
    text_layers: int = Field(4, ge=1, description="Blocks of the text transformer.")
    text_heads: int = Field(4, ge=1, description="Attention heads of the text transformer (divides text_width).")
    init_temperature: float = Field(0.07, gt=0, description="Softmax temperature at the start (learned).")
    max_logit_scale: float = Field(100.0, gt=1, description="Upper bound of 1 / temperature.")
    hard_negatives: bool = Field(
        False,
        description="Rank each image against the batch's hard-negative captions too (NegCLIP); needs a "
        "retrieval dataset with negatives.",
    )
    image_pool: Literal["avg", "attention"] = Field(
        "avg",
        description="'avg': the backbone's own pooling, then a linear projection; 'attention': CLIP's attention "
        "pooling of the feature map (convolutional backbones), which keeps where things are.",
    )
    feature_grid: int = Field(
        3,
        ge=1,
        description="With image_pool attention: the side of the feature map its position embedding is made for "
        "(96-px images through a stride-32 ResNet: 3); maps of another size get it resampled.",
    )


class BlipParams(StrategyParams):
    """``strategy_params`` of the BLIP-style model."""

    embed_dim: int = Field(256, ge=1, description="Width of the joint image-text embedding space.")
    width: int = Field(256, ge=1, description="Width of the text transformer and the decoder.")
    text_layers: int = Field(4, ge=1, description="Blocks of the text transformer.")
    decoder_layers: int = Field(4, ge=1, description="Blocks of the multimodal decoder.")
    heads: int = Field(4, ge=1, description="Attention heads (divides width).")
    init_temperature: float = Field(0.07, gt=0, description="Contrastive softmax temperature at the start (learned).")
    itc_weight: float = Field(1.0, ge=0, description="Weight of the image-text contrastive loss.")
    itm_weight: float = Field(1.0, ge=0, description="Weight of the image-text matching loss.")
    lm_weight: float = Field(1.0, ge=0, description="Weight of the decoder's language-modelling loss.")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Of the language-modelling loss.")
    rank_answers: bool = Field(
        True,
        description="VQA evaluation: also pick each answer from the dataset's answer vocabulary by likelihood.",
    )
    rerank_k: int = Field(
        16, ge=0, description="Retrieval evaluation: candidates per query re-ranked by the matching head (0: none)."
    )
    box_head: bool = Field(
        False,
        description="Grounding: predict boxes with a one-stage box head on the decoder's state (the image cell of "
        "the object's centre, the box regressed from it) instead of four location tokens written by the decoder.",
    )


StrategyName = Literal[
    "supervised", "simclr", "mocov3", "byol", "simsiam", "barlowtwins", "dino", "mae", "simmim", "clip", "blip"
]
"""Every training strategy; each is the module ``pretrainlab.strategies.<name>``."""

STRATEGY_PARAMS: dict[str, type[StrategyParams] | None] = {
    "supervised": None,
    "simclr": SimClrParams,
    "mocov3": MocoV3Params,
    "byol": ByolParams,
    "simsiam": SimSiamParams,
    "barlowtwins": BarlowTwinsParams,
    "dino": DinoParams,
    "mae": MaeParams,
    "simmim": SimMimParams,
    "clip": ClipParams,
    "blip": BlipParams,
}
"""Strategy name -> the model of its ``strategy_params`` (None: it takes none)."""
