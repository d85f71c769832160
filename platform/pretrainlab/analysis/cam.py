"""Class activation maps (Grad-CAM, Grad-CAM++, Eigen-CAM) of a classifier on a dataset split, as a PNG grid.

    python -m pretrainlab.analysis.cam runs/<run>/checkpoint_.../checkpoint [--split test] [--num 8]
    python -m pretrainlab.analysis.cam models:/fmnist-classifier@champion --method gradcam++ --target-layer layer3

Takes a class-stratified sample of ``--num`` images (chosen with ``--seed``), computes the
map of each image for the class the model predicts (``pytorch_grad_cam``), and draws the
images as the model sees them (after the evaluation pipeline) with the map overlaid,
titled with the true and the predicted class (green when right, red when wrong).

The target layer defaults to the backbone's last stage: for CNNs the last entry of timm's
``feature_info`` (else the last module with a 4-D output), for ViTs the ``norm1`` of the last
block, whose tokens are laid back on the patch grid (prefix tokens such as the class token
skipped). ``--target-layer`` names any module of the backbone (``layer3``,
``blocks.4.norm1``, ``stages.2``). With ``--mlflow-run ID`` the PNG is logged under ``cam/``.
"""

from __future__ import annotations

import argparse
import difflib
import math
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402
from torch import nn  # noqa: E402

from pretrainlab.analysis.export import ClassifierLogits  # noqa: E402
from pretrainlab.analysis.outputs import (  # noqa: E402
    ERRORS,
    AnalysisError,
    add_output_arguments,
    check_mlflow_run,
    publish,
    report_error,
)
from pretrainlab.analysis.samples import backbone_of, eval_images, load_subset  # noqa: E402

METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "eigencam": EigenCAM}
_HEAD_PARTS = ("global_pool", "head", "fc_norm", "head_drop", "pre_logits")


def default_target_layer(backbone: nn.Module, example: torch.Tensor) -> str:
    """The name (inside ``backbone``) of the layer whose activations the map is built from."""
    blocks = getattr(backbone, "blocks", None)
    if hasattr(backbone, "num_prefix_tokens") and isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks):
        last = len(blocks) - 1
        return (
            f"blocks.{last}.norm1" if isinstance(getattr(blocks[last], "norm1", None), nn.Module) else f"blocks.{last}"
        )
    info = getattr(backbone, "feature_info", None)
    if isinstance(info, list) and info and isinstance(info[-1], dict) and info[-1].get("module"):
        name = info[-1]["module"]
        if _find(backbone, name) is not None:
            return name
    names = {m: n for n, m in backbone.named_modules() if n and not n.startswith(_HEAD_PARTS)}
    order: list[str] = []

    def record(module: nn.Module, _inputs, out) -> None:
        pooled = "Pool" in type(module).__name__ and isinstance(out, torch.Tensor) and out.shape[-2:] == (1, 1)
        if isinstance(out, torch.Tensor) and out.ndim == 4 and not pooled:
            order.append(names[module])

    hooks = [module.register_forward_hook(record) for module in names]
    try:
        with torch.no_grad():
            backbone(example)
    finally:
        for hook in hooks:
            hook.remove()
    if not order:
        raise AnalysisError(f"{type(backbone).__name__} has no layer with a 2-D feature map; pass --target-layer")
    return order[-1]


def _find(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


def resolve_layer(backbone: nn.Module, name: str) -> nn.Module:
    """The backbone's module called ``name`` (a ``backbone.`` prefix is accepted)."""
    layer = _find(backbone, name.removeprefix("backbone."))
    if layer is None or not name:
        names = [n for n, _ in backbone.named_modules() if n]
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"; close matches: {', '.join(close)}" if close else f"; e.g. {', '.join(names[-5:])}"
        raise AnalysisError(f"--target-layer {name!r}: no such module in {type(backbone).__name__}{hint}")
    return layer


def reshape_for(backbone: nn.Module, layer: nn.Module, example: torch.Tensor) -> Callable | None:
    """How to turn the layer's output into ``N x C x H x W``: ``None`` when it already is one.

    Token outputs (``N x tokens x C``, ViTs) drop ``backbone.num_prefix_tokens`` leading tokens and
    are laid on the patch grid; channels-last maps (timm's ``output_fmt == 'NHWC'``) are permuted.
    """
    seen: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.no_grad():
            backbone(example)
    finally:
        hook.remove()
    if not seen or not isinstance(seen[0], torch.Tensor):
        raise AnalysisError(f"the target layer {type(layer).__name__} did not return one tensor")
    out = seen[0]
    if out.ndim == 4:
        if getattr(backbone, "output_fmt", "NCHW") == "NHWC" and not isinstance(layer, nn.Conv2d):
            return lambda t: t.permute(0, 3, 1, 2)
        return None
    if out.ndim != 3:
        raise AnalysisError(f"the target layer's output is {tuple(out.shape)}: neither a feature map nor tokens")
    prefix = int(getattr(backbone, "num_prefix_tokens", 0) or 0)
    tokens = out.shape[1] - prefix
    grid = getattr(getattr(backbone, "patch_embed", None), "grid_size", None)
    if grid is not None and math.prod(grid) == tokens:
        h, w = int(grid[0]), int(grid[1])
    elif math.isqrt(tokens) ** 2 == tokens:
        h = w = math.isqrt(tokens)
    else:
        raise AnalysisError(f"cannot lay {tokens} tokens of the target layer on a 2-D grid; pass --target-layer")

    def tokens_to_grid(t: torch.Tensor) -> torch.Tensor:
        return t[:, prefix:, :].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)

    return tokens_to_grid


