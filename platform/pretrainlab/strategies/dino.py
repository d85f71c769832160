"""DINO: self-distillation with no labels, with multi-crop (Caron et al., 2021).

A student (backbone + DINO head) learns to match, on every crop of an image, the centred and
sharpened output of a teacher on the image's two global crops. The teacher is a momentum copy
of the student (not trained by gradients); centring with a running mean of its outputs and a
low teacher temperature together keep it from collapsing.

Config: ``data.views`` lists the global crop kind first (``count: 2``), then the local crop kinds
(any count, smaller crops); batches hold ``view0``, ``view1`` (global) and ``view2``... (local).
A ViT takes the smaller local crops with ``model.backbone_kwargs.dynamic_img_size: true``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from pretrainlab.config import ExperimentConfig
from pretrainlab.distributed import all_reduce_mean
from pretrainlab.models.backbones import feature_dim
from pretrainlab.models.init import build_backbone
from pretrainlab.models.interop import LoadReport
from pretrainlab.strategies.common import cosine_momentum, frozen_copy, momentum_update
from pretrainlab.strategy_params import DinoParams

TASK = "embedding"
DATASET_TASKS = ("classification",)

NUM_GLOBAL_VIEWS = 2
"""Global crops per image: the teacher sees these, the student sees them and the local crops."""


def dino_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """Cross-entropy of the centred, sharpened teacher and the student, over pairs of different crops.

    ``L = 1/P sum_{i, j != i} mean_n [ -sum_k softmax((t_i - c) / teacher_temp)_k log_softmax(s_j / student_temp)_k ]``
    where ``t_i`` (``teacher_logits[i]``, ``V_t x N x K``) is the teacher on global crop ``i``, ``s_j``
    (``student_logits[j]``, ``V_s x N x K``, the global crops first) the student on crop ``j``, ``c`` the
    centre (``1 x K``) and ``P = V_t (V_s - 1)`` the number of pairs. No gradient flows into the teacher.
    """
    targets = F.softmax((teacher_logits.detach() - center) / teacher_temp, dim=-1)
    log_probs = F.log_softmax(student_logits / student_temp, dim=-1)
    cross = -torch.einsum("ink,jnk->ijn", targets, log_probs).mean(dim=-1)
    same_crop = torch.eye(*cross.shape, dtype=torch.bool, device=cross.device)
    return cross[~same_crop].mean()


@torch.no_grad()
def updated_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float) -> torch.Tensor:
    """``momentum * center + (1 - momentum) * mean of teacher_logits`` over crops and the global batch (all workers).

    Workers must hold batches of the same size; every worker gets the same result.
    """
    batch_mean = all_reduce_mean(teacher_logits.reshape(-1, teacher_logits.shape[-1]).mean(dim=0, keepdim=True))
    return center * momentum + batch_mean * (1 - momentum)


def teacher_temperature(step: int, total_steps: int, warmup_temp: float, final_temp: float, fraction: float) -> float:
    """Linear from ``warmup_temp`` at step 0 to ``final_temp`` at ``fraction * total_steps``, then constant."""
    warmup_steps = fraction * total_steps
    if step >= warmup_steps:
        return final_temp
    return warmup_temp + (final_temp - warmup_temp) * step / warmup_steps


class DINOHead(nn.Module):
    """MLP (Linear-GELU-Linear-GELU-Linear) to a bottleneck, L2 normalisation, then weight-normalised prototypes.

    With ``norm_last_layer`` the prototypes' scale (weight norm's ``g``) stays 1, so the output
    is the cosine similarity of the bottleneck vector to each prototype.
    """

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int, norm_last_layer: bool = True
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        scale = self.last_layer.parametrizations.weight.original0
        nn.init.ones_(scale)
        scale.requires_grad_(not norm_last_layer)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(features), dim=-1))


def embed_crops(backbone: nn.Module, head: nn.Module, crops: list[torch.Tensor]) -> torch.Tensor:
    """``V x N x K`` head outputs of ``V`` crops; consecutive crops of one size share a backbone pass."""
    features, run = [], [crops[0]]
    for crop in crops[1:]:
        if crop.shape == run[0].shape:
            run.append(crop)
        else:
            features.append(backbone(torch.cat(run)))
            run = [crop]
    features.append(backbone(torch.cat(run)))
    return head(torch.cat(features)).unflatten(0, (len(crops), -1))


def without_drop_path(module: nn.Module) -> nn.Module:
    """``module`` with every stochastic-depth layer turned off, in place (DINO's teacher has none)."""
    for layer in module.modules():
        if isinstance(layer, DropPath):
            layer.drop_prob = 0.0
    return module


@torch.no_grad()
def teacher_entropy(teacher_logits: torch.Tensor, center: torch.Tensor, temp: float) -> float:
    """Mean entropy of the teacher's targets (nats): ``log K`` when uniform, 0 when one-hot."""
    log_probs = F.log_softmax((teacher_logits - center) / temp, dim=-1)
    return float(-(log_probs.exp() * log_probs).sum(dim=-1).mean())


class DINO(nn.Module):
    """Student (``backbone`` + ``head``) and momentum teacher (``teacher_backbone`` + ``teacher_head``).

    ``forward`` (training) updates the centre; ``after_step`` moves the teacher towards the
    student and sets the teacher temperature for the next step. The centre and the current
    teacher temperature are buffers, so checkpoints keep them.
    """

    init_report: LoadReport | None = None

    def __init__(self, backbone: nn.Module, head: DINOHead, num_views: int, params: DinoParams) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.teacher_backbone = without_drop_path(frozen_copy(backbone))
        self.teacher_head = frozen_copy(head)
        self.num_views = num_views
        self.params = params
        self.register_buffer("center", torch.zeros(1, params.out_dim))
        self.register_buffer("teacher_temp", torch.tensor(params.warmup_teacher_temp))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        crops = [batch[f"view{i}"] for i in range(self.num_views)]
        student = embed_crops(self.backbone, self.head, crops).float()
        with torch.no_grad():
            teacher = embed_crops(self.teacher_backbone, self.teacher_head, crops[:NUM_GLOBAL_VIEWS]).float()
        temp = float(self.teacher_temp)
        out = {
            "loss": dino_loss(student, teacher, self.center, self.params.student_temp, temp),
            "log/teacher_temp": temp,
            "log/teacher_entropy": teacher_entropy(teacher, self.center, temp),
        }
        if self.training:
            self.center.copy_(updated_center(self.center, teacher, self.params.center_momentum))
        return out

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int | None) -> None:
        """Teacher = m * teacher + (1 - m) * student, m on a cosine from ``base_momentum`` to 1; next temperature.

        Without ``total_steps`` the schedules cannot be placed: m stays at ``base_momentum`` and the
        teacher temperature at ``teacher_temp``.
        """
        p = self.params
        if total_steps is None:
            momentum, temp = p.base_momentum, p.teacher_temp
        else:
            momentum = cosine_momentum(step, total_steps, p.base_momentum, 1.0)
            temp = teacher_temperature(
                step, total_steps, p.warmup_teacher_temp, p.teacher_temp, p.warmup_teacher_temp_fraction
            )
        momentum_update(self.backbone, self.teacher_backbone, momentum)
        momentum_update(self.head, self.teacher_head, momentum)
        self.teacher_temp.fill_(temp)


