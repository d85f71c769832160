"""Export a trained classifier (logits) or its backbone (pooled features) to ONNX, checked with onnxruntime.

    python -m pretrainlab.analysis.export runs/<run>/checkpoint_.../checkpoint --out model.onnx
    python -m pretrainlab.analysis.export models:/fmnist-classifier@champion --out features.onnx --features

The ONNX graph takes one float input ``image`` (``N x C x H x W``, already through the
evaluation pipeline and normalised, as PretrainLab's evaluation feeds the model) and
returns ``logits`` (``N x classes``) or ``features`` (``N x num_features``); ``N`` is
dynamic unless ``--static-batch``. After writing the file, onnxruntime (CPU) runs it on a
random batch, and on a batch of another size when the batch is dynamic, and the largest
absolute difference from PyTorch is printed; above ``--atol`` the export fails.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from mlflow.exceptions import MlflowException
from torch import nn

from pretrainlab.analysis.outputs import AnalysisError, add_output_arguments, check_mlflow_run, publish
from pretrainlab.checkpoint import CheckpointError
from pretrainlab.data.catalog import dataset_dir
from pretrainlab.data.errors import DatasetError
from pretrainlab.data.shards import load_manifest, shard_paths
from pretrainlab.data.transforms import PipelineError, eval_pipeline
from pretrainlab.inference.loading import LoadedModel, load_model
from pretrainlab.models.backbones import BackboneError
from pretrainlab.tracking.mlflow import TrackingError

KINDS = ("classifier", "features")
_EXPORT_BATCH = 2
_CHECK_BATCHES = (2, 3)


class ExportError(ValueError):
    """The model cannot be exported, or the exported graph does not reproduce PyTorch's outputs."""


class ClassifierLogits(nn.Module):
    """A PretrainLab classifier as ``images -> logits`` (its ``forward`` takes a batch dict)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model({"image": image})["logits"]


class BackboneFeatures(nn.Module):
    """The model's backbone as ``images -> pooled features`` (what the head sees)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        backbone = getattr(model, "backbone", None)
        if not isinstance(backbone, nn.Module):
            raise ExportError(f"{type(model).__name__} has no backbone module to take features from")
        self.backbone = backbone

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.backbone(image)


def as_images_module(model: nn.Module, kind: str) -> nn.Module:
    """``model`` wrapped to take an image tensor: logits (``classifier``) or pooled features (``features``)."""
    if kind not in KINDS:
        raise ExportError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    return (ClassifierLogits(model) if kind == "classifier" else BackboneFeatures(model)).eval()


@dataclass
class ExportReport:
    """Where the ONNX file went and how closely onnxruntime reproduces PyTorch."""

    path: Path
    kind: str
    input_size: tuple[int, int, int]
    opset: int
    dynamic_batch: bool
    input_name: str
    output_name: str
    output_shape: list[int | str]
    max_abs_diff: float
    diffs: dict[int, float] = field(default_factory=dict)

    def summary(self) -> str:
        batch = "N" if self.dynamic_batch else str(_EXPORT_BATCH)
        checked = ", ".join(f"batch {b}: {d:.3g}" for b, d in self.diffs.items())
        return (
            f"{self.path}: {self.kind}, {self.input_name} [{batch}, {', '.join(map(str, self.input_size))}] -> "
            f"{self.output_name} {self.output_shape}, opset {self.opset}\n"
            f"onnxruntime vs PyTorch max abs diff {self.max_abs_diff:.3g} ({checked})"
        )


def input_size_of(loaded: LoadedModel) -> tuple[int, int, int]:
    """``C, H, W`` the model sees: the size of the dataset's images after the evaluation pipeline."""
    folder = dataset_dir(loaded.config)
    splits = list(load_manifest(folder).get("splits", {}))
    paths = [p for split in splits for p in shard_paths(folder, split)][:1]
    if not paths:
        raise DatasetError(f"{folder}: no shards to read the image size from")
    row = pq.ParquetFile(paths[0]).read_row_group(0, columns=["height", "width", "channels"]).slice(0, 1).to_pylist()
    h, w, c = row[0]["height"], row[0]["width"], row[0]["channels"]
    seen = eval_pipeline(loaded.config.data)(torch.zeros(1, c, h, w, dtype=torch.uint8))
    return tuple(int(s) for s in seen.shape[1:])  # type: ignore[return-value]


def _opset_of(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def check_onnx(
    path: str | os.PathLike, module: nn.Module, input_size: tuple[int, int, int], batch_sizes=_CHECK_BATCHES, seed=0
) -> dict[int, float]:
    """Max abs difference between onnxruntime (CPU) and ``module`` on a random batch of each size."""
    import onnxruntime as ort

    return _compare(
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), module, input_size, batch_sizes, seed
    )


def _compare(session, module: nn.Module, input_size: tuple[int, ...], batch_sizes, seed: int = 0) -> dict[int, float]:
    name = session.get_inputs()[0].name
    generator = torch.Generator().manual_seed(seed)
    diffs = {}
    for batch in batch_sizes:
        x = torch.randn(batch, *input_size, generator=generator)
        with torch.no_grad():
            expected = module(x).float().numpy()
        got = session.run(None, {name: x.numpy()})[0]
        if got.shape != expected.shape:
            raise ExportError(f"onnxruntime output {got.shape} but PyTorch {expected.shape} for batch {batch}")
        diffs[batch] = float(np.abs(got - expected).max())
    return diffs


