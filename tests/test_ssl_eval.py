"""Evaluation protocols of self-supervised checkpoints: kNN, the linear probe, fine-tuning's overrides (no Ray).

The jobs run on a real checkpoint: timm's ``test_resnet`` trained for a few SGD steps on the prepared
scikit-learn digits, in a project folder with its own MLflow sqlite store.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import evaluate as evaluate_job
import finetune
import knn_eval
import linear_probe
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import nn

from conftest import CONFIGS, train_digits_checkpoint
from pretrainlab.checkpoint import checkpoint_meta, save_checkpoint
from pretrainlab.config import load_config
from pretrainlab.data.builtin import prepare_builtin
from pretrainlab.data.dataset import load_split_numpy
from pretrainlab.evaluation.classification import eval_batches
from pretrainlab.evaluation.embedding import (
    FeatureError,
    evaluate_probe,
    extract_features,
    feature_extractor,
    knn_accuracies,
    train_linear_probe,
)
from pretrainlab.evaluation.tasks import EVALUATORS, log_report
from pretrainlab.inference.loading import load_model
from pretrainlab.metrics.knn import knn_predict
from pretrainlab.strategies import get_strategy, supervised
from pretrainlab.tracking.mlflow import client_for, ensure_experiment

DIGITS_CONFIG = CONFIGS / "test-resnet_2xb32_digits.yaml"
TINY_VIT = {"img_size": 8, "patch_size": 2, "depth": 3, "embed_dim": 24, "num_heads": 2}
"""A 3-block ViT on 2 x 2 patches of 8 x 8 images (timm ``vit_tiny_patch16_224`` kwargs)."""
FINETUNE_CONFIG = CONFIGS / "finetune_vit-d6w96-p4_fmnist.yaml"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models and t-SNE of a few hundred points: one thread is as fast, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A project folder with prepared digits, a parent MLflow run and a checkpoint that names it."""
    home = tmp_path_factory.mktemp("project")
    uri = f"sqlite:///{home}/mlflow.db"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PRETRAINLAB_HOME", str(home))
        env.setenv("MLFLOW_TRACKING_URI", uri)
        cfg = load_config(DIGITS_CONFIG)
        folder = prepare_builtin("digits", home / "data")
        client = client_for(uri)
        parent = client.create_run(ensure_experiment(client, cfg.runtime.experiment)).info.run_id
        checkpoint = train_digits_checkpoint(cfg, folder, home / "checkpoint", 30, parent)
        client.log_artifacts(parent, str(checkpoint), "checkpoint")
        yield SimpleNamespace(cfg=cfg, folder=folder, client=client, parent=parent, checkpoint=checkpoint)


@pytest.fixture(scope="module")
def digits_vit(digits):
    """``TINY_VIT`` on the digits, trained like ``digits``' checkpoint, in the same run."""
    vit = f"model.backbone_kwargs={json.dumps(TINY_VIT)}"
    cfg = load_config(DIGITS_CONFIG, ["model.backbone=vit_tiny_patch16_224", vit, "model.stem_stride=null"])
    return train_digits_checkpoint(cfg, digits.folder, digits.checkpoint.parent / "vit-checkpoint", 30, digits.parent)


def child_runs(client, parent: str) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


# --- kNN ---------------------------------------------------------------------------------------


def test_knn_on_one_hot_label_features_is_perfect():
    bank_labels = torch.arange(60) % 5
    query_labels = torch.arange(23) % 5
    bank, queries = F.one_hot(bank_labels, 5).float(), F.one_hot(query_labels, 5).float()
    assert knn_accuracies(bank, bank_labels, queries, query_labels, 5, (20, 200)) == {20: 100.0, 200: 100.0}
    leave_one_out = knn_accuracies(bank, bank_labels, bank, bank_labels, 5, (1, 20, 200), exclude_self=True)
    assert leave_one_out == {1: 100.0, 20: 100.0, 200: 100.0}


