"""Decode + augment throughput: PretrainLab's Ray Data pipeline against torchvision ImageFolder + DataLoader.

    python benchmarks/data_loader.py [--fmnist-images 20000] [--scenes-images 6000] [--rounds 3]

Both sides are timed per epoch, after one warm-up epoch, the way training uses them: ours
reads the Parquet shards once, cut into batch-sized blocks and materialised (still
encoded: Fashion-MNIST raw, scenes PNG), then decodes and augments every epoch in
``map_batches`` tasks on a 2-CPU local Ray (``augment_in_ray_data``, what
``data.augment_on: ray_data`` trains with); the baseline reads the same images written as
PNG files in ImageFolder layout through ``DataLoader(num_workers=2, persistent_workers=True)``.
Both use the same torchvision ``transforms.v2`` ops, one thread per process. Cases:

- Fashion-MNIST upsampled to 64 px (Resize, RandomCrop with padding, flip);
- scenes at 128 px (RandomResizedCrop, flip);
- the default training config's own pipeline (Fashion-MNIST, 28 px), against the images/s
  that the default training job consumes (measured by `train_overhead.py`, passed as
  ``--train-consumes``), target >= 3x.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pretrainlab  # noqa: F401  # isort: skip  # first: it keeps a local Ray on 127.0.0.1
import numpy as np
import ray
import ray.data
import torch
import torchvision.transforms.v2 as v2
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from pretrainlab.cluster import init_ray
from pretrainlab.config import ExperimentConfig, load_config, validate
from pretrainlab.data.catalog import dataset_dir
from pretrainlab.data.dataset import decode_images, read_split
from pretrainlab.data.pipeline import augment_in_ray_data, batch_blocks
from pretrainlab.data.scenes import write_scenes
from pretrainlab.data.shards import shard_paths
from pretrainlab.data.transforms import build_op

BATCH = 128
FMNIST_64 = [
    {"type": "Resize", "size": 64},
    {"type": "RandomCrop", "size": 64, "padding": 4},
    {"type": "RandomHorizontalFlip"},
]
SCENES_128 = [{"type": "RandomResizedCrop", "size": 128, "scale": [0.5, 1.0]}, {"type": "RandomHorizontalFlip"}]


def encoded_blocks(folder: str, pipeline: list[dict], rows: int) -> tuple[ray.data.Dataset, ExperimentConfig]:
    """The first ``rows`` training rows cut into batch-sized blocks and materialised, as training does once."""
    cfg = validate({"name": "loader", "data": {"train_pipeline": pipeline}, "train": {"batch_size": BATCH}})
    return batch_blocks(read_split(folder, "train").limit(rows), cfg).materialize(), cfg


def ours(blocks: ray.data.Dataset, cfg: ExperimentConfig) -> float:
    """images/s of one epoch: decode + augment in map_batches -> iter_batches."""
    start, seen = time.perf_counter(), 0
    for batch in augment_in_ray_data(blocks, cfg).iter_batches(batch_size=BATCH, batch_format="numpy"):
        seen += len(batch["image"])
    return seen / (time.perf_counter() - start)


def write_image_folder(folder: str, rows: int, out: Path) -> Path:
    """The first ``rows`` training images of a shard folder as PNG files, one folder per label."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables(pq.read_table(p) for p in shard_paths(folder, "train")).slice(0, rows)
    batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    images = decode_images(batch)
    labels = batch["label"] if "label" in batch else np.zeros(len(images), dtype=int)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        target = out / str(label)
        target.mkdir(parents=True, exist_ok=True)
        pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        Image.fromarray(pixels).save(target / f"{i:06d}.png")
    return out


def image_folder_loader(image_folder: Path, pipeline: list[dict], channels: int) -> DataLoader:
    """torchvision ImageFolder + DataLoader(num_workers=2, persistent workers) with the same ops."""
    mode = "L" if channels == 1 else "RGB"
    transform = v2.Compose([v2.PILToTensor(), *(build_op(op, "baseline") for op in pipeline)])
    dataset = ImageFolder(str(image_folder), transform=transform, loader=lambda p: Image.open(p).convert(mode))
    return DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=2, persistent_workers=True)


def baseline(loader: DataLoader) -> float:
    """images/s of one epoch of ``loader``."""
    start, seen = time.perf_counter(), 0
    for images, _ in loader:
        seen += len(images)
    return seen / (time.perf_counter() - start)


def compare(name: str, folder: str, pipeline: list[dict], rows: int, channels: int, rounds: int, work: Path) -> float:
    """Alternating epochs of both sides after one warm-up epoch each; prints the medians and their ratio."""
    loader = image_folder_loader(write_image_folder(folder, rows, work / f"{name}-png"), pipeline, channels)
    blocks, cfg = encoded_blocks(folder, pipeline, rows)
    ours(blocks, cfg)  # warm-up: Ray starts its worker processes, the DataLoader forks its own
    baseline(loader)
    ours_runs, base_runs = [], []
    for _ in range(rounds):
        ours_runs.append(ours(blocks, cfg))
        base_runs.append(baseline(loader))
    ours_m, base_m = statistics.median(ours_runs), statistics.median(base_runs)
    print(f"{name}: ours {ours_m:8.0f} img/s (runs {[round(r) for r in ours_runs]})")
    print(f"{' ' * len(name)}  ImageFolder+DataLoader {base_m:8.0f} img/s (runs {[round(r) for r in base_runs]})")
    print(f"{' ' * len(name)}  ratio {ours_m / base_m:.2f} (target >= 1.0)")
    return ours_m


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fmnist-images", type=int, default=20000)
    parser.add_argument("--scenes-images", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--config", default="configs/resnet10t_1xb128_fmnist.yaml")
    parser.add_argument("--train-consumes", type=float, default=945.0, help="images/s of the default training job")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # each loader process works on one core, on both sides
    work = Path(tempfile.mkdtemp(prefix="pretrainlab-loader-"))
    cfg = load_config(args.config)
    fmnist = dataset_dir(cfg)
    scenes = str(write_scenes(work / "scenes", num_images=args.scenes_images, image_size=128)["caption"])
    init_ray(num_cpus=2)

    compare("fmnist@64", fmnist, FMNIST_64, args.fmnist_images, 1, args.rounds, work)
    compare("scenes@128", scenes, SCENES_128, args.scenes_images, 3, args.rounds, work)
    blocks, default_cfg = encoded_blocks(fmnist, cfg.data.train_pipeline, args.fmnist_images)
    ours(blocks, default_cfg)  # warm-up
    default = statistics.median(ours(blocks, default_cfg) for _ in range(args.rounds))
    print(f"default config pipeline ({args.config}): ours {default:.0f} img/s")
    print(f"  = {default / args.train_consumes:.1f}x the {args.train_consumes:.0f} img/s the default job trains at")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
