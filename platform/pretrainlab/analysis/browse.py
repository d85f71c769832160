"""Dataset browser: a grid of training samples as the model sees them, written to a PNG (and to MLflow).

    python -m pretrainlab.analysis.browse configs/resnet10t_1xb128_fmnist.yaml [--split train] [--num 16]
    python -m pretrainlab.analysis.browse CONFIG --set data.dataset=data/scenes/vqa --out scenes-vqa.png

Classification sets are shown after the config's training pipeline (every view of a
multi-view config, side by side, with the patch mask shaded when one is configured), with
their class names. Image-text sets (caption, vqa, grounding, retrieval) are shown as
decoded, with their captions, questions and answers, hard negatives, and referred boxes
drawn on the image. With ``--mlflow-run ID`` (or inside an active run, ``MLFLOW_RUN_ID``)
the PNG is also logged to that run under ``browse/``.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from pretrainlab.config import ConfigError, ExperimentConfig, load_config  # noqa: E402
from pretrainlab.data.catalog import dataset_dir  # noqa: E402
from pretrainlab.data.dataset import decode_images  # noqa: E402
from pretrainlab.data.errors import DatasetError  # noqa: E402
from pretrainlab.data.pipeline import Preprocessor, view_key  # noqa: E402
from pretrainlab.data.shards import load_manifest, shard_paths  # noqa: E402
from pretrainlab.data.transforms import PipelineError  # noqa: E402
from pretrainlab.paths import resolve_tracking_uri  # noqa: E402
from pretrainlab.tracking.mlflow import client_for


def read_rows(folder: str, split: str, count: int, seed: int) -> dict[str, np.ndarray]:
    """``count`` rows of a split, picked at random with ``seed`` (all columns)."""
    table = pa.concat_tables(pq.read_table(path) for path in shard_paths(folder, split))
    chosen = np.sort(np.random.default_rng(seed).choice(table.num_rows, min(count, table.num_rows), replace=False))
    picked = table.take(chosen)
    return {name: picked.column(name).to_numpy(zero_copy_only=False) for name in picked.column_names}


def _show(ax: plt.Axes, image: np.ndarray, title: str = "") -> None:
    """Draw one C x H x W uint8 image."""
    ax.imshow(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=255)
    ax.set_title(title, fontsize=7, loc="left", wrap=True)
    ax.axis("off")


def _text_of(task: str, rows: dict[str, np.ndarray], i: int) -> str:
    """The annotations of row ``i`` of an image-text set, as a few wrapped lines."""
    if task in ("caption", "retrieval"):
        lines = [f"+ {c}" for c in rows["captions"][i][:2]]
        if task == "retrieval":
            lines += [f"- {c}" for c in rows["negatives"][i][:1]]
    elif task == "vqa":
        lines = [f"Q: {q['question']}  A: {q['answers'][0]}" for q in rows["questions"][i][:2]]
    else:
        lines = [f"[{k}] {ref['expressions'][0]}" for k, ref in enumerate(rows["refs"][i][:3])]
    return "\n".join(textwrap.fill(line, 38) for line in lines)


def draw_grid(cfg: ExperimentConfig, folder: str, split: str, count: int, seed: int) -> plt.Figure:
    """The figure of ``count`` samples of ``split`` of the dataset at ``folder``."""
    manifest = load_manifest(folder)
    task = manifest["task"]
    rows = read_rows(folder, split, count, seed)
    if task == "classification":
        batch = Preprocessor(cfg.data, train=True, seed=seed)(rows)
        total_views = sum(view.count for view in cfg.data.views)
        views = [batch["image"]] if "image" in batch else [batch[view_key(i)] for i in range(total_views)]
        names = manifest["class_names"]
        fig, axes = plt.subplots(len(rows["image"]), len(views), figsize=(1.8 * len(views), 1.8 * len(rows["image"])))
        axes = np.asarray(axes).reshape(len(rows["image"]), len(views))
        for i, label in enumerate(batch["label"]):
            for v, view in enumerate(views):
                _show(axes[i, v], view[i], (names[label] if label >= 0 else "unlabelled") if v == 0 else f"view {v}")
                if "mask" in batch and v == 0:
                    mask = np.kron(batch["mask"][i], np.ones((cfg.data.mask.patch_size,) * 2))
                    axes[i, v].imshow(np.ma.masked_where(mask == 0, mask), cmap="autumn", alpha=0.5)
        return fig
    images = decode_images(rows)
    columns = 4
    grid_rows = -(-len(images) // columns)
    fig, axes = plt.subplots(grid_rows, columns, figsize=(3.2 * columns, 3.9 * grid_rows), squeeze=False)
    for ax in axes.flat[len(images) :]:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[: len(images)]):
        _show(ax, images[i])
        ax.set_xlabel(_text_of(task, rows, i), fontsize=6, loc="left")
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        if task == "grounding":
            for k, ref in enumerate(rows["refs"][i][:3]):
                x1, y1, x2, y2 = ref["box"]
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=f"C{k}", linewidth=1.5))
    fig.suptitle(f"{manifest['name']} ({task}), split {split}", fontsize=9)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML experiment config (its data section picks the dataset and pipeline)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--split", default="train")
    parser.add_argument("--num", type=int, default=16, help="how many samples")
    parser.add_argument("--seed", type=int, default=0, help="which samples, and their augmentation")
    parser.add_argument("--out", default="browse.png", help="PNG file to write")
    parser.add_argument("--mlflow-run", default=os.environ.get("MLFLOW_RUN_ID"), help="also log to this MLflow run")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        folder = dataset_dir(cfg)
        fig = draw_grid(cfg, folder, args.split, args.num, args.seed)
    except (ConfigError, DatasetError, PipelineError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"wrote {out}")
    if args.mlflow_run:
        client_for(resolve_tracking_uri(cfg.runtime.tracking_uri)).log_artifact(args.mlflow_run, str(out), "browse")
        print(f"logged to MLflow run {args.mlflow_run} under browse/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
