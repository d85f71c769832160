"""Fine-tune a pretrained checkpoint: a supervised training run whose backbone starts from the checkpoint's.

    python jobs/finetune.py runs:/<pretraining-run-id>/checkpoint configs/finetune_vit-d6w96-p4_fmnist.yaml
    python jobs/finetune.py models:/fmnist-simclr@champion configs/resnet10t-s2_1xb128_fmnist.yaml --set optim.lr=0.02

On a cluster: ``ray job submit --working-dir . -- python jobs/finetune.py CHECKPOINT CONFIG``.

The run is the same experiment run as jobs/pretrain.py's, of CONFIG with ``model.init_from`` set to
``{source: pretrainlab, path: CHECKPOINT}``: the checkpoint's ``backbone.*`` weights are loaded
(any strategy's checkpoint), the classification head starts fresh. CONFIG must be a supervised
config whose ``model.backbone`` and ``backbone_kwargs`` build the same network as the checkpoint's.
CHECKPOINT is a folder (made absolute here, since ``init_from`` paths are otherwise relative to
PRETRAINLAB_HOME), ``runs:/`` or ``models:/`` URI.

ViTs (and Swin / ConvNeXt) are fine-tuned with layer-wise learning-rate decay: set
``optim.layer_decay`` in CONFIG (0.65-0.75 as in BEiT / MAE; see
configs/finetune_vit-d6w96-p4_fmnist.yaml); without it the job warns.

The MLflow run is tagged ``pretrainlab.pretrained_from`` with the checkpoint's training run id
and ``pretrainlab.pretrained_checkpoint`` with CHECKPOINT.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pretrainlab.checkpoint import CheckpointError, fetch_checkpoint, load_checkpoint
from pretrainlab.config import ConfigError, ExperimentConfig, load_config
from pretrainlab.paths import MLFLOW_SCHEMES, resolve_tracking_uri
from pretrainlab.tracking.mlflow import TrackingError, check_tracking
from pretrainlab.train.experiment import run_experiment

PRETRAINED_FROM_TAG = "pretrainlab.pretrained_from"
PRETRAINED_CHECKPOINT_TAG = "pretrainlab.pretrained_checkpoint"
LAYER_DECAY_BACKBONES = ("vit", "deit", "beit", "eva", "swin", "convnext")


class FinetuneError(ValueError):
    """CONFIG does not describe a fine-tuning run; the message names the key."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="pretrained checkpoint: folder, models:/NAME@alias, runs:/ID/path")
    parser.add_argument("config", help="YAML config of the supervised fine-tuning run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--run-name", help="Ray Train / MLflow run name; an existing name resumes that run")
    return parser.parse_args(argv)


def finetune_overrides(checkpoint: str) -> list[str]:
    """The ``--set`` overrides that start the backbone from ``checkpoint`` (a folder is made absolute)."""
    path = checkpoint if checkpoint.startswith(MLFLOW_SCHEMES) else str(Path(checkpoint).resolve())
    return ["model.init_from.source=pretrainlab", f"model.init_from.path={json.dumps(path)}"]


def check_finetune_config(cfg: ExperimentConfig) -> list[str]:
    """Fail unless ``cfg`` is supervised; returns warnings (a ViT-like backbone without ``optim.layer_decay``)."""
    if cfg.strategy != "supervised":
        raise FinetuneError(f"strategy: fine-tuning is a supervised run (strategy: supervised), not {cfg.strategy!r}")
    if cfg.optim.layer_decay is None and cfg.model.backbone.startswith(LAYER_DECAY_BACKBONES):
        return [f"model.backbone {cfg.model.backbone}: optim.layer_decay is not set (0.65-0.75 is usual)"]
    return []


def pretraining_tags(checkpoint: str, meta: dict) -> dict[str, str]:
    """Tags that link the fine-tuning run to the checkpoint and (when known) its training run."""
    tags = {PRETRAINED_CHECKPOINT_TAG: checkpoint}
    if meta.get("mlflow_run_id"):
        tags[PRETRAINED_FROM_TAG] = meta["mlflow_run_id"]
    return tags


def prepare(args: argparse.Namespace) -> tuple[ExperimentConfig, dict[str, str]]:
    """The resolved config and the tags of the run; nothing is trained.

    Raises:
        CheckpointError, ConfigError, TrackingError, FinetuneError: the message names the input at fault.
    """
    overrides = [*args.set, *finetune_overrides(args.checkpoint)]
    cfg = load_config(args.config, overrides)
    for warning in check_finetune_config(cfg):
        print(f"warning: {warning}", file=sys.stderr)
    if args.checkpoint.startswith(MLFLOW_SCHEMES):
        check_tracking(resolve_tracking_uri(cfg.runtime.tracking_uri))
    meta = load_checkpoint(fetch_checkpoint(args.checkpoint, cfg.runtime.tracking_uri)).meta
    return cfg, pretraining_tags(args.checkpoint, meta)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg, tags = prepare(args)
    except (CheckpointError, ConfigError, TrackingError, FinetuneError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"fine-tuning {args.checkpoint} with {args.config}")
    return run_experiment(cfg, args.run_name, tags)


if __name__ == "__main__":
    sys.exit(main())
