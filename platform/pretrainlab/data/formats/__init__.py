"""Source formats converted to Parquet shards: one module per format, one registry.

``FORMATS`` maps a format name to its task family (a key of ``shards.SCHEMAS``) and its
converter. A converter ``(src, images, bad) -> Source`` scans the source into entries
that each load one row of that family's schema (see ``common``); ``prepare`` runs a
converter and writes the dataset.
"""

from __future__ import annotations

from pretrainlab.data.formats.cifar import convert_cifar
from pretrainlab.data.formats.coco_captions import convert_coco_captions
from pretrainlab.data.formats.common import Converter
from pretrainlab.data.formats.idx import convert_idx
from pretrainlab.data.formats.imagefolder import convert_imagefolder
from pretrainlab.data.formats.karpathy import convert_karpathy
from pretrainlab.data.formats.listfile import convert_listfile
from pretrainlab.data.formats.refcoco import convert_refcoco
from pretrainlab.data.formats.vqav2 import convert_vqav2

FORMATS: dict[str, tuple[str, Converter]] = {
    "imagefolder": ("classification", convert_imagefolder),
    "listfile": ("classification", convert_listfile),
    "idx": ("classification", convert_idx),
    "cifar": ("classification", convert_cifar),
    "coco_captions": ("caption", convert_coco_captions),
    "vqav2": ("vqa", convert_vqav2),
    "refcoco": ("grounding", convert_refcoco),
    "karpathy": ("retrieval", convert_karpathy),
}
