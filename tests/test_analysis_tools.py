"""The analysis toolbox: FLOPs against MMPreTrain's model zoo, speed, schedule, resolved config, dataset checks, CLI."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image
from torch import nn

from conftest import CONFIGS
from pretrainlab import cli
from pretrainlab.analysis import flops, print_config, schedule, speed, verify_dataset
from pretrainlab.config import load_config, validate
from pretrainlab.data.builtin import prepare_builtin
from pretrainlab.data.shards import write_dataset

DIGITS_CONFIG = str(CONFIGS / "test-resnet_2xb32_digits.yaml")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """The built-in digits set, prepared once for the module."""
    return prepare_builtin("digits", tmp_path_factory.mktemp("data"))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- flops -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, params_m, gflops",
    [("resnet18", 11.69, 1.82), ("resnet50", 25.56, 4.12), ("vit_base_patch16_224", 86.57, 17.58)],
)
def test_flops_match_the_mmpretrain_model_zoo(name, params_m, gflops):
    result = flops.count(flops.model_builder(name))
    assert result.input_shape == (1, 3, 224, 224)
    assert result.params / 1e6 == pytest.approx(params_m, rel=0.01)
    assert result.macs / 1e9 == pytest.approx(gflops, rel=0.01)  # MMPreTrain's "FLOPs" are MACs
    assert result.flops == 2 * result.macs  # FlopCounterMode counts a multiply and an add


def test_flops_table_per_top_level_module(tmp_path, capsys):
    out = tmp_path / "flops.csv"
    assert flops.main(["test_resnet", "--input-size", "32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert flops.MACS_LABEL in printed and "input: 1x3x32x32" in printed
    rows = read_csv(out)
    assert rows[-1]["module"] == "total"
    modules = {row["module"]: row for row in rows}
    assert {"conv1", "layer1", "layer4", "fc"} <= set(modules)
    total = rows[-1]
    assert sum(int(row["flops_macs"]) for row in rows[:-1]) == int(total["flops_macs"])
    assert sum(int(row["params"]) for row in rows[:-1]) == int(total["params"])
    assert int(total["flops_raw"]) == 2 * int(total["flops_macs"]) > 0


def test_flops_of_a_config_take_its_prepared_dataset(digits, tmp_path, capsys):
    out = tmp_path / "flops.md"
    args = [DIGITS_CONFIG, "--set", f"data.dataset={digits}", "--depth", "2", "--out", str(out)]
    assert flops.main(args) == 0
    text = out.read_text()
    assert "input: 1x1x8x8" in text and "10 classes" in text and flops.MACS_LABEL in text
    assert "| backbone |" in text and "backbone.layer1" in text and "| head |" in text
    capsys.readouterr()
    assert flops.main([DIGITS_CONFIG, "--set", f"data.dataset={digits}", "--input-size", "16", "--out", str(out)]) == 0
    assert "input: 1x1x16x16" in out.read_text()


def test_flops_fall_back_to_the_cpu_for_a_forward_that_reads_values():
    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum().item() >= 0 else x  # .item() has no value on the meta device

    def build(device):
        with torch.device(device):
            return flops.BuiltModel(Gated(), (1, 4, 4), "gated")

    result = flops.count(build)
    assert result.device == "cpu" and result.macs == 4 * 4 * 4 and result.params == 20


@pytest.mark.parametrize(
    "argv, message",
    [
        (["resnet5O"], "unknown timm model 'resnet5O'; close matches: resnet50"),
        (["configs/no_such_config.yaml"], "config file not found"),
        ([DIGITS_CONFIG, "--set", "model.backbone=resnet1"], "unknown timm model 'resnet1'"),
        (["resnet18", "--set", "optim.lr=1"], "--set applies to a config file"),
        (["vit_base_patch16_224", "--in-chans", "0"], "--in-chans must be positive"),
    ],
)
def test_flops_errors_are_one_line(argv, message, tmp_path, capsys):
    assert flops.main([*argv, "--out", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "x.csv").exists()


# --- speed -------------------------------------------------------------------------------


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_speed_table_per_batch_size(keep_threads, tmp_path, capsys):
    out = tmp_path / "speed.csv"
    argv = ["test_resnet", "--input-size", "32", "--batch-sizes", "1", "4", "--warmup", "1", "--iters", "2"]
    assert speed.main([*argv, "--threads", "1", "--device", "cpu", "--out", str(out)]) == 0
    rows = read_csv(out)
    assert [int(row["batch_size"]) for row in rows] == [1, 4]
    assert all(float(row["images_per_s"]) > 0 and row["threads"] == "1" for row in rows)
    assert "images/s" in capsys.readouterr().out


def test_speed_of_a_config(digits, tmp_path):
    out = tmp_path / "speed.md"
    argv = [DIGITS_CONFIG, "--set", f"data.dataset={digits}", "--batch-sizes", "2", "--warmup", "0", "--iters", "1"]
    assert speed.main([*argv, "--device", "cpu", "--out", str(out)]) == 0
    assert "| 2 |" in out.read_text()


def test_speed_errors(tmp_path, capsys):
    assert speed.main(["test_resnt", "--out", str(tmp_path / "s.csv")]) == 2
    assert "close matches: test_resnet" in capsys.readouterr().err
    assert speed.main(["test_resnet", "--batch-sizes", "0", "--out", str(tmp_path / "s.csv")]) == 2
    assert capsys.readouterr().err.startswith("error: --batch-sizes")


# --- schedule ----------------------------------------------------------------------------


def test_schedule_from_the_prepared_dataset(digits, tmp_path):
    cfg = load_config(DIGITS_CONFIG)
    train_count = json.loads((digits / "manifest.json").read_text())["splits"]["train"]["count"]
    per_epoch = (train_count // cfg.train.num_workers) // cfg.train.batch_size  # what the training loop runs
    table = tmp_path / "schedule.csv"
    assert schedule.main([DIGITS_CONFIG, "--set", f"data.dataset={digits}", "--out", str(table)]) == 0
    rows = read_csv(table)
    assert len(rows) == cfg.train.epochs * per_epoch
    lrs = [float(row["lr"]) for row in rows]
    warmup = round(cfg.schedule.warmup_epochs * per_epoch)
    assert lrs[0] == pytest.approx(cfg.optim.lr * cfg.schedule.warmup_start_factor)
    assert max(lrs) == pytest.approx(cfg.optim.lr) and lrs.index(max(lrs)) == warmup
    assert lrs[-1] < cfg.optim.lr / 10
    assert all(lrs[i] >= lrs[i + 1] for i in range(warmup, len(lrs) - 1))  # cosine decay after warmup
    assert {row["momentum"] for row in rows} == {"0.9"}
    assert {float(row["weight_decay"]) for row in rows} == {cfg.optim.weight_decay}

    png = tmp_path / "schedule.png"
    assert schedule.main([DIGITS_CONFIG, "--set", f"data.dataset={digits}", "--out", str(png)]) == 0
    with Image.open(png) as image:
        image.verify()


def test_schedule_needs_steps_per_epoch_without_a_dataset(project, tmp_path, capsys):
    png = tmp_path / "lr.png"
    assert schedule.main([DIGITS_CONFIG, "--out", str(png)]) == 2  # digits not prepared in this project
    assert "--steps-per-epoch" in capsys.readouterr().err
    argv = [DIGITS_CONFIG, "--steps-per-epoch", "5", "--set", "optim.name=adamw", "--set", "schedule.name=constant"]
    assert schedule.main([*argv, "--out", str(png)]) == 0
    with Image.open(png) as image:
        image.verify()
    table = tmp_path / "lr.csv"
    assert schedule.main([*argv, "--out", str(table)]) == 0
    rows = read_csv(table)
    assert len(rows) == 10 and float(rows[-1]["lr"]) == pytest.approx(0.05)  # constant after warmup
    assert {row["momentum"] for row in rows} == {"0.9"}  # AdamW's beta1


# --- print_config ------------------------------------------------------------------------


def test_print_config_is_the_resolved_yaml(tmp_path, capsys):
    out = tmp_path / "resolved.yaml"
    assert print_config.main([DIGITS_CONFIG, "--set", "optim.lr=0.2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == out.read_text()
    expected = load_config(DIGITS_CONFIG, ["optim.lr=0.2"])
    assert validate(yaml.safe_load(printed)) == expected
    assert "_base_" not in printed and f"config.hash: {expected.digest()}" in printed


def test_print_config_names_a_bad_key(tmp_path, capsys):
    assert print_config.main([DIGITS_CONFIG, "--set", "optim.lrr=1", "--out", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "optim.lrr: unknown key" in err


# --- verify_dataset ----------------------------------------------------------------------


def test_verify_a_clean_dataset(digits, tmp_path, capsys):
    out = tmp_path / "problems.csv"
    assert verify_dataset.main([str(digits), "--out", str(out)]) == 0
    assert read_csv(out) == [] and out.read_text().startswith("split,shard,row")
    assert "1797 rows" in capsys.readouterr().out
    assert verify_dataset.main([str(digits), "--split", "val", "--out", str(out)]) == 0


def test_verify_a_corrupted_shard(digits, tmp_path):
    bad = tmp_path / "digits"
    shutil.copytree(digits, bad)
    shard = bad / "train-00000.parquet"
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    shard.write_bytes(bytes(data))
    out = tmp_path / "problems.csv"
    assert verify_dataset.main([str(bad), "--out", str(out)]) == 1
    problems = read_csv(out)
    assert problems and all(p["shard"] == "train-00000.parquet" for p in problems)
    assert "sha256" in problems[0]["reason"]


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_verify_names_a_row_whose_image_does_not_decode(tmp_path):
    images = [_png(40 * i) for i in range(5)]
    images[3] = images[3][:40]  # truncated PNG
    table = pa.table(
        {
            "image": images,
            "image_format": ["png"] * 5,
            "height": pa.array([8] * 5, pa.int32()),
            "width": pa.array([8] * 5, pa.int32()),
            "channels": pa.array([1] * 5, pa.int32()),
            "label": pa.array([0, 1, 0, 1, 0], pa.int32()),
            "split": ["train"] * 5,
            "source_id": [f"img{i}.png" for i in range(5)],
        }
    )
    folder = tmp_path / "pngs"
    write_dataset(folder, {"train": table}, name="pngs", task="classification", class_names=["a", "b"], shard_size=2)
    out = tmp_path / "problems.csv"
    assert verify_dataset.main([str(folder), "--out", str(out)]) == 1
    [problem] = read_csv(out)
    assert (problem["shard"], problem["row"], problem["split_row"]) == ("train-00001.parquet", "1", "3")
    assert problem["source_id"] == "img3.png" and "cannot decode png image" in problem["reason"]


def test_verify_names_rows_inconsistent_with_the_manifest(digits, tmp_path):
    bad = tmp_path / "digits"
    shutil.copytree(digits, bad)
    shard = bad / "val-00000.parquet"
    table = pq.read_table(shard)
    labels = table.column("label").to_pylist()
    splits = table.column("split").to_pylist()
    labels[5], splits[7] = 42, "train"
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int32()))
    table = table.set_column(table.schema.get_field_index("split"), "split", pa.array(splits, pa.string()))
    pq.write_table(table, shard, compression="zstd")
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (bad / "manifest.json").write_text(json.dumps(manifest))

    out = tmp_path / "problems.csv"
    assert verify_dataset.main([str(bad), "--split", "val", "--out", str(out)]) == 1
    problems = {int(p["row"]): p for p in read_csv(out)}
    assert sorted(problems) == [5, 7]
    assert "field 'label' not in [0, 10)" in problems[5]["reason"]
    assert problems[5]["source_id"] == table.column("source_id")[5].as_py()
    assert "field 'split' is not 'val'" in problems[7]["reason"]


def test_verify_errors(digits, tmp_path, capsys):
    assert verify_dataset.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "p.csv")]) == 2
    assert verify_dataset.main([str(digits), "--split", "tset", "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and "no split 'tset'; known splits: train, val, test" in err


# --- MLflow ------------------------------------------------------------------------------


def test_outputs_logged_to_an_mlflow_run(project, digits, tmp_path, monkeypatch):
    client = MlflowClient()  # the project's sqlite store (MLFLOW_TRACKING_URI)
    run_id = client.create_run(client.create_experiment("analysis")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)  # as inside an active run
    assert flops.main(["test_resnet", "--input-size", "32", "--out", str(tmp_path / "resnet.md")]) == 0
    monkeypatch.delenv("MLFLOW_RUN_ID")
    with_run = ["--mlflow-run", run_id]
    assert schedule.main([DIGITS_CONFIG, "--steps-per-epoch", "4", "--out", str(tmp_path / "lr.png"), *with_run]) == 0
    assert print_config.main([DIGITS_CONFIG, "--out", str(tmp_path / "c.yaml"), *with_run]) == 0
    assert verify_dataset.main([str(digits), "--out", str(tmp_path / "problems.csv"), *with_run]) == 0
    artifacts = {a.path: [b.path for b in client.list_artifacts(run_id, a.path)] for a in client.list_artifacts(run_id)}
    assert artifacts == {
        "flops": ["flops/resnet.md"],
        "schedule": ["schedule/lr.png"],
        "print_config": ["print_config/c.yaml"],
        "verify_dataset": ["verify_dataset/problems.csv"],
    }


# --- the pretrainlab command -------------------------------------------------------------


def test_cli_runs_a_tool(tmp_path):
    out = tmp_path / "flops.csv"
    assert cli.main(["flops", "test_resnet", "--input-size", "32", "--out", str(out)]) == 0
    assert read_csv(out)[-1]["module"] == "total"


def test_cli_help_lists_every_tool(capsys):
    assert cli.main(["--help"]) == 0
    listed = capsys.readouterr().out
    for name in ("flops", "speed", "schedule", "print_config", "verify_dataset", "browse", "tsne", "cam"):
        assert f"  {name} " in listed
    assert "  confusion_matrix  " in listed
    assert cli.main(["flops", "--help"]) == 0
    assert "usage: pretrainlab flops" in capsys.readouterr().out


def test_cli_errors(monkeypatch, capsys):
    assert cli.main(["flop"]) == 2
    assert "unknown tool 'flop'; did you mean flops?" in capsys.readouterr().err
    assert cli.main([]) == 2
    monkeypatch.setitem(cli.TOOLS, "ghost", ("pretrainlab.analysis.no_such_tool", "a tool not written yet"))
    assert cli.main(["ghost"]) == 2
    assert "tool 'ghost' cannot be loaded" in capsys.readouterr().err
    assert cli.main(["print_config", "--help"]) == 0  # the others still run
    assert cli.main(["print_config"]) == 2  # argparse's own error exit


def test_installed_command():
    script = Path(sys.executable).parent / "pretrainlab"
    if not script.exists():
        pytest.skip("the package is not installed in this environment (pip install -e .)")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "verify_dataset" in result.stdout
