"""Start a backbone from pretrained weights (``model.init_from``): fine-tuning.

    model:
      backbone: mobilenetv2_100
      init_from: {source: torchvision, path: weights/mobilenet_v2-b0353104.pth}

``source: pretrainlab`` takes the ``backbone.*`` weights of a PretrainLab checkpoint: a folder,
``runs:/RUN_ID/checkpoint``, ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``; the head is not
loaded, since fine-tuning usually changes the classes. With ``scope: model`` every weight the new
model shares with the checkpoint is loaded (:func:`initialize_model`): a BLIP model trained on one
task goes on to another with its encoders and decoder. ``torchvision`` / ``timm`` read a state dict
file with :func:`pretrainlab.models.interop.load_pretrained_backbone`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pretrainlab.checkpoint import CheckpointError, LoadedCheckpoint, fetch_checkpoint, load_checkpoint
from pretrainlab.config import ExperimentConfig, InitFromConfig
from pretrainlab.models.backbones import create_backbone
from pretrainlab.models.interop import InteropError, LoadReport, load_into_backbone, load_pretrained_backbone
from pretrainlab.paths import MLFLOW_SCHEMES, resolve

CONFIG_KEY = "model.init_from.path"
BACKBONE_PREFIX = "backbone."


def initialize_backbone(backbone: nn.Module, init_from: InitFromConfig, tracking_uri: str | None = None) -> LoadReport:
    """Load the weights ``init_from`` names into ``backbone``, in place, and report what each key did.

    Args:
        backbone: A headless timm backbone, e.g. ``ImageClassifier.backbone``.
        init_from: The ``model.init_from`` section; a relative path is relative to ``PRETRAINLAB_HOME``.
        tracking_uri: MLflow store for ``runs:/`` / ``models:/`` paths (default: ``$MLFLOW_TRACKING_URI``,
            else the project's).

    Raises:
        InteropError: The path is missing or unreadable, is not a checkpoint, or (``strict``) its weights
            do not fit the backbone; the message starts with ``model.init_from.path`` and lists the keys.
    """
    init_from = _resolved(init_from)
    try:
        if init_from.source == "pretrainlab":
            return _load_pretrainlab_backbone(backbone, init_from, tracking_uri)
        return load_pretrained_backbone(backbone, init_from.path, init_from.source, init_from.strict)
    except (InteropError, CheckpointError) as err:
        raise InteropError(f"{CONFIG_KEY}: {err}", getattr(err, "report", None)) from None


def initialize_model(model: nn.Module, init_from: InitFromConfig, tracking_uri: str | None = None) -> LoadReport:
    """Load every weight ``model`` shares with the PretrainLab checkpoint ``init_from`` names (``scope: model``).

    The checkpoint's tensors the model lacks (the heads of the task it was trained on) are dropped and listed;
    ``strict`` fails unless every tensor of ``model`` comes from the checkpoint with its shape.

    Raises:
        InteropError: As :func:`initialize_backbone`.
    """
    init_from = _resolved(init_from)
    try:
        checkpoint = _fetch(init_from, tracking_uri)
        own = model.state_dict()
        report = _report(checkpoint, init_from)
        report.dropped_head = sorted(k for k in checkpoint.weights if k not in own)
        report.notes.append(
            "scope model: every weight the model shares with the checkpoint is loaded; the checkpoint's other "
            f"tensors are dropped (strategy {checkpoint.meta.get('strategy', '?')})"
        )
        shared = {k: v for k, v in checkpoint.weights.items() if k in own}
        return load_into_backbone(model, shared, report, init_from.strict)
    except (InteropError, CheckpointError) as err:
        raise InteropError(f"{CONFIG_KEY}: {err}", getattr(err, "report", None)) from None


def _resolved(init_from: InitFromConfig) -> InitFromConfig:
    """``init_from`` with a relative folder or file made relative to ``PRETRAINLAB_HOME``."""
    if init_from.path.startswith(MLFLOW_SCHEMES):
        return init_from
    return init_from.model_copy(update={"path": resolve(init_from.path)})


def _fetch(init_from: InitFromConfig, tracking_uri: str | None) -> LoadedCheckpoint:
    """The checkpoint ``init_from.path`` names, downloaded first when it is an MLflow URI."""
    return load_checkpoint(fetch_checkpoint(init_from.path, tracking_uri))


def _report(checkpoint: LoadedCheckpoint, init_from: InitFromConfig) -> LoadReport:
    report = LoadReport(checkpoint.path, "pretrainlab", _checkpoint_backbone_name(checkpoint))
    if Path(init_from.path) != checkpoint.path:
        report.notes.append(f"{init_from.path} fetched to {checkpoint.path}")
    return report


def _load_pretrainlab_backbone(backbone: nn.Module, init_from: InitFromConfig, tracking_uri: str | None) -> LoadReport:
    """The ``backbone.*`` weights of a PretrainLab checkpoint, loaded into ``backbone``."""
    checkpoint = _fetch(init_from, tracking_uri)
    weights = _backbone_weights(checkpoint)
    report = _report(checkpoint, init_from)
    report.dropped_head = sorted(k for k in checkpoint.weights if not k.startswith(BACKBONE_PREFIX))
    report.notes.append(
        "only backbone.* weights are loaded: the head starts freshly initialised, as fine-tuning usually changes "
        f"the classes (the checkpoint was trained for {checkpoint.meta.get('num_classes', '?')} classes)"
    )
    return load_into_backbone(backbone, weights, report, init_from.strict)


def _backbone_weights(checkpoint: LoadedCheckpoint) -> dict[str, torch.Tensor]:
    """The checkpoint's ``backbone.*`` tensors under the backbone's own names."""
    weights = {
        k.removeprefix(BACKBONE_PREFIX): v for k, v in checkpoint.weights.items() if k.startswith(BACKBONE_PREFIX)
    }
    if not weights:
        raise InteropError(f"{checkpoint.path}: the checkpoint holds no backbone.* weights")
    return weights


def _checkpoint_backbone_name(checkpoint: LoadedCheckpoint) -> str:
    """``pretrainlab <backbone>``, the backbone named in the checkpoint's config."""
    backbone = checkpoint.meta.get("config", {}).get("model", {}).get("backbone", "unknown backbone")
    return f"pretrainlab {backbone}"


def build_backbone(
    cfg: ExperimentConfig, in_chans: int, load_init_from: bool = True
) -> tuple[nn.Module, LoadReport | None]:
    """``cfg.model``'s headless backbone, started from ``model.init_from`` when set (and ``load_init_from``).

    Pass ``load_init_from=False`` when a checkpoint of the whole model is loaded next. ``scope: model`` is
    loaded once the whole model is built (:func:`pretrainlab.strategies.build_model`), not here.

    Returns:
        The backbone and the load report (None without ``init_from``).
    """
    backbone = create_backbone(cfg.model, in_chans)
    init_from = cfg.model.init_from if load_init_from else None
    if init_from is not None and init_from.scope == "model":
        init_from = None
    report = initialize_backbone(backbone, init_from, cfg.runtime.tracking_uri) if init_from else None
    return backbone, report