def test_knn_votes_are_weighted_by_temperature():
    # query (1, 0): class 1 at cosine 1, two class-0 points at cosine 0.8 -> votes [2 e^(0.8/T), e^(1/T)];
    # class 0 wins iff ln 2 > 0.2 / T, i.e. T > 0.2 / ln 2 = 0.2885
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])
    bank_labels = torch.tensor([1, 0, 0])
    query = torch.tensor([[2.0, 0.0]])  # normalised by knn_predict
    for temperature, winner in ((0.07, 1), (0.25, 1), (0.35, 0), (1.0, 0)):
        scores = knn_predict(query, bank, bank_labels, 2, k=3, temperature=temperature)
        expected = torch.tensor([[2 * math.exp(0.8 / temperature), math.exp(1.0 / temperature)]])
        torch.testing.assert_close(scores, expected, rtol=1e-5, atol=0)
        assert scores.argmax().item() == winner
    assert knn_accuracies(bank, bank_labels, query, torch.tensor([0]), 2, (1, 3), temperature=1.0) == {1: 0.0, 3: 100.0}


def test_extract_features_runs_the_backbone_in_eval_mode_without_grad(digits):
    backbone = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(64, 7))
    images = np.random.default_rng(0).integers(0, 256, (10, 1, 8, 8), dtype=np.uint8)
    first = extract_features(backbone, images, digits.cfg.data, batch_size=3)
    assert first.shape == (10, 7) and first.dtype == torch.float32 and not first.requires_grad
    assert not backbone.training
    mean, std = digits.cfg.data.mean[0], digits.cfg.data.std[0]
    expected = backbone[2]((torch.from_numpy(images).float().flatten(1) / 255 - mean) / std)
    torch.testing.assert_close(first, expected.detach())


def test_last_blocks_features_are_dinos_class_tokens_and_mean_patch_token():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", **TINY_VIT)
    vit.eval()
    block_outputs = []
    for block in vit.blocks:
        block.register_forward_hook(lambda module, inputs, output: block_outputs.append(output))
    images = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        features = feature_extractor(vit, "last-blocks", blocks=2)(images)
        block_outputs.clear()
        vit(images)
        last, before = vit.norm(block_outputs[2]), vit.norm(block_outputs[1])
    assert features.shape == (5, 3 * 24)
    expected = torch.cat([before[:, 0], last[:, 0], last[:, 1:].mean(dim=1)], dim=1)
    torch.testing.assert_close(features, expected)
    assert feature_extractor(vit, "pooled") is vit


def test_last_blocks_features_reject_backbones_they_do_not_fit():
    vit = timm.create_model("vit_tiny_patch16_224", **TINY_VIT)
    with pytest.raises(FeatureError, match="blocks must be between 1 and the ViT's depth 3, got 4"):
        feature_extractor(vit, "last-blocks", blocks=4)
    with pytest.raises(FeatureError, match="need a timm ViT with a class token, not ResNet"):
        feature_extractor(timm.create_model("resnet10t"), "last-blocks")
    with pytest.raises(FeatureError, match="unknown features 'patches'; choose from pooled, last-blocks"):
        feature_extractor(vit, "patches")


# --- linear probe ------------------------------------------------------------------------------


