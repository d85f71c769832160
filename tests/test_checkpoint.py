"""Checkpoints: atomic, verified, loadable without unpickling."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pretrainlab.checkpoint import (
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


def run_folder(tmp_path, epochs: int):
    """A Ray Train run folder with one checkpoint per epoch, named as Ray names them (oldest first)."""
    folders = []
    for epoch in range(1, epochs + 1):
        weights = {"w": torch.full((2,), float(epoch))}
        folder = save_checkpoint(
            tmp_path / f"checkpoint_2026-01-01_00-00-0{epoch}.000000",
            weights,
            {"epoch": epoch, "step": 10 * epoch},
            {"rng": {}},
        )
        folders.append(folder)
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's own file beside them
    return folders


def corrupt(folder):
    data = bytearray((folder / WEIGHTS_FILE).read_bytes())
    data[-3] ^= 0xFF
    (folder / WEIGHTS_FILE).write_bytes(bytes(data))


def test_resume_falls_back_past_corrupted_and_partial_checkpoints(tmp_path):
    from ray.train import Checkpoint

    from pretrainlab.train.resume import load_resumable

    first, second, third = run_folder(tmp_path, 3)
    assert load_resumable(Checkpoint(str(third))).checkpoint.meta["epoch"] == 3
    corrupt(third)
    (second / STATE_FILE).unlink()  # a checkpoint without its training state cannot be resumed
    resumption = load_resumable(Checkpoint(str(third)))
    assert resumption.checkpoint.meta["epoch"] == 1 and resumption.source == str(first)
    assert resumption.checkpoint.training_state is not None
    summary = resumption.summary()
    assert summary.startswith(f"epoch 1, step 10 from {first} (skipped: {third}/model.safetensors: sha256")
    assert "sha256 does not match" in summary and "training_state.pt: missing" in summary


def test_resume_refuses_when_no_checkpoint_is_good(tmp_path):
    from ray.train import Checkpoint

    from pretrainlab.train.resume import load_resumable

    folders = run_folder(tmp_path, 2)
    for folder in folders:
        corrupt(folder)
    with pytest.raises(CheckpointError, match="no checkpoint of this run can be resumed") as raised:
        load_resumable(Checkpoint(str(folders[-1])))
    assert all(str(folder) in str(raised.value) for folder in folders)


def test_the_final_evaluation_passes_over_a_damaged_best_checkpoint(tmp_path, capsys):
    from ray.train import Checkpoint, Result

    from pretrainlab.train.experiment import best_good_checkpoint

    folders = run_folder(tmp_path, 3)
    scores = [{"val/top1": value} for value in (50.0, 90.0, 70.0)]
    result = Result(
        metrics=scores[-1],
        checkpoint=None,
        error=None,
        path=str(tmp_path),
        best_checkpoints=[(Checkpoint(str(f)), s) for f, s in zip(folders, scores, strict=True)],
    )
    with best_good_checkpoint(result, "val/top1", "max") as (_, metrics, folder):
        assert metrics == {"val/top1": 90.0} and folder == str(folders[1])
    corrupt(folders[1])
    with best_good_checkpoint(result, "val/top1", "max") as (checkpoint, metrics, folder):
        assert checkpoint.path == folder == str(folders[2]) and metrics == {"val/top1": 70.0}
    assert f"passing over a damaged checkpoint: {folders[1]}" in capsys.readouterr().out
    with best_good_checkpoint(result, "val/top1", "min") as (_, metrics, _):
        assert metrics == {"val/top1": 50.0}
    corrupt(folders[0])
    corrupt(folders[2])
    with pytest.raises(CheckpointError, match="none of the 3 kept checkpoints"):
        with best_good_checkpoint(result, "val/top1", "max"):
            pass