def compute_cams(
    model: nn.Module, inputs: torch.Tensor, method: str, target_layer: str | None, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray, str]:
    """``(maps N x H x W in [0, 1], predicted classes, target layer name)`` for normalised model inputs."""
    if method not in METHODS:
        raise AnalysisError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    backbone = model.backbone if isinstance(getattr(model, "backbone", None), nn.Module) else None
    if backbone is None:
        raise AnalysisError(f"{type(model).__name__} has no backbone module")
    example = inputs[:1]
    name = target_layer if target_layer else default_target_layer(backbone, example)
    layer = resolve_layer(backbone, name)
    reshape = reshape_for(backbone, layer, example)
    logits_model = ClassifierLogits(model).eval()
    with torch.no_grad():
        preds = torch.cat([logits_model(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])
    preds = preds.argmax(1).numpy()
    maps = []
    with METHODS[method](model=logits_model, target_layers=[layer], reshape_transform=reshape) as cam:
        for start in range(0, len(inputs), batch_size):
            targets = [ClassifierOutputTarget(int(p)) for p in preds[start : start + batch_size]]
            maps.append(cam(input_tensor=inputs[start : start + batch_size], targets=targets))
    return np.concatenate(maps), preds, name.removeprefix("backbone.")


def _as_picture(image: torch.Tensor) -> tuple[np.ndarray, str | None]:
    """A C x H x W uint8 tensor as something ``imshow`` draws: gray for 1 channel, RGB for 3."""
    pixels = image.numpy()
    if pixels.shape[0] == 3:
        return pixels.transpose(1, 2, 0), None
    return pixels[0], "gray"


def draw(
    seen: torch.Tensor, maps: np.ndarray, labels: np.ndarray, preds: np.ndarray, class_names: list[str], title: str
) -> plt.Figure:
    """A grid of the images with their maps overlaid, each titled ``true / predicted``."""
    columns = min(4, len(seen))
    rows = -(-len(seen) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.9 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[: len(seen)]):
        picture, cmap = _as_picture(seen[i])
        ax.imshow(picture, cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
        ax.imshow(maps[i], cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0, interpolation="bilinear")
        right = labels[i] == preds[i]
        ax.set_title(
            f"true: {class_names[labels[i]]}\npred: {class_names[preds[i]]}",
            fontsize=8,
            color="tab:green" if right else "tab:red",
        )
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="checkpoint folder, models:/NAME@alias, models:/NAME/VERSION or runs:/ID/path")
    parser.add_argument("--split", default="test", help="dataset split (default: test)")
    parser.add_argument("--num", type=int, default=8, help="how many images, stratified by class (default: 8)")
    parser.add_argument("--method", default="gradcam", help=f"{' | '.join(METHODS)} (default: gradcam)")
    parser.add_argument("--target-layer", help="module of the backbone (default: its last stage / last block)")
    parser.add_argument("--seed", type=int, default=0, help="which images")
    add_output_arguments(parser, "cam.png")
    args = parser.parse_args(argv)
    try:
        if args.num < 1:
            raise AnalysisError(f"--num must be at least 1, not {args.num}")
        if args.method not in METHODS:
            raise AnalysisError(f"--method must be one of {', '.join(METHODS)}, not {args.method!r}")
        check_mlflow_run(args)
        loaded, images, labels, _ = load_subset(args.source, args.split, args.num, args.seed, args.tracking_uri)
        backbone_of(loaded)
        seen, inputs = eval_images(images, loaded.config.data)
        maps, preds, layer = compute_cams(loaded.model, inputs, args.method, args.target_layer)
        title = f"{args.method} on {loaded.config.model.backbone} [{layer}], {loaded.config.data.dataset} {args.split}"
        print(f"{args.method}: target layer {layer} of {loaded.config.model.backbone}, {len(labels)} images")
        fig = draw(seen, maps, labels, preds, loaded.class_names, title)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
        plt.close(fig)
        publish(out, args, "cam")
    except (*ERRORS, MlflowException) as err:
        return report_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
