"""Optimizer construction from the config: timm's optimizer factory over PretrainLab's parameter groups.

Parameter groups follow the usual recipe: norm weights, biases and other 1-D parameters
(and a backbone's own ``no_weight_decay()`` names, such as a ViT's ``pos_embed``) get no
weight decay unless ``optim.decay_norm_and_bias`` is set; with ``optim.layer_decay`` the
backbone's layers (timm's ``group_matcher``) get geometrically smaller learning rates
towards the input. Each group's ``lr_scale`` is folded into its learning rate, so the
schedule scales every group alike.
"""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from pretrainlab.config import ExperimentConfig, OptimConfig

_TIMM_NAMES = {("sgd", True): "sgd", ("sgd", False): "momentum", ("lars", True): "nlars", ("lars", False): "lars"}
_WITH_MOMENTUM = ("sgd", "lars", "rmsprop")
_WITH_BETAS = ("adamw", "adam", "lamb")


def scaled_lr(cfg: ExperimentConfig, world_size: int) -> float:
    """The learning rate training uses: ``optim.lr``, scaled linearly by global batch / ``optim.base_batch_size``.

    The global batch is ``train.batch_size x world_size x train.accumulate_steps``.
    """
    if cfg.optim.base_batch_size is None:
        return cfg.optim.lr
    global_batch = cfg.train.batch_size * world_size * cfg.train.accumulate_steps
    return cfg.optim.lr * global_batch / cfg.optim.base_batch_size


def _no_decay_names(module: nn.Module) -> set[str]:
    no_weight_decay = getattr(module, "no_weight_decay", None)
    return set(no_weight_decay()) if callable(no_weight_decay) else set()


def _head_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """The parameters outside ``model.backbone``, at the full learning rate."""
    rest = [(n, p) for n, p in model.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
    exclude = not cfg.decay_norm_and_bias
    no_decay = [p for n, p in rest if exclude and (p.ndim <= 1 or n.endswith(".bias"))]
    decay = [p for n, p in rest if not (exclude and (p.ndim <= 1 or n.endswith(".bias")))]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def parameter_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Groups of ``model``'s trainable parameters, each with its ``weight_decay`` and ``lr_scale``.

    ``model.backbone`` is grouped by timm (layer-wise when ``cfg.layer_decay`` is set); the
    rest of the model (heads, projectors) trains at the full learning rate.
    """
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"{type(model).__name__} has no backbone module to group parameters by")
    exclude_1d = not cfg.decay_norm_and_bias
    skip = _no_decay_names(backbone) if exclude_1d else set()
    if cfg.layer_decay is not None:
        groups = param_groups_layer_decay(
            backbone, cfg.weight_decay, skip, weight_decay_exclude_1d=exclude_1d, layer_decay=cfg.layer_decay
        )
    else:
        groups = param_groups_weight_decay(
            backbone, cfg.weight_decay, weight_decay_exclude_1d=exclude_1d, no_weight_decay_list=skip
        )
    groups = [g for g in groups if g["params"]]
    return [*groups, *({**g, "lr_scale": 1.0} for g in _head_groups(model, cfg))]


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """``cfg.name`` from timm's factory at learning rate ``lr`` (times each group's ``lr_scale``)."""
    name = _TIMM_NAMES.get((cfg.name, cfg.nesterov and cfg.momentum > 0), cfg.name)
    extra = {"momentum": cfg.momentum} if cfg.name in _WITH_MOMENTUM else {}
    if cfg.name in _WITH_BETAS:
        extra["betas"] = tuple(cfg.betas)
    if cfg.name == "lars":
        extra.update(trust_coeff=cfg.trust_coeff, trust_clip=cfg.trust_clip)
    groups = parameter_groups(model, cfg)
    for group in groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return create_optimizer_v2(groups, opt=name, lr=lr, weight_decay=cfg.weight_decay, **extra)


def apply_hyperparameters(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: OptimConfig, lr: float
) -> None:
    """Make a restored optimizer and schedule follow ``cfg``: lr, weight decay, momentum / betas, LARS trust.

    Restoring a checkpoint brings back the hyperparameters it was trained with; after a PBT
    exploit the trial's config holds new ones. The schedule's position, each group's
    ``lr_scale`` and the groups without weight decay are kept.
    """
    base_lrs = [lr * group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    scheduler.base_lrs = base_lrs
    for group, base_lr, factor in zip(optimizer.param_groups, base_lrs, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * factor(scheduler.last_epoch)
        if group["weight_decay"] > 0:
            group["weight_decay"] = cfg.weight_decay
        if "momentum" in group:
            group["momentum"] = cfg.momentum
        if "betas" in group:
            group["betas"] = tuple(cfg.betas)
        if "trust_coeff" in group:
            group.update(trust_coeff=cfg.trust_coeff, trust_clip=cfg.trust_clip)
