"""Import torchvision or timm weights from a file into a PretrainLab (headless timm) backbone.

    from pretrainlab.models.backbones import create_backbone
    from pretrainlab.models.interop import load_pretrained_backbone

    backbone = create_backbone(cfg.model, in_chans=3)
    report = load_pretrained_backbone(backbone, "resnet50-11ad3fa6.pth", source="torchvision")
    print(report.summary())

The file is a state dict saved with ``torch.save`` (read with ``weights_only=True``, so
nothing is unpickled) or a ``.safetensors`` file; a dict wrapping the state dict under
``state_dict`` / ``model`` / ``module``, and a ``module.`` prefix (DDP), are unwrapped.

Key names:

- ``torchvision``: ResNet / ResNeXt / Wide ResNet names are timm's already; ViT
  (``conv_proj``, ``encoder.layers.encoder_layer_N``...), ConvNeXt (``features.N``...) and
  MobileNetV2 (``features.N.conv``..., into timm's ``mobilenetv2_100``) are renamed to timm's.
  Other torchvision families are compared as they are.
- ``timm``: timm's own checkpoint filter for the model's family runs when timm has one
  (``timm.models.<family>.checkpoint_filter_fn``: it converts original-release formats and,
  for ViTs, resamples position embeddings and patch embeddings to the model's sizes).

Then classifier keys are dropped (PretrainLab puts its own head on the backbone), a 3-channel
first convolution is adapted to a grayscale model with timm's ``adapt_input_conv``, and the
remaining keys are compared with the backbone's: missing, unexpected and shape-mismatched
keys are reported (and, with ``strict=True``, raised as a :class:`InteropError`).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.models import adapt_input_conv
from torch import nn

SOURCES = ("timm", "torchvision")
_WRAPPERS = ("state_dict", "model", "module", "state_dict_ema", "model_ema")


class InteropError(ValueError):
    """A weights file cannot be read or does not fit the backbone; the message names the keys.

    ``report`` is the :class:`LoadReport` when the file was read but does not fit (``strict=True``).
    """

    def __init__(self, message: str, report: LoadReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class LoadReport:
    """What :func:`load_pretrained_backbone` (or :func:`load_into_backbone`) did with each key of the file."""

    path: Path
    source: str
    family: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    dropped_head: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every backbone tensor came from the file and every file tensor was used."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int | None = 20) -> str:
        """A few lines: counts, then the problem keys (at most ``limit`` of each kind; ``None``: all)."""
        limit = limit if limit is not None else 1 << 30
        lines = [
            f"{self.path} ({self.source}, {self.family}): loaded {len(self.loaded)} tensors, "
            f"dropped {len(self.dropped_head)} head tensors, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.mismatched)} with another shape"
        ]
        lines += [f"  adapted: {key}" for key in self.adapted]
        lines += [f"  note: {note}" for note in self.notes]
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
                lines.append(f"  {label}: {', '.join(keys[:limit])}{more}")
        if self.mismatched:
            shown = [f"{k} file {list(a)} vs model {list(b)}" for k, a, b in self.mismatched[:limit]]
            more = f" (+{len(self.mismatched) - limit} more)" if len(self.mismatched) > limit else ""
            lines.append(f"  shape mismatch: {'; '.join(shown)}{more}")
        return "\n".join(lines)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file or a ``torch.save``d state dict (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise InteropError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        try:
            data: object = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise InteropError(f"{path}: cannot be read as a safetensors file ({err})") from None
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch.load raises UnpicklingError, RuntimeError, EOFError... for bad files
            text = str(err)
            detail = text.split("WeightsUnpickler error:")[-1].strip().splitlines()[0] if text.strip() else ""
            raise InteropError(
                f"{path}: not a plain state dict of tensors; torch.load(weights_only=True) refused it "
                f"({type(err).__name__}: {detail})"
            ) from None
    while isinstance(data, Mapping) and not _is_state_dict(data):
        inner = next((data[k] for k in _WRAPPERS if isinstance(data.get(k), Mapping)), None)
        if inner is None:
            break
        data = inner
    if not isinstance(data, Mapping) or not _is_state_dict(data):
        raise InteropError(f"{path}: holds no state dict (a mapping of names to tensors)")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


def _is_state_dict(data: Mapping) -> bool:
    return bool(data) and any(isinstance(v, torch.Tensor) for v in data.values())


# torchvision -> timm key names ------------------------------------------------------------------


def torchvision_family(keys: set[str]) -> str:
    """``resnet``, ``vit``, ``convnext``, ``mobilenet_v2`` or ``unknown``, from a torchvision state dict's key names."""
    if "conv1.weight" in keys and any(k.startswith("layer1.0.") for k in keys):
        return "resnet"
    if "conv_proj.weight" in keys and "encoder.pos_embedding" in keys:
        return "vit"
    if "features.0.0.weight" in keys and any(re.match(r"features\.1\.0\.block\.0\.", k) for k in keys):
        return "convnext"
    if "features.0.0.weight" in keys and "features.1.conv.0.0.weight" in keys:
        return "mobilenet_v2"
    return "unknown"


