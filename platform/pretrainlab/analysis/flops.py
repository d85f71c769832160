"""Parameters and FLOPs of a model: a timm model name or an experiment config, per top-level module.

    python -m pretrainlab.analysis.flops resnet50 [--input-size 224] [--in-chans 3] [--num-classes 1000]
    python -m pretrainlab.analysis.flops configs/resnet10t_1xb128_fmnist.yaml [--set model.backbone=resnet18]

One forward pass of one image is counted with ``torch.utils.flop_counter.FlopCounterMode``
(convolutions, matrix products and attention; normalisation, activations and pooling are
not counted). The headline figure follows MMPreTrain's model zoo (and fvcore): "FLOPs" are
multiply-accumulates (MACs), half of FlopCounterMode's count, which is reported too.

The model is built with ``pretrained=False`` on the ``meta`` device (no memory, no
arithmetic: only shapes), and on the CPU for the few models whose forward needs real
values. A timm name is built with its classifier head (``--num-classes``); a config is
built by its strategy (backbone + head), with input channels, classes and image size
from its prepared dataset when there is one (after the evaluation pipeline), else from
the arguments.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from pretrainlab.analysis.outputs import add_output_arguments, publish, write_csv
from pretrainlab.config import ConfigError, ExperimentConfig, load_config
from pretrainlab.data.errors import DatasetError

DEFAULT_INPUT_SIZE = 224
DEFAULT_IN_CHANS = 3
DEFAULT_NUM_CLASSES = 1000
MACS_LABEL = "FLOPs (MACs, MMPreTrain/fvcore convention)"
RAW_LABEL = "FLOPs (raw, FlopCounterMode: 2 per multiply-accumulate)"


class ModelSpecError(ValueError):
    """The model name or config cannot be turned into a model; the message says why."""


@dataclass
class BuiltModel:
    """A model ready for a forward pass, and what it was built from."""

    model: nn.Module
    input_shape: tuple[int, int, int]  # C x H x W of one image
    description: str
    forward: Callable[[nn.Module, torch.Tensor], object] = field(default=lambda model, images: model(images))


def is_config(spec: str) -> bool:
    """Whether ``spec`` names a config file (rather than a timm model)."""
    return spec.endswith((".yaml", ".yml")) or Path(spec).is_file()


def dataset_input(cfg: ExperimentConfig, folder: str) -> tuple[int, tuple[int, int, int]]:
    """Classes and the C x H x W of one training image after the evaluation pipeline, from a prepared dataset."""
    import pyarrow.parquet as pq

    from pretrainlab.data.catalog import dataset_info
    from pretrainlab.data.dataset import decode_images
    from pretrainlab.data.shards import shard_paths
    from pretrainlab.data.transforms import eval_pipeline

    info = dataset_info(folder)
    columns = ["image", "image_format", "height", "width", "channels", "source_id"]
    row = pq.ParquetFile(shard_paths(folder, "train")[0]).read_row_group(0, columns=columns).slice(0, 1)
    images = decode_images({name: row.column(name).to_numpy(zero_copy_only=False) for name in columns})
    shape = eval_pipeline(cfg.data)(torch.from_numpy(images)).shape
    return info["num_classes"], (int(shape[1]), int(shape[2]), int(shape[3]))


def check_timm_name(name: str) -> None:
    """Raise :class:`ModelSpecError` with close matches when timm has no model ``name``."""
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ModelSpecError(f"unknown timm model {name!r}{hint} (or give a config file: *.yaml)")


def _timm_model(name: str, in_chans: int, num_classes: int, input_size: int) -> nn.Module:
    import timm

    kwargs = {"pretrained": False, "in_chans": in_chans, "num_classes": num_classes}
    try:
        return timm.create_model(name, img_size=input_size, **kwargs)  # ViTs and others with a fixed input size
    except TypeError:
        return timm.create_model(name, **kwargs)


def model_builder(
    spec: str,
    overrides: list[str] | None = None,
    input_size: int | None = None,
    in_chans: int | None = None,
    num_classes: int | None = None,
) -> Callable[[torch.device | str], BuiltModel]:
    """Check ``spec`` (a timm name or a config path) and return a function that builds it on a device.

    Raises:
        ModelSpecError: unknown timm model (with close matches) or unusable arguments.
        ConfigError: the config file, a key or a value is invalid.
        DatasetError: the config's prepared dataset cannot be read.
    """
    if is_config(spec):
        cfg = load_config(spec, overrides)
        from pretrainlab.data.catalog import prepared_location
        from pretrainlab.models.backbones import BackboneError
        from pretrainlab.strategies import get_strategy

        folder = prepared_location(cfg)
        if folder is not None and (input_size is None or in_chans is None or num_classes is None):
            found_classes, found_shape = dataset_input(cfg, folder)
            source = f"dataset {cfg.data.dataset}"
        else:
            found_classes, found_shape = DEFAULT_NUM_CLASSES, (DEFAULT_IN_CHANS, DEFAULT_INPUT_SIZE, DEFAULT_INPUT_SIZE)
            source = "defaults; the dataset is not prepared" if folder is None else "arguments"
        chans = in_chans or found_shape[0]
        shape = (chans, input_size, input_size) if input_size else (chans, *found_shape[1:])
        classes = num_classes or found_classes
        description = f"{cfg.name}: {cfg.model.backbone} + head, {classes} classes (input and classes: {source})"
        strategy = get_strategy(cfg.strategy)

        def build_config(device: torch.device | str) -> BuiltModel:
            with torch.device(device):
                try:
                    model = strategy.build_model(cfg, classes, chans, load_init_from=False)
                except BackboneError as err:
                    raise ModelSpecError(str(err)) from None
            return BuiltModel(model.eval(), shape, description, lambda m, images: m({"image": images})["logits"])

        return build_config

    if overrides:
        raise ModelSpecError("--set applies to a config file, not to a timm model name")
    check_timm_name(spec)
    size = input_size or DEFAULT_INPUT_SIZE
    chans = in_chans or DEFAULT_IN_CHANS
    classes = DEFAULT_NUM_CLASSES if num_classes is None else num_classes
    description = f"{spec} (timm, pretrained=False, {classes} classes)"

    def build_timm(device: torch.device | str) -> BuiltModel:
        with torch.device(device):
            try:
                model = _timm_model(spec, chans, classes, size)
            except (TypeError, ValueError, AssertionError, RuntimeError) as err:
                raise ModelSpecError(f"timm cannot build {spec!r}: {err}") from None
        return BuiltModel(model.eval(), (chans, size, size), description)

    return build_timm


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Fused attention on the CPU: the same count as FlopCounterMode's for the CUDA kernels."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _custom_formulas() -> dict:
    ops = [getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)]
    return {op: _attention_flops for op in ops if op is not None}


@dataclass
class FlopCount:
    """One forward pass of one image, counted."""

    description: str
    input_shape: tuple[int, ...]  # N x C x H x W
    device: str
    params: int
    flops: int  # raw FlopCounterMode count (2 per multiply-accumulate)
    rows: list[dict] = field(default_factory=list)  # per module: module, depth, params, flops

    @property
    def macs(self) -> int:
        return self.flops // 2


def _count_on(build: Callable[[torch.device | str], BuiltModel], device: str, depth: int) -> FlopCount:
    built = build(device)
    model = built.model
    images = torch.zeros((1, *built.input_shape), device=device)
    counter = FlopCounterMode(display=False, depth=depth, custom_mapping=_custom_formulas())
    with torch.no_grad(), counter:
        built.forward(model, images)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    total = counts.get("Global", 0)
    root = type(model).__name__
    rows: list[dict] = []
    for name, module in model.named_modules():
        level = name.count(".") + 1
        if not name or level > depth:
            continue
        params = sum(p.numel() for p in module.parameters())
        flops = counts.get(f"{root}.{name}", 0)
        if params or flops:  # leave out parameter-free modules that do no counted work (dropout, identity, ...)
            rows.append({"module": name, "depth": level, "params": params, "flops": flops})
    own_params = sum(p.numel() for p in model.parameters(recurse=False))  # e.g. a ViT's cls token, pos. embedding
    own_flops = total - sum(counts.get(f"{root}.{name}", 0) for name, _ in model.named_children())
    if own_params or own_flops:
        rows.append({"module": f"({root} itself)", "depth": 1, "params": own_params, "flops": own_flops})
    params = sum(p.numel() for p in model.parameters())
    return FlopCount(built.description, tuple(images.shape), device, params, total, rows)


def count(build: Callable[[torch.device | str], BuiltModel], depth: int = 1) -> FlopCount:
    """Count on the meta device (shapes only); fall back to the CPU when the forward needs real values."""
    try:
        return _count_on(build, "meta", depth)
    except ModelSpecError:
        raise
    except Exception:  # a forward that reads values (.item(), data-dependent shapes) fails on meta
        return _count_on(build, "cpu", depth)


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def summary(result: FlopCount) -> list[str]:
    """The headline lines: model, input, params, FLOPs in both conventions."""
    shape = "x".join(map(str, result.input_shape))
    return [
        f"model: {result.description}",
        f"input: {shape} (counted on the {result.device} device, forward only)",
        f"params: {_human(result.params)} ({result.params:,})",
        f"{MACS_LABEL}: {_human(result.macs)} ({result.macs:,})",
        f"{RAW_LABEL}: {_human(result.flops)} ({result.flops:,})",
    ]


COLUMNS = ["module", "params", "params_M", "flops_macs", "gflops_macs", "flops_raw", "share_pct"]


def table(result: FlopCount) -> list[dict]:
    """Per-module rows plus a ``total`` row (``flops_macs``: MMPreTrain's FLOPs; ``flops_raw``: FlopCounterMode's)."""

    def row(module: str, params: int, flops: int) -> dict:
        share = 100.0 * flops / result.flops if result.flops else 0.0
        return {
            "module": module,
            "params": params,
            "params_M": round(params / 1e6, 4),
            "flops_macs": flops // 2,
            "gflops_macs": round(flops / 2e9, 4),
            "flops_raw": flops,
            "share_pct": round(share, 2),
        }

    rows = [row("  " * (r["depth"] - 1) + r["module"], r["params"], r["flops"]) for r in result.rows]
    return [*rows, row("total", result.params, result.flops)]


def write(result: FlopCount, out: Path) -> None:
    """CSV for ``*.csv``, else a markdown file with the headline lines and the table."""
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = table(result)
    if out.suffix.lower() == ".csv":
        write_csv(rows, COLUMNS, out)
        return
    out.write_text("\n".join(["\n".join(f"- {line}" for line in summary(result)), "", markdown(rows)]) + "\n")


def markdown(rows: list[dict]) -> str:
    """A markdown table of ``rows`` (dicts with the same keys)."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL, ``--set``, ``--input-size``, ``--in-chans``, ``--num-classes`` (shared with the speed tool)."""
    parser.add_argument("model", help="a timm model name (e.g. resnet50) or an experiment config file (*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument(
        "--input-size",
        type=int,
        help=f"square image side (default: {DEFAULT_INPUT_SIZE}; for a config, its prepared dataset's)",
    )
    parser.add_argument(
        "--in-chans", type=int, help=f"image channels (default: {DEFAULT_IN_CHANS}; for a config, its dataset's)"
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        help=f"classifier outputs (default: {DEFAULT_NUM_CLASSES}; for a config, its dataset's classes)",
    )


def builder_from(args: argparse.Namespace) -> Callable[[torch.device | str], BuiltModel]:
    """:func:`model_builder` from the arguments of :func:`add_model_arguments`."""
    for name in ("input_size", "in_chans", "num_classes"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "num_classes" else 1):
            raise ModelSpecError(f"--{name.replace('_', '-')} must be positive, got {value}")
    return model_builder(args.model, args.set, args.input_size, args.in_chans, args.num_classes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--depth", type=int, default=1, help="module levels in the table (default: 1, top level)")
    add_output_arguments(parser, "flops.csv")
    args = parser.parse_args(argv)
    try:
        result = count(builder_from(args), max(1, args.depth))
    except (ModelSpecError, ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # the model's own forward failed for this input
        print(f"error: forward of {args.model} failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    print("\n".join(summary(result)))
    print(markdown(table(result)))
    write(result, Path(args.out))
    publish(args.out, args, "flops")
    return 0


if __name__ == "__main__":
    sys.exit(main())
