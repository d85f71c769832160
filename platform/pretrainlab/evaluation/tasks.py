"""One table from a strategy's task to its evaluation: what the training loop validates each epoch, what a job
measures on a split of a checkpoint's dataset, which splits a finished run is tested on, and what it prints.

========================  ==========================================  ============================================
task                      each epoch (``validate``)                   on a split (``evaluate_split``)
========================  ==========================================  ============================================
``classification``        loss, top-1, top-5 of the logits            the same, and the confusion matrix
``embedding``             leave-one-out kNN top-1 (k=20) of features  kNN top-1 (k=20, 200; train split as bank), t-SNE
``image_text``            retrieval Recall@1/5/10 both ways           the same, shuffled-image baseline, per text kind
``generation``            teacher-forced losses (and box metrics)     captioning / VQA / grounding by the dataset task
========================  ==========================================  ============================================

Validation runs on every worker over its shard of the validation split (sums and rows gathered across workers);
split evaluation runs in one process on a model loaded from a checkpoint. A :class:`SplitReport` is logged to MLflow
as ``<split>/<metric>`` with its pictures under ``evaluation/<split>/``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from mlflow import MlflowClient
from torch import nn

from pretrainlab.config import ExperimentConfig
from pretrainlab.data.pipeline import Preprocessor, to_model_inputs
from pretrainlab.data.shards import load_manifest
from pretrainlab.distributed import all_reduce_sums, gather_rows
from pretrainlab.evaluation.classification import evaluate_checkpoint
from pretrainlab.evaluation.embedding import (
    KNN_BANK_SPLIT,
    KNN_KS,
    KNN_TEMPERATURE,
    VALIDATION_K,
    checkpoint_features,
    knn_accuracies,
)
from pretrainlab.evaluation.figures import save_confusion_matrix, stratified_indices, tsne_embed, tsne_plot
from pretrainlab.evaluation.generation import evaluate_generation_split, generation_samples_figure
from pretrainlab.evaluation.image_text import evaluate_retrieval_split, retrieval_validation
from pretrainlab.inference.loading import LoadedModel
from pretrainlab.metrics.classification import classification_sums, metrics_from_sums
from pretrainlab.metrics.confusion import confusion_counts
from pretrainlab.metrics.knn import knn_top1
from pretrainlab.strategies import Task
from pretrainlab.tracking.mlflow import MetricLogger

TSNE_SAMPLES = 2000
TSNE_PERPLEXITY = 30.0

Validator = Callable[[dict[str, nn.Module], Any, ExperimentConfig, torch.device], dict[str, dict[str, float]]]
"""``(name -> model, this worker's validation shard, config, device) -> name -> metrics``."""


@dataclass
class SplitReport:
    """What an evaluation of a checkpoint on one split found: metrics and the pictures that go with them."""

    split: str
    metrics: dict[str, float]
    write_artifacts: Callable[[Path], None] = field(default=lambda folder: None)
    """Writes the report's files (PNG, CSV) into a folder; logged under ``evaluation/<split>/``."""

    def summary(self, labels: Mapping[str, str], unit: str = "") -> str:
        """The metrics named in ``labels`` (metric -> printed name; empty: every top-level metric) on one line."""
        shown = {key: label for key, label in labels.items() if key in self.metrics}
        shown = shown or {key: key for key in self.metrics if "/" not in key}
        return "  ".join(f"{label} {self.metrics[key]:.2f}{unit}" for key, label in shown.items())


@dataclass(frozen=True)
class TaskEvaluator:
    """How the models of one task are evaluated."""

    validate: Validator
    evaluate_split: Callable[[LoadedModel, str, str, int], SplitReport]
    test_splits: tuple[str, ...]
    """The splits a finished training run is tested on (those the dataset has)."""
    summary: Mapping[str, str]
    """The metrics printed at the end of a run, with their printed names (empty: every top-level metric)."""
    unit: str = "%"


def _batches(shard: Any, cfg: ExperimentConfig, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    prepare = Preprocessor(cfg.data, train=False)
    for rows in shard.iter_batches(batch_size=cfg.train.eval_batch_size, batch_format="numpy"):
        yield to_model_inputs(prepare(rows), cfg.data, device)


def _image_text_batches(shard: Any, cfg: ExperimentConfig, device: torch.device) -> Iterator[tuple]:
    prepare = Preprocessor(cfg.data, train=False)
    for rows in shard.iter_batches(batch_size=cfg.train.eval_batch_size, batch_format="numpy"):
        images = to_model_inputs(prepare(rows), cfg.data, device)["image"]
        empty = [[]] * len(images)  # caption datasets have no negatives nor also_true texts
        yield (
            images,
            *([list(texts) for texts in rows.get(field, empty)] for field in ("captions", "negatives", "also_true")),
        )


def validate_classification(
    models: dict[str, nn.Module], shard: Any, cfg: ExperimentConfig, device: torch.device
) -> dict[str, dict[str, float]]:
    """Loss, top-1 and top-5 of each model's logits over every worker's validation rows."""
    sums = {name: torch.zeros(4, dtype=torch.float64) for name in models}
    for batch in _batches(shard, cfg, device):
        for name, model in models.items():
            sums[name] += classification_sums(model({"image": batch["image"]})["logits"], batch["label"])
    return {name: metrics_from_sums(all_reduce_sums(total)) for name, total in sums.items()}


def validate_embedding(
    models: dict[str, nn.Module], shard: Any, cfg: ExperimentConfig, device: torch.device
) -> dict[str, dict[str, float]]:
    """``knn_top1``: leave-one-out kNN top-1 (k=20) of each model's backbone features among all validation images."""
    features: dict[str, list[torch.Tensor]] = {name: [] for name in models}
    labels = []
    for batch in _batches(shard, cfg, device):
        labels.append(batch["label"].cpu())
        for name, model in models.items():
            features[name].append(model.backbone(batch["image"]).float().cpu())
    all_labels = gather_rows(torch.cat(labels))
    classes = int(all_labels.max()) + 1
    results = {}
    for name, parts in features.items():
        bank = gather_rows(torch.cat(parts))
        top1 = knn_top1(bank, all_labels, bank, all_labels, classes, k=VALIDATION_K, exclude_self=True)
        results[name] = {"knn_top1": top1}
    return results


def validate_image_text(
    models: dict[str, nn.Module], shard: Any, cfg: ExperimentConfig, device: torch.device
) -> dict[str, dict[str, float]]:
    """Retrieval Recall@1/5/10 both ways (``i2t_r1`` ... ``t2i_r10``, ``rsum``) among all validation images and
    their texts."""
    batches = _image_text_batches(shard, cfg, device)
    return retrieval_validation(models, batches, cfg.data, cfg.train.eval_batch_size, device)


def validate_generation(
    models: dict[str, nn.Module], shard: Any, cfg: ExperimentConfig, device: torch.device
) -> dict[str, dict[str, float]]:
    """Each model's ``validation_metrics`` (``lm_loss``, the decoder's teacher-forced loss on the first caption or
    the questions / objects of each image; with a box head on grounding rows ``box_loss``, ``acc_iou50``, ``miou``),
    averaged over every sample of every worker."""
    sums = {
        name: {key: torch.zeros(2, dtype=torch.float64) for key in model.validation_names}
        for name, model in models.items()
    }
    for batch in _batches(shard, cfg, device):
        for name, model in models.items():
            metrics, count = model.validation_metrics(batch)
            for key, value in metrics.items():
                sums[name][key] += torch.tensor([value * count, count], dtype=torch.float64)
    results = {}
    for name, totals in sums.items():
        reduced = {key: all_reduce_sums(total).tolist() for key, total in totals.items()}
        results[name] = {key: total / count for key, (total, count) in reduced.items()}
    return results


def evaluate_classification(loaded: LoadedModel, split: str, data_folder: str, batch_size: int) -> SplitReport:
    """Loss, top-1 and top-5 on ``split``, and its confusion matrix (PNG and CSV)."""
    evaluation = evaluate_checkpoint(loaded, split, data_folder, batch_size)
    matrix = confusion_counts(evaluation.labels, evaluation.preds, len(evaluation.class_names))

    def write(folder: Path) -> None:
        save_confusion_matrix(matrix, evaluation.class_names, folder, title=f"{split} split")

    return SplitReport(split, evaluation.metrics, write)


def evaluate_embedding(loaded: LoadedModel, split: str, data_folder: str, batch_size: int) -> SplitReport:
    """kNN top-1 of the backbone's features (``knn_top1_k20``, ``knn_top1_k200``: the train split is the bank,
    ``split`` the queries; on the train split itself, leave-one-out) and a t-SNE picture of a class-stratified
    sample of ``split``'s features."""
    found = checkpoint_features(loaded, [KNN_BANK_SPLIT, split], data_folder, batch_size)
    (bank, bank_labels), (queries, labels) = found.splits[KNN_BANK_SPLIT], found.splits[split]
    leave_one_out = split == KNN_BANK_SPLIT
    accuracies = knn_accuracies(
        bank, bank_labels, queries, labels, found.num_classes, KNN_KS, KNN_TEMPERATURE, leave_one_out
    )
    cfg = loaded.config

    def write(folder: Path) -> None:
        rows = stratified_indices(labels.numpy(), TSNE_SAMPLES, cfg.runtime.seed)
        perplexity = min(TSNE_PERPLEXITY, (len(rows) - 1) / 3)
        points = tsne_embed(queries[rows].numpy(), perplexity, cfg.runtime.seed)
        title = f"t-SNE of {cfg.model.backbone} features ({cfg.strategy}), {cfg.data.dataset} {split} ({len(rows)})"
        tsne_plot(points, labels[rows].numpy(), loaded.class_names, title).savefig(
            folder / "tsne.png", dpi=100, bbox_inches="tight"
        )

    return SplitReport(split, {f"knn_top1_k{k}": top1 for k, top1 in accuracies.items()}, write)


def evaluate_image_text(loaded: LoadedModel, split: str, data_folder: str, batch_size: int) -> SplitReport:
    """Retrieval Recall@K both ways, the shuffled-image baseline and, on the scenes set, Recall@K per text kind."""
    return SplitReport(split, evaluate_retrieval_split(loaded, split, data_folder, batch_size))


def evaluate_generation(loaded: LoadedModel, split: str, data_folder: str, batch_size: int) -> SplitReport:
    """The dataset task's metrics and baseline, and a grid of the first images with predictions and references."""
    metrics = evaluate_generation_split(loaded, split, data_folder, batch_size)

    def write(folder: Path) -> None:
        generation_samples_figure(loaded, split, data_folder).savefig(folder / "samples.png")

    return SplitReport(split, metrics, write)


EVALUATORS: dict[Task, TaskEvaluator] = {
    "classification": TaskEvaluator(
        validate_classification, evaluate_classification, ("test",), {"top1": "top-1", "top5": "top-5"}
    ),
    "embedding": TaskEvaluator(
        validate_embedding, evaluate_embedding, ("test",), {f"knn_top1_k{k}": f"knn_top1_k{k}" for k in KNN_KS}
    ),
    "image_text": TaskEvaluator(
        validate_image_text,
        evaluate_image_text,
        ("test", "test_compositional"),
        {key: key for key in ("t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5")},
    ),
    "generation": TaskEvaluator(
        validate_generation,
        evaluate_generation,
        ("test", "test_compositional"),
        {},
        unit="",
    ),
}
"""Task (a strategy module's ``TASK``) -> how its models are evaluated."""


def dataset_test_splits(task: Task, data_folder: str) -> list[str]:
    """The task's test splits that the dataset at ``data_folder`` has."""
    have = load_manifest(data_folder)["splits"]
    return [split for split in EVALUATORS[task].test_splits if split in have]


def log_report(client: MlflowClient, run_id: str, report: SplitReport, step: int = 0, pictures: bool = True) -> None:
    """Log ``<split>/<metric>`` values and, with ``pictures``, the report's files (under ``evaluation/<split>/``)
    to a run."""
    MetricLogger(client, run_id).log({f"{report.split}/{k}": v for k, v in report.metrics.items()}, step)
    if not pictures:
        return
    with tempfile.TemporaryDirectory() as tmp:
        report.write_artifacts(Path(tmp))
        if any(Path(tmp).iterdir()):
            client.log_artifacts(run_id, tmp, f"evaluation/{report.split}")