_TV_VIT = [
    (r"^class_token$", "cls_token"),
    (r"^conv_proj\.", "patch_embed.proj."),
    (r"^encoder\.pos_embedding$", "pos_embed"),
    (r"^encoder\.ln\.", "norm."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.ln_1\.", r"blocks.\1.norm1."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.ln_2\.", r"blocks.\1.norm2."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.(0|linear_1)\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.(3|linear_2)\.", r"blocks.\1.mlp.fc2."),
    (r"^heads\.", "head."),
]


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        new, count = re.subn(pattern, replacement, key)
        if count:
            return new
    return key


def _torchvision_convnext_key(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """``features.0`` is the stem, odd ``features.N`` the stages' blocks, even ones their downsampling."""
    if key.startswith("features.0."):
        return "stem." + key.removeprefix("features.0."), value
    if match := re.match(r"^features\.(\d+)\.(\d+)\.(.+)$", key):
        index, inner, rest = int(match[1]), match[2], match[3]
        if index % 2 == 0:
            return f"stages.{index // 2}.downsample.{inner}.{rest}", value
        block = f"stages.{(index - 1) // 2}.blocks.{inner}"
        if rest == "layer_scale":
            return f"{block}.gamma", value.reshape(-1)
        parts = {"block.0.": "conv_dw.", "block.2.": "norm.", "block.3.": "mlp.fc1.", "block.5.": "mlp.fc2."}
        for old, new in parts.items():
            if rest.startswith(old):
                return f"{block}.{new}{rest.removeprefix(old)}", value
    if key.startswith("classifier.0."):
        return "head.norm." + key.removeprefix("classifier.0."), value
    if key.startswith("classifier.2."):
        return "head.fc." + key.removeprefix("classifier.2."), value
    return key, value


_MOBILENET_V2_STAGE_DEPTHS = (1, 2, 3, 4, 3, 3, 1)
_MOBILENET_V2_BLOCKS = [
    f"blocks.{stage}.{index}" for stage, depth in enumerate(_MOBILENET_V2_STAGE_DEPTHS) for index in range(depth)
]
_MOBILENET_V2_LAYERS = {
    "features.0.0.": "conv_stem.",
    "features.0.1.": "bn1.",
    f"features.{len(_MOBILENET_V2_BLOCKS) + 1}.0.": "conv_head.",
    f"features.{len(_MOBILENET_V2_BLOCKS) + 1}.1.": "bn2.",
    "classifier.1.": "classifier.",
}
_MOBILENET_V2_FIRST_BLOCK = {"conv.0.0.": "conv_dw.", "conv.0.1.": "bn1.", "conv.1.": "conv_pw.", "conv.2.": "bn2."}
_MOBILENET_V2_BLOCK = {
    "conv.0.0.": "conv_pw.",
    "conv.0.1.": "bn1.",
    "conv.1.0.": "conv_dw.",
    "conv.1.1.": "bn2.",
    "conv.2.": "conv_pwl.",
    "conv.3.": "bn3.",
}


def _torchvision_mobilenet_v2_key(key: str) -> str:
    """``features.0`` / ``features.18`` are the stem and head convs, ``features.1-17`` the inverted residuals."""
    for old, new in _MOBILENET_V2_LAYERS.items():
        if key.startswith(old):
            return new + key.removeprefix(old)
    match = re.match(r"^features\.(\d+)\.(.+)$", key)
    if not match or not 1 <= int(match[1]) <= len(_MOBILENET_V2_BLOCKS):
        return key
    index, rest = int(match[1]), match[2]
    parts = _MOBILENET_V2_FIRST_BLOCK if index == 1 else _MOBILENET_V2_BLOCK
    for old, new in parts.items():
        if rest.startswith(old):
            return f"{_MOBILENET_V2_BLOCKS[index - 1]}.{new}{rest.removeprefix(old)}"
    return key


def from_torchvision(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """``(family, state dict with timm's names)`` for a torchvision state dict."""
    family = torchvision_family(set(state_dict))
    if family == "vit":
        return family, {_rename(k, _TV_VIT): v for k, v in state_dict.items()}
    if family == "convnext":
        return family, dict(_torchvision_convnext_key(k, v) for k, v in state_dict.items())
    if family == "mobilenet_v2":
        return family, {_torchvision_mobilenet_v2_key(k): v for k, v in state_dict.items()}
    return family, dict(state_dict)  # ResNet family: the names are timm's; anything else is compared as is


# the backbone side -----------------------------------------------------------------------------


def _timm_family(backbone: nn.Module) -> str:
    module = type(backbone).__module__
    return module.rsplit(".", 1)[-1] if module.startswith("timm.models.") else type(backbone).__name__


def _timm_filter(state_dict: dict[str, torch.Tensor], backbone: nn.Module, report: LoadReport) -> dict:
    """The state dict through ``timm.models.<family>.checkpoint_filter_fn`` when timm has one for the model."""
    module_name = type(backbone).__module__
    if not module_name.startswith("timm.models."):
        return state_dict
    filter_fn = getattr(importlib.import_module(module_name), "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state_dict
    try:
        filtered = filter_fn(dict(state_dict), backbone)
    except Exception as err:  # a filter meets a state dict of another architecture: compare the keys as they are
        report.notes.append(f"{module_name}.checkpoint_filter_fn did not apply ({type(err).__name__}: {err})")
        return state_dict
    report.notes.append(f"applied {module_name}.checkpoint_filter_fn")
    return dict(filtered)


def _head_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    """Key prefixes of classifier weights: timm's ``classifier`` entries, plus the usual head names."""
    cfg = getattr(backbone, "pretrained_cfg", None) or getattr(backbone, "default_cfg", None) or {}
    names = cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{name}." for name in (*names, "fc", "head", "head.fc", "classifier", "heads", "head_dist"))


def _is_head_key(key: str, backbone_keys: set[str], prefixes: tuple[str, ...]) -> bool:
    """A classifier weight the headless backbone does not have (a kept ``head.norm`` is not one)."""
    return key not in backbone_keys and key.startswith(prefixes)


def _first_conv_key(backbone: nn.Module) -> str | None:
    """The weight of the input convolution: timm's ``first_conv``, else the first ``Conv2d``."""
    cfg = getattr(backbone, "pretrained_cfg", None) or getattr(backbone, "default_cfg", None) or {}
    first = cfg.get("first_conv")
    first = first[0] if isinstance(first, list | tuple) and first else first
    if isinstance(first, str):
        return f"{first}.weight"
    return next((f"{name}.weight" for name, m in backbone.named_modules() if isinstance(m, nn.Conv2d)), None)


def load_pretrained_backbone(
    backbone_module: nn.Module,
    state_dict_path: str | os.PathLike,
    source: str = "timm",
    strict: bool = True,
) -> LoadReport:
    """Load a torchvision or timm weights file into ``backbone_module`` (a headless timm model), in place.

    Args:
        backbone_module: The backbone, e.g. from :func:`pretrainlab.models.backbones.create_backbone`.
        state_dict_path: ``.pth`` / ``.pt`` / ``.bin`` (``torch.save``) or ``.safetensors`` file.
        source: ``"torchvision"`` or ``"timm"``: whose key names the file uses.
        strict: Raise when a key is missing, unexpected or of another shape (nothing is loaded then);
            with ``False``, load the tensors that fit and report the others.

    Returns:
        The report: keys loaded, missing, unexpected, shape-mismatched, head keys dropped, adapted.

    Raises:
        InteropError: Unreadable file, unknown ``source``, or (``strict``) keys that do not fit.
    """
    if source not in SOURCES:
        raise InteropError(f"source must be one of {', '.join(SOURCES)}, not {source!r}")
    path = Path(state_dict_path)
    state_dict = read_state_dict(path)
    if source == "torchvision":
        family, state_dict = from_torchvision(state_dict)
        report = LoadReport(path, source, f"torchvision {family}")
        if family == "unknown":
            report.notes.append(
                "not a torchvision ResNet, ViT, ConvNeXt or MobileNetV2 state dict: key names compared as they are"
            )
        state_dict = _timm_filter(state_dict, backbone_module, report) if family != "resnet" else state_dict
    else:
        report = LoadReport(path, source, f"timm {_timm_family(backbone_module)}")
        state_dict = _timm_filter(state_dict, backbone_module, report)

    own = backbone_module.state_dict()
    prefixes = _head_prefixes(backbone_module)
    report.dropped_head = sorted(k for k in state_dict if _is_head_key(k, set(own), prefixes))
    state_dict = {k: v for k, v in state_dict.items() if k not in set(report.dropped_head)}
    return load_into_backbone(backbone_module, state_dict, report, strict)


def load_into_backbone(
    backbone_module: nn.Module, state_dict: dict[str, torch.Tensor], report: LoadReport, strict: bool
) -> LoadReport:
    """Load a state dict with the backbone's own key names: adapt the input convolution to the model's
    channels, fill ``report`` with the keys loaded, missing, unexpected and of another shape, then load
    (``strict``: all or nothing, raising :class:`InteropError`; else the tensors that fit).
    """
    own = backbone_module.state_dict()
    state_dict = dict(state_dict)
    first = _first_conv_key(backbone_module)
    if first in state_dict and first in own:
        theirs, mine = state_dict[first], own[first]
        if theirs.ndim == 4 and theirs.shape != mine.shape and theirs.shape[2:] == mine.shape[2:]:
            if theirs.shape[0] == mine.shape[0]:
                state_dict[first] = adapt_input_conv(mine.shape[1], theirs.float()).to(theirs.dtype)
                report.adapted.append(f"{first}: {theirs.shape[1]} -> {mine.shape[1]} input channels")

    report.missing = sorted(k for k in own if k not in state_dict)
    report.unexpected = sorted(k for k in state_dict if k not in own)
    report.mismatched = [
        (k, tuple(v.shape), tuple(own[k].shape)) for k, v in state_dict.items() if k in own and v.shape != own[k].shape
    ]
    bad = {k for k, _, _ in report.mismatched}
    fitting = {k: v for k, v in state_dict.items() if k in own and k not in bad}
    report.loaded = sorted(fitting)
    if strict and not report.complete:
        raise InteropError(
            f"{report.path} does not fit {type(backbone_module).__name__} exactly (strict=True loads nothing):\n"
            + report.summary(limit=None),
            report,
        )
    backbone_module.load_state_dict(fitting, strict=False)
    return report
