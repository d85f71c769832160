"""Checkpoints: atomic, verified, loadable without unpickling."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pretrainlab.train.checkpoint import (
    META_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)


def make(tmp_path):
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "rng": {"torch": torch.get_rng_state()}}
    folder = save_checkpoint(tmp_path / "ckpt", model.state_dict(), {"epoch": 3, "class_names": ["a", "b", "c"]}, state)
    return model, optimizer, folder


def test_round_trip_with_training_state(tmp_path):
    model, optimizer, folder = make(tmp_path)
    assert sorted(os.listdir(folder)) == sorted([WEIGHTS_FILE, META_FILE, STATE_FILE])
    loaded = load_checkpoint(folder, with_training_state=True)
    assert loaded.meta["epoch"] == 3 and loaded.meta["class_names"] == ["a", "b", "c"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.weights[key], value)
    fresh = torch.optim.SGD(torch.nn.Linear(4, 3).parameters(), lr=0.1, momentum=0.9)
    fresh.load_state_dict(loaded.training_state["optimizer"])
    torch.testing.assert_close(
        fresh.state_dict()["state"][0]["momentum_buffer"], optimizer.state_dict()["state"][0]["momentum_buffer"]
    )
    assert loaded.training_state["rng"]["torch"].dtype == torch.uint8


def test_no_temporary_folders_are_left_and_rewrite_replaces(tmp_path):
    make(tmp_path)
    make(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_failed_write_leaves_no_partial_checkpoint(tmp_path):
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "ckpt", {"w": torch.zeros(2)}, {"not_json": object()})
    assert list(tmp_path.iterdir()) == []


def test_corrupted_weights_are_detected(tmp_path):
    _, _, folder = make(tmp_path)
    data = bytearray((folder / WEIGHTS_FILE).read_bytes())
    data[-3] ^= 0xFF
    (folder / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 does not match"):
        load_checkpoint(folder)


def test_missing_files_are_named(tmp_path):
    _, _, folder = make(tmp_path)
    (folder / STATE_FILE).unlink()
    load_checkpoint(folder)  # weights alone still load
    with pytest.raises(CheckpointError, match="training_state.pt: missing"):
        load_checkpoint(folder, with_training_state=True)
    (folder / META_FILE).unlink()
    with pytest.raises(CheckpointError, match="not a PretrainLab checkpoint"):
        load_checkpoint(folder)


def test_training_state_is_never_unpickled(tmp_path):
    _, _, folder = make(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"optimizer": Evil()}, folder / STATE_FILE)
    with pytest.raises(CheckpointError, match="training_state.pt: unreadable"):
        load_checkpoint(folder, with_training_state=True)


def test_meta_records_the_weights_hash(tmp_path):
    _, _, folder = make(tmp_path)
    meta = json.loads((folder / META_FILE).read_text())
    assert len(meta["weights_sha256"]) == 64 and meta["format_version"] == 1
