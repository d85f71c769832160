"""Pretrain one experiment on Ray Train, tracked in MLflow.

On a local Ray started for the job (the default):

    python jobs/pretrain.py configs/resnet10t_1xb128_fmnist.yaml --set optim.lr=0.05

On a running cluster (`ray start --head --node-ip-address=127.0.0.1` first):

    export RAY_AUTH_MODE=token
    ray job submit --working-dir . \
        --runtime-env-json '{"env_vars": {"PRETRAINLAB_HOME": "'"$PWD"'"}}' \
        -- python jobs/pretrain.py configs/resnet10t_1xb128_fmnist.yaml --set optim.lr=0.05

Passing ``--run-name`` of an earlier run resumes it from its last checkpoint, in the same
MLflow run.

The best checkpoint is evaluated on the test split at the end: top-1 / top-5 of the logits for
classification strategies; for self-supervised (embedding) strategies, kNN top-1 of the
backbone's features with the train split as the bank (``test/knn_top1_k20``,
``test/knn_top1_k200``) and a t-SNE picture of test features (``evaluation/test/tsne.png``); for
image-text strategies, retrieval Recall@1/5/10 both ways on the test split and on the
compositional test split when there is one (``test/t2i_r1``, ``test_compositional/t2i_r1``, ...),
next to the shuffled-image baseline (``test/shuffled/t2i_r1``, ...); for generation strategies,
the metrics of the task the dataset teaches (captioning BLEU-4 / CIDEr, VQA accuracy, grounding
accuracy at IoU 0.5) next to its baseline (shuffled images, question only, centre box) on the same
splits, and a picture of test predictions (``evaluation/test/samples.png``).

A run whose training loss turns NaN or infinite stops before that epoch's checkpoint: the job
prints the error (the step, what to change) and exits 1; its MLflow run is marked FAILED.
"""

from __future__ import annotations

import argparse
import sys

from pretrainlab.config import ConfigError, load_config
from pretrainlab.train.experiment import run_experiment


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML experiment config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--run-name", help="Ray Train / MLflow run name; an existing name resumes that run")
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="an MLflow tag of the run")
    return parser.parse_args(argv)


def parse_tags(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings as a dict; a string without ``=`` or with an empty key is a ConfigError."""
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--tag {item!r}: expected KEY=VALUE")
        tags[key.strip()] = value
    return tags


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        tags = parse_tags(args.tag)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run_experiment(cfg, args.run_name, tags)


if __name__ == "__main__":
    sys.exit(main())
