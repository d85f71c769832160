"""Convert a dataset in a standard format to PretrainLab's Parquet shards.

On this machine:

    python jobs/prepare_data.py imagefolder /data/pets data/pets
    python jobs/prepare_data.py coco_captions /data/coco data/coco_captions --image-size 256 --skip-bad

On a running cluster (`ray start --head --node-ip-address=127.0.0.1` first; SRC and OUT are
paths on the node that runs the job, so give them absolute):

    export RAY_AUTH_MODE=token
    ray job submit --working-dir . -- \
        python jobs/prepare_data.py cifar /data/cifar-10-batches-py /data/shards/cifar10

FORMAT is one of imagefolder, listfile, idx, cifar (classification), coco_captions
(caption), vqav2 (vqa), refcoco (grounding), karpathy (retrieval), or ``scenes``, which
generates the CLEVR-like image-text set (SRC is ignored, give ``-``; ``--num-images``,
``--image-size`` 64-128 and ``--seed`` apply) into OUT/caption, vqa, grounding and
retrieval; each format's module in
``pretrainlab/data/formats/`` says what SRC holds. Image bytes are kept as they are unless
``--image-size S`` is given: then every image is resized so its shorter side is S pixels
and re-encoded as PNG (grounding boxes are scaled with it). Converting the same input with
the same options twice gives byte-identical shards.

Bad input (an unreadable or truncated image, a missing file, a label out of range, a path
that leaves SRC, malformed JSON) stops the job with exit code 2 and a message naming the
file and entry; ``--skip-bad`` skips such entries instead and lists them in
``OUT/skipped.jsonl``, their count in the manifest's metadata.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from pretrainlab.data.errors import DatasetError
from pretrainlab.data.formats import FORMATS
from pretrainlab.data.formats.prepare import SKIPPED_FILE, prepare_dataset
from pretrainlab.data.scenes import write_scenes
from pretrainlab.data.shards import MANIFEST_FILE, load_manifest

SCENES = "scenes"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("format", choices=[*FORMATS, SCENES], help="source format, or scenes to generate that set")
    parser.add_argument("src", help="source file or folder (see the format's module)")
    parser.add_argument("out", help="dataset folder to write (replaced atomically)")
    parser.add_argument("--shard-size", type=int, default=20000, help="most rows per shard (default 20000)")
    parser.add_argument("--image-size", type=int, help="resize so the shorter side is S pixels (re-encodes as PNG)")
    parser.add_argument("--split", help="name of the split when SRC holds one split only")
    parser.add_argument("--images", help="image folder of an image-text format, instead of its default place")
    parser.add_argument("--skip-bad", action="store_true", help="skip bad entries and list them in skipped.jsonl")
    parser.add_argument("--seed", type=int, default=0, help="seeds the row order within each split (default 0)")
    parser.add_argument("--num-images", type=int, default=10000, help="scenes: how many images (default 10000)")
    return parser.parse_args(argv)


def generate_scenes(args: argparse.Namespace) -> int:
    """``scenes``: generate the image-text set into OUT/{caption,vqa,grounding,retrieval}."""
    folders = write_scenes(args.out, num_images=args.num_images, image_size=args.image_size or 96, seed=args.seed)
    for task, folder in folders.items():
        counts = {split: entry["count"] for split, entry in load_manifest(folder)["splits"].items()}
        print(f"{task}: {folder} {counts}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.format == SCENES:
            return generate_scenes(args)
        manifest = prepare_dataset(
            args.format,
            args.src,
            args.out,
            shard_size=args.shard_size,
            split=args.split,
            images=args.images,
            image_size=args.image_size,
            skip_bad=args.skip_bad,
            seed=args.seed,
            progress=lambda entries: tqdm(entries, desc=args.format, unit="entry"),
        )
    except (DatasetError, ValueError) as e:
        print(f"prepare_data: {e}", file=sys.stderr)
        return 2

    out = Path(args.out)
    for split, entry in manifest["splits"].items():
        print(f"{split}: {entry['count']} rows in {len(entry['shards'])} shards")
    print(f"skipped: {manifest['metadata']['skipped']} bad entries (listed in {out / SKIPPED_FILE})")
    print(f"manifest: {out / MANIFEST_FILE} (task {manifest['task']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