def check_views(cfg: ExperimentConfig) -> int:
    """The number of crops per image; raises ``ValueError`` unless ``data.views`` starts with 2 global crops."""
    views = cfg.data.views
    if not views or views[0].count != NUM_GLOBAL_VIEWS:
        got = [v.count for v in views] or "none"
        raise ValueError(
            f"data.views: dino needs the global crop kind first with count {NUM_GLOBAL_VIEWS}, then the local "
            f"crop kinds; got counts {got}"
        )
    return sum(v.count for v in views)


def check_local_crops_fit(backbone: nn.Module, num_views: int) -> None:
    """Raises ``ValueError`` when a fixed-size ViT would be given the smaller local crops."""
    if (
        num_views > NUM_GLOBAL_VIEWS
        and hasattr(backbone, "patch_embed")
        and not getattr(backbone, "dynamic_img_size", False)
    ):
        raise ValueError(
            "model.backbone_kwargs.dynamic_img_size: dino's local crops are smaller than the global ones; "
            "set it true so that the ViT takes them"
        )


def check_dataset(cfg: ExperimentConfig, info: dict) -> None:
    """Any classification dataset will do (its labels only serve evaluation): nothing to check."""


def build_model(cfg: ExperimentConfig, num_classes: int, in_chans: int, load_init_from: bool = True) -> DINO:
    """DINO on ``cfg.model``'s backbone; ``num_classes`` is unused (no labels).

    Raises:
        ValueError: ``data.views`` is not 2 global crops then local ones, or a ViT cannot take the local crops.
        InteropError: ``model.init_from`` cannot be read or does not fit the backbone.
    """
    params = DinoParams.model_validate(cfg.strategy_params)
    num_views = check_views(cfg)
    backbone, init_report = build_backbone(cfg, in_chans, load_init_from)
    check_local_crops_fit(backbone, num_views)
    head = DINOHead(
        feature_dim(backbone), params.out_dim, params.hidden_dim, params.bottleneck_dim, params.norm_last_layer
    )
    model = DINO(backbone, head, num_views, params)
    model.init_report = init_report
    return model
