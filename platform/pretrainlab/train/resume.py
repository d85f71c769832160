"""Choosing the checkpoint a run resumes from: the one Ray hands over, or, when that one is
corrupted or incomplete, the newest good checkpoint written before it in the same run folder."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

import pyarrow.fs
import ray.train

from pretrainlab.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint
from pretrainlab.storage import location

CHECKPOINT_PREFIX = "checkpoint_"
"""Ray Train names checkpoint folders ``checkpoint_<timestamp>``; names sort in the order of writing."""


@dataclass
class Resumption:
    """The checkpoint a run resumes from (``source``: its folder or URI) and the newer ones that could not be
    loaded."""

    checkpoint: LoadedCheckpoint
    source: str
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the log and the run's ``pretrainlab.resumed_from`` tag."""
        text = f"epoch {self.checkpoint.meta['epoch']}, step {self.checkpoint.meta['step']} from {self.source}"
        if self.skipped:
            text += f" (skipped: {'; '.join(self.skipped)})"
        return text


def older_checkpoints(checkpoint: ray.train.Checkpoint) -> list[ray.train.Checkpoint]:
    """The checkpoints beside ``checkpoint`` in its run folder that were written before it, newest first."""
    filesystem, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    parent, name = posixpath.split(path)
    if not name.startswith(CHECKPOINT_PREFIX):
        return []
    entries = filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    names = [
        posixpath.basename(entry.path)
        for entry in entries
        if entry.type == pyarrow.fs.FileType.Directory and posixpath.basename(entry.path).startswith(CHECKPOINT_PREFIX)
    ]
    return [
        ray.train.Checkpoint(posixpath.join(parent, older), filesystem=filesystem)
        for older in sorted(names, reverse=True)
        if older < name
    ]


def load_resumable(checkpoint: ray.train.Checkpoint) -> Resumption:
    """Load ``checkpoint`` with its training state; when it fails verification, the newest good older one.

    Raises:
        CheckpointError: No checkpoint of the run can be loaded; the message names each one and its fault.
    """
    skipped = []
    for candidate in [checkpoint, *older_checkpoints(checkpoint)]:
        try:
            with candidate.as_directory() as folder:
                loaded = load_checkpoint(folder, with_training_state=True)
        except CheckpointError as err:
            skipped.append(str(err))  # the message names the file
            continue
        return Resumption(loaded, location(candidate.filesystem, candidate.path), skipped)
    raise CheckpointError("no checkpoint of this run can be resumed from: " + "; ".join(skipped))