def separable(num: int, generator: torch.Generator, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Points whose class is the argmax of ``x @ weights`` with a margin of at least 3, shifted and scaled."""
    x = torch.randn(4 * num, weights.shape[0], generator=generator)
    logits = x @ weights
    top2 = logits.topk(2, dim=1).values
    keep = (top2[:, 0] - top2[:, 1] > 3.0).nonzero().squeeze(1)[:num]
    return x[keep] * 3.0 + 5.0, logits[keep].argmax(1)


def test_linear_probe_separates_linearly_separable_features():
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(16, 4, generator=generator) * 2
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (separable(n, generator, weights) for n in (1000, 300, 1000))
    linear, history = train_linear_probe(train_x, train_y, val_x, val_y, 4, epochs=60, batch_size=64, seed=0)
    assert len(history.val_top1) == len(history.train_loss) == 60
    assert history.best_val_top1 == max(history.val_top1) == 100.0
    assert history.train_loss[-1] < history.train_loss[0]
    assert history.best_epoch == 60  # the latest of the epochs tied at 100%
    assert evaluate_probe(linear, train_x, train_y)["top1"] == 100.0  # raw features: the standardisation is folded in
    metrics = evaluate_probe(linear, test_x, test_y)
    assert metrics["top1"] == 100.0 and metrics["top5"] == 100.0


def test_linear_probe_on_random_labels_stays_near_chance():
    generator = torch.Generator().manual_seed(1)
    feats = torch.randn(4000, 32, generator=generator)
    labels = torch.randint(10, (4000,), generator=generator)
    linear, history = train_linear_probe(
        feats[:1000], labels[:1000], feats[1000:2000], labels[1000:2000], 10, epochs=30, batch_size=128
    )
    assert 1 <= history.best_epoch <= 30
    assert evaluate_probe(linear, feats[2000:], labels[2000:])["top1"] < 14.0  # chance 10%, sd 0.7% on 2000


# --- jobs --------------------------------------------------------------------------------------


def test_knn_eval_job_logs_a_child_run_of_the_training_run(digits, capsys):
    assert knn_eval.main([str(digits.checkpoint), "--k", "20", "200"]) == 0
    out = capsys.readouterr().out
    assert "kNN on test (bank: train, temperature 0.07): top-1 k=20" in out
    [run] = [r for r in child_runs(digits.client, digits.parent) if r.data.tags["pretrainlab.protocol"] == "knn"]
    metrics = run.data.metrics
    assert set(metrics) == {"knn/top1_k20", "knn/top1_k200"}
    assert metrics["knn/top1_k20"] > 50.0 and metrics["knn/top1_k200"] > 50.0
    assert run.data.params["temperature"] == "0.07" and run.info.status == "FINISHED"
    assert f"top-1 k=20 {metrics['knn/top1_k20']:.2f}%" in out
    assert knn_eval.main([f"runs:/{digits.parent}/checkpoint", "--k", "20", "--no-mlflow"]) == 0
    assert f"top-1 k=20 {metrics['knn/top1_k20']:.2f}%" in capsys.readouterr().out


def test_linear_probe_job_logs_metrics_and_the_val_curve(digits, capsys):
    assert linear_probe.main([str(digits.checkpoint), "--epochs", "20"]) == 0
    assert "linear probe on test: top-1" in capsys.readouterr().out
    [run] = probe_runs(digits, "pooled")
    metrics = run.data.metrics
    assert metrics["linear_probe/top1"] > 50.0 and metrics["linear_probe/top5"] >= metrics["linear_probe/top1"]
    curve = digits.client.get_metric_history(run.info.run_id, "linear_probe/val_top1")
    assert sorted(m.step for m in curve) == list(range(1, 21))
    assert metrics["linear_probe/best_epoch"] in {m.step for m in curve}
    assert "blocks" not in run.data.params


def test_linear_probe_job_on_a_vits_last_blocks(digits, digits_vit, capsys):
    args = [str(digits_vit), "--epochs", "20", "--features", "last-blocks", "--blocks", "2"]
    assert linear_probe.main(args) == 0
    assert "linear probe on test: top-1" in capsys.readouterr().out
    [run] = probe_runs(digits, "last-blocks")
    assert run.data.params["blocks"] == "2"
    assert run.data.metrics["linear_probe/top1"] > 30.0  # 10 classes; 30 SGD steps teach this ViT little
    assert linear_probe.main([str(digits.checkpoint), "--features", "last-blocks", "--no-mlflow"]) == 2
    assert "error: last-blocks features need a timm ViT with a class token, not ResNet" in capsys.readouterr().err


def probe_runs(digits, features: str) -> list:
    """The digits run's linear-probe child runs on ``features``."""
    runs = child_runs(digits.client, digits.parent)
    return [
        r
        for r in runs
        if r.data.tags["pretrainlab.protocol"] == "linear_probe" and r.data.params["features"] == features
    ]


@pytest.mark.parametrize("job", [knn_eval, linear_probe])
@pytest.mark.parametrize(
    "args, message",
    [
        (["{missing}"], "no such checkpoint folder"),
        (["{checkpoint}", "--split", "nope"], "no split 'nope'; known splits: train, val, test"),
    ],
)
def test_jobs_reject_bad_input_with_exit_code_2(digits, capsys, job, args, message):
    names = {"missing": digits.checkpoint.parent / "missing", "checkpoint": digits.checkpoint}
    assert job.main([a.format(**names) for a in args] + ["--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_job_arguments_out_of_range_exit_2(digits, capsys):
    assert knn_eval.main([str(digits.checkpoint), "--k", "0", "--no-mlflow"]) == 2
    assert "--k: every k must be at least 1" in capsys.readouterr().err
    assert linear_probe.main([str(digits.checkpoint), "--split", "val", "--no-mlflow"]) == 2
    assert "picks its epoch on 'val'" in capsys.readouterr().err


def test_final_evaluation_of_embedding_checkpoints(digits):
    run_id = digits.client.create_run(ensure_experiment(digits.client, "digits")).info.run_id
    loaded = load_model(digits.checkpoint)
    report = EVALUATORS["embedding"].evaluate_split(loaded, "test", str(digits.folder), 512)
    log_report(digits.client, run_id, report, step=7)
    metrics = report.metrics
    assert set(metrics) == {"knn_top1_k20", "knn_top1_k200"} and metrics["knn_top1_k20"] > 50.0
    logged = digits.client.get_metric_history(run_id, "test/knn_top1_k20")
    assert [(m.step, m.value) for m in logged] == [(7, metrics["knn_top1_k20"])]
    assert [a.path for a in digits.client.list_artifacts(run_id, "evaluation/test")] == ["evaluation/test/tsne.png"]


# --- fine-tuning -------------------------------------------------------------------------------


def test_finetune_overrides_point_init_from_at_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = finetune.finetune_overrides("runs/0123")
    assert folder == ["model.init_from.source=pretrainlab", f'model.init_from.path="{tmp_path / "runs/0123"}"']
    cfg = load_config(DIGITS_CONFIG, finetune.finetune_overrides("0123"))
    assert cfg.model.init_from.source == "pretrainlab" and cfg.model.init_from.path == str(tmp_path / "0123")
    cfg = load_config(DIGITS_CONFIG, finetune.finetune_overrides("models:/fmnist-mae@champion"))
    assert cfg.model.init_from.path == "models:/fmnist-mae@champion"


def test_finetune_prepares_the_pretrain_arguments_and_tags(digits):
    args = finetune.parse_args([str(digits.checkpoint), str(DIGITS_CONFIG), "--set", "optim.lr=0.01"])
    cfg, tags = finetune.prepare(args)
    assert cfg.optim.lr == 0.01 and cfg.model.init_from.path == str(digits.checkpoint)
    assert cfg.model.init_from.source == "pretrainlab"
    assert tags == {
        "pretrainlab.pretrained_from": digits.parent,
        "pretrainlab.pretrained_checkpoint": str(digits.checkpoint),
    }
    overrides = ["optim.lr=0.01", *finetune.finetune_overrides(str(digits.checkpoint))]
    assert load_config(DIGITS_CONFIG, overrides) == cfg


def test_finetune_rejects_bad_input_before_training(digits, capsys):
    assert finetune.main([str(digits.checkpoint.parent / "missing"), str(DIGITS_CONFIG)]) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err
    assert finetune.main([str(digits.checkpoint), str(DIGITS_CONFIG), "--set", "optim.nope=1"]) == 2
    assert "optim.nope: unknown key" in capsys.readouterr().err


def test_finetune_config_checks(digits):
    assert finetune.check_finetune_config(load_config(FINETUNE_CONFIG)) == []
    vit = load_config(CONFIGS / "vit-d6w96-p4_1xb128_fmnist.yaml")
    assert "optim.layer_decay is not set" in finetune.check_finetune_config(vit)[0]
    with pytest.raises(finetune.FinetuneError, match="strategy: fine-tuning is a supervised run"):
        finetune.check_finetune_config(digits.cfg.model_copy(update={"strategy": "byol"}))


def test_finetune_config_starts_the_vit_from_a_checkpoint(tmp_path):
    source_cfg = load_config(FINETUNE_CONFIG)
    info = {"class_names": [str(i) for i in range(10)], "num_classes": 10, "in_chans": 1}
    pretrained = supervised.build_model(source_cfg, 10, 1)
    folder = save_checkpoint(
        tmp_path / "ckpt", pretrained.state_dict(), checkpoint_meta(source_cfg, info, 1, 1, {}, None)
    )
    cfg = load_config(FINETUNE_CONFIG, finetune.finetune_overrides(str(folder)))
    model = supervised.build_model(cfg, 10, 1)
    assert model.init_report.complete and model.init_report.loaded
    for name, tensor in pretrained.backbone.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[name], tensor)
    assert Path(cfg.model.init_from.path).is_absolute() and cfg.optim.layer_decay == 0.75


def test_evaluate_job_on_a_self_supervised_checkpoint(digits, capsys):
    """jobs/evaluate.py measures an embedding checkpoint by kNN on its dataset, in a run nested under its own;
    the kNN top-1 it logs is the one computed here from the backbone's features."""
    cfg = load_config(DIGITS_CONFIG, ["strategy=simclr", 'data.views=[{"pipeline": [], "count": 2}]'])
    info = {"class_names": [str(i) for i in range(10)], "num_classes": 10, "in_chans": 1}
    torch.manual_seed(0)
    model = get_strategy("simclr").build_model(cfg, 10, 1)
    folder = save_checkpoint(
        digits.checkpoint.parent / "simclr-checkpoint",
        model.state_dict(),
        checkpoint_meta(cfg, info, 1, 1, {}, digits.parent),
    )
    assert evaluate_job.main([str(folder), "--split", "test"]) == 0
    printed = capsys.readouterr().out
    child = [run for run in child_runs(digits.client, digits.parent) if "knn_top1_k20" in str(run.data.metrics)]
    assert len(child) == 1
    logged = child[0].data.metrics
    assert set(logged) == {"test/knn_top1_k20", "test/knn_top1_k200"}
    images_train, labels_train = load_split_numpy(digits.folder, "train")
    images_test, labels_test = load_split_numpy(digits.folder, "test")
    model.eval()
    with torch.no_grad():
        bank = torch.cat([model.backbone(b) for b in eval_batches(images_train, cfg.data)])
        queries = torch.cat([model.backbone(b) for b in eval_batches(images_test, cfg.data)])
    expected = knn_predict(queries, bank, torch.from_numpy(labels_train), 10, k=20).argmax(1)
    top1 = 100.0 * (expected.numpy() == labels_test).mean()
    assert logged["test/knn_top1_k20"] == pytest.approx(top1, abs=1e-4)  # MLflow keeps float32
    assert "test/knn_top1_k20" not in printed and f"knn_top1_k20 {top1:.4f}" in printed
    artifacts = [a.path for a in digits.client.list_artifacts(child[0].info.run_id, "evaluation/test")]
    assert artifacts == ["evaluation/test/tsne.png"]