def export_onnx(
    source_or_model: str | os.PathLike | LoadedModel | nn.Module,
    path: str | os.PathLike,
    input_size: tuple[int, int, int] | None = None,
    opset: int | None = None,
    dynamic_batch: bool = True,
    kind: str = "classifier",
    atol: float | None = 1e-4,
    tracking_uri: str | None = None,
) -> ExportReport:
    """Write ``path`` (one ONNX file) and check it against PyTorch with onnxruntime.

    Args:
        source_or_model: A checkpoint folder or ``models:/`` / ``runs:/`` URI, a :class:`LoadedModel`, or a
            PretrainLab model (``forward(batch dict)``; then ``input_size`` is required).
        path: The ``.onnx`` file to write.
        input_size: ``(C, H, W)``; default: the checkpoint's dataset images after its evaluation pipeline.
        opset: ONNX opset; default: the exporter's.
        dynamic_batch: Let the batch dimension vary (checked with a second batch size).
        kind: ``classifier`` (logits) or ``features`` (the backbone's pooled features).
        atol: Raise :class:`ExportError` when the difference exceeds it (``None``: never).
        tracking_uri: MLflow store for ``models:/`` and ``runs:/`` sources.
    """
    if kind not in KINDS:
        raise ExportError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if isinstance(source_or_model, nn.Module):
        model = source_or_model
        if input_size is None:
            raise ExportError("input_size (C, H, W) is needed to export a bare module")
    else:
        loaded = source_or_model if isinstance(source_or_model, LoadedModel) else None
        loaded = loaded or load_model(source_or_model, tracking_uri=tracking_uri)
        model = loaded.model
        input_size = tuple(input_size) if input_size is not None else input_size_of(loaded)
    if len(input_size) != 3 or min(input_size) < 1:
        raise ExportError(f"input_size must be (C, H, W) with positive sizes, not {tuple(input_size)}")
    input_size = tuple(int(s) for s in input_size)
    module = as_images_module(model.cpu().eval(), kind)
    output_name = "logits" if kind == "classifier" else "features"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(_EXPORT_BATCH, *input_size)
    try:
        with torch.no_grad():
            module(example)
    except Exception as err:  # shape errors come as RuntimeError, AssertionError, ValueError...
        size = " x ".join(map(str, input_size))
        raise ExportError(f"the model does not run on {size} images ({type(err).__name__}: {err})") from None
    # The default (dynamo) exporter: torch.export traces the module, onnxscript translates the graph.
    # Weights go inside the file (one self-contained .onnx) unless they exceed protobuf's 2 GB limit.
    large = sum(p.numel() * p.element_size() for p in module.parameters()) > 1_800_000_000
    progress = io.StringIO()
    try:
        with redirect_stdout(progress), torch.no_grad():
            torch.onnx.export(
                module,
                (example,),
                str(path),
                input_names=["image"],
                output_names=[output_name],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes={"image": {0: torch.export.Dim("batch")}} if dynamic_batch else None,
                external_data=large,
                verbose=False,
            )
    except Exception as err:  # torch.export / onnxscript raise many types; name the step that failed
        raise ExportError(
            f"torch.onnx.export failed for {type(model).__name__} ({type(err).__name__}: {err})"
        ) from None
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diffs = _compare(session, module, input_size, _CHECK_BATCHES if dynamic_batch else (_EXPORT_BATCH,))
    report = ExportReport(
        path=path,
        kind=kind,
        input_size=input_size,  # type: ignore[arg-type]
        opset=_opset_of(path),
        dynamic_batch=dynamic_batch,
        input_name=session.get_inputs()[0].name,
        output_name=session.get_outputs()[0].name,
        output_shape=list(session.get_outputs()[0].shape),
        max_abs_diff=max(diffs.values()),
        diffs=diffs,
    )
    if atol is not None and report.max_abs_diff > atol:
        raise ExportError(f"{path}: onnxruntime differs from PyTorch by {report.max_abs_diff:.3g} (> atol {atol})")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="checkpoint folder, models:/NAME@alias, models:/NAME/VERSION or runs:/ID/path")
    parser.add_argument("--features", action="store_true", help="export the backbone's pooled features, not logits")
    parser.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), help="default: from the data")
    parser.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--static-batch", action="store_true", help="fix the batch size instead of a dynamic one")
    parser.add_argument("--atol", type=float, default=1e-4, help="fail above this max abs diff (default: 1e-4)")
    add_output_arguments(parser, "model.onnx")
    args = parser.parse_args(argv)
    try:
        check_mlflow_run(args)
        report = export_onnx(
            args.source,
            args.out,
            input_size=args.input_size,
            opset=args.opset,
            dynamic_batch=not args.static_batch,
            kind="features" if args.features else "classifier",
            atol=args.atol,
            tracking_uri=args.tracking_uri,
        )
        print(report.summary())
        publish(report.path, args, "onnx")
    except (
        CheckpointError,
        DatasetError,
        PipelineError,
        TrackingError,
        BackboneError,
        ExportError,
        AnalysisError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except MlflowException as err:
        print(f"error: MLflow: {err.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
