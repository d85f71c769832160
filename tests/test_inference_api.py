"""The Python inference API against a real checkpoint and a real MLflow sqlite store (no Ray cluster).

One module-wide project folder: scikit-learn digits prepared, timm's ``test_resnet`` trained
for a few SGD steps in-process and saved as the training loop saves it, registered in MLflow.
"""

from __future__ import annotations

import io
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

import pretrainlab
from conftest import CONFIGS, free_port, train_digits_checkpoint
from pretrainlab.checkpoint import CHECKPOINT_CACHE, fetch_checkpoint, load_checkpoint, save_checkpoint
from pretrainlab.config import load_config
from pretrainlab.data.builtin import prepare_builtin
from pretrainlab.data.dataset import load_split_numpy
from pretrainlab.data.transforms import normalize
from pretrainlab.evaluation.classification import evaluate_checkpoint, predict
from pretrainlab.inference.inferencers import inferencer_for
from pretrainlab.inference.loading import load_model
from pretrainlab.models.backbones import feature_dim
from pretrainlab.paths import project_home
from pretrainlab.tracking.mlflow import client_for, ensure_experiment, register_checkpoint

DIGITS = "test-resnet_2xb32_digits"
FMNIST = "resnet10t_1xb128_fmnist"


def logged_run(client: MlflowClient, tags: dict[str, str]) -> str:
    return client.create_run(ensure_experiment(client, "digits"), tags=tags).info.run_id


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The models are tiny: one thread is as fast, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A project folder (as the ``project`` fixture makes, once per module) with a trained checkpoint
    (``trained``), the model as training starts it (``scratch``) and three registered models:
    digits-classifier (v1 trained = champion, v2 scratch), digits-scratch (v1 trained, v2 scratch)
    and untagged (a run without a strategy tag)."""
    home = tmp_path_factory.mktemp("project")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PRETRAINLAB_HOME", str(home))
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home}/mlflow.db")
        env.delenv("PRETRAINLAB_CONFIGS", raising=False)
        cfg = load_config(CONFIGS / "test-resnet_2xb32_digits.yaml")
        folder = prepare_builtin("digits", home / "data")
        client = client_for(f"sqlite:///{home}/mlflow.db")
        runs = {}
        for name, steps in (("trained", 40), ("scratch", 0)):
            runs[name] = logged_run(client, {"strategy": "supervised"})
            checkpoint = train_digits_checkpoint(cfg, folder, home / name, steps, runs[name])
            client.log_artifacts(runs[name], str(checkpoint), "checkpoint")
        for model in ("digits-classifier", "digits-scratch"):
            register_checkpoint(client, runs["trained"], model)
            register_checkpoint(client, runs["scratch"], model)
        client.set_registered_model_alias("digits-classifier", "champion", "1")
        register_checkpoint(client, logged_run(client, {}), "untagged")
        yield SimpleNamespace(cfg=cfg, folder=folder, trained=home / "trained", scratch=home / "scratch", runs=runs)


@pytest.fixture(scope="module")
def test_images(zoo):
    images, labels = load_split_numpy(zoo.folder, "test")
    return images, labels


def weights_equal(model: torch.nn.Module, folder: Path) -> bool:
    expected = load_model(folder).model.state_dict()
    return all(torch.equal(value, expected[key]) for key, value in model.state_dict().items())


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_import_pretrainlab_is_light():
    code = "import sys, pretrainlab; print(sorted({'torch', 'ray', 'mlflow'} & set(sys.modules)), dir(pretrainlab))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("[] ") and "'list_models'" in out and "'ImageRetrievalInferencer'" in out


def test_list_models_names_configs_and_registered_models(zoo):
    names = pretrainlab.list_models()
    assert {DIGITS, FMNIST, "models:/digits-classifier", "models:/digits-scratch", "models:/untagged"} <= set(names)
    assert names.index(DIGITS) < names.index("models:/digits-classifier")  # configs first
    digits = pretrainlab.list_models("*DIGITS*")
    assert {DIGITS, "models:/digits-classifier", "models:/digits-scratch"} <= set(digits)
    assert FMNIST not in digits and "models:/untagged" not in digits
    assert pretrainlab.list_models("resnet10t_*") == [FMNIST]
    classification = pretrainlab.list_models(task="classification")
    assert "models:/digits-classifier" in classification and "models:/untagged" not in classification
    with pytest.raises(ValueError, match="unknown task 'segmentation'; tasks: caption, classification, embedding"):
        pretrainlab.list_models(task="segmentation")


def test_configs_folder_two_configs_with_one_zoo_name(zoo, tmp_path, monkeypatch):
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text(f"_base_: {CONFIGS / 'test-resnet_2xb32_digits.yaml'}\nname: twin\n")
    (tmp_path / "_base_").mkdir()
    (tmp_path / "_base_" / "ignored.yaml").write_text("not: a config\n")
    monkeypatch.setenv("PRETRAINLAB_CONFIGS", str(tmp_path))
    with pytest.raises(ValueError, match="zoo name 'twin' is given by two configs: .*a.yaml and .*b.yaml"):
        pretrainlab.list_models()
    (tmp_path / "b.yaml").unlink()
    assert pretrainlab.list_models(pattern="tw*") == ["twin"]
    monkeypatch.setenv("PRETRAINLAB_CONFIGS", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="PRETRAINLAB_CONFIGS=.*missing: no such folder"):
        pretrainlab.list_models()


def registry_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "model registry" in str(w.message)]


def test_registry_missing_or_unreachable(zoo, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/none.db")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = pretrainlab.list_models()
    assert DIGITS in names and not [n for n in names if n.startswith("models:/")]
    assert registry_warnings(caught) == [] and not (tmp_path / "none.db").exists()  # no store yet: nothing created

    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert pretrainlab.list_models() == pretrainlab.list_models() == names
    (message,) = registry_warnings(caught)  # once
    assert message.startswith(f"model registry at {uri} unreachable, listing configs only")


def test_get_model_from_every_kind_of_source(zoo):
    random = pretrainlab.get_model(DIGITS)
    assert not random.training and weights_equal(random, zoo.scratch)  # seeded as training starts it
    info = random.info
    assert (info.task, info.class_names, info.in_chans, info.image_size) == (
        "classification",
        [str(d) for d in range(10)],
        1,
        (8, 8),
    )
    assert info.source.endswith("test-resnet_2xb32_digits.yaml (random init)") and info.meta == {}

    champion = pretrainlab.get_model(DIGITS, pretrained=True)
    assert champion.info.source == "models:/digits-classifier/1" and weights_equal(champion, zoo.trained)
    assert champion.info.meta["step"] == 40
    assert weights_equal(pretrainlab.get_model(DIGITS, pretrained=zoo.scratch), zoo.scratch)
    for source, expected in [
        (zoo.trained, zoo.trained),
        ("models:/digits-classifier@champion", zoo.trained),
        ("models:/digits-classifier/2", zoo.scratch),
        ("models:/digits-classifier", zoo.trained),  # champion
        ("models:/digits-scratch", zoo.scratch),  # no alias: the latest version
        (f"runs:/{zoo.runs['trained']}/checkpoint", zoo.trained),
    ]:
        model = pretrainlab.get_model(source, device="cpu")
        assert not model.training and weights_equal(model, expected), source
        assert model.info.name == str(source) and model.info.task == "classification"


def test_mlflow_checkpoints_are_fetched_once_without_their_training_state(zoo, tmp_path):
    trained = load_checkpoint(zoo.trained)
    save_checkpoint(tmp_path / "resumable", trained.weights, trained.meta, {"step": torch.tensor(40)})
    client = client_for(f"sqlite:///{project_home()}/mlflow.db")
    run_id = logged_run(client, {"strategy": "supervised"})
    client.log_artifacts(run_id, str(tmp_path / "resumable"), "checkpoint")

    folder = fetch_checkpoint(f"runs:/{run_id}/checkpoint")
    assert folder.parent == project_home() / CHECKPOINT_CACHE
    assert sorted(path.name for path in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert fetch_checkpoint("models:/digits-classifier@champion") == folder  # the same checkpoint, kept once
    assert fetch_checkpoint(f"runs:/{zoo.runs['trained']}/checkpoint") == folder
    assert fetch_checkpoint("models:/digits-classifier/2") != folder  # scratch
    written = (folder / "model.safetensors").stat().st_mtime_ns
    assert weights_equal(load_model(f"runs:/{run_id}/checkpoint").model, zoo.trained)
    assert (folder / "model.safetensors").stat().st_mtime_ns == written  # not downloaded again
    assert sorted(path.name for path in folder.parent.iterdir()) == sorted(
        {folder.name, fetch_checkpoint("models:/digits-classifier/2").name}
    )


def test_get_model_errors(zoo):
    with pytest.raises(ValueError, match=f"'test-resnet_2xb32_digit' is not a zoo name.*close matches: {DIGITS}"):
        pretrainlab.get_model("test-resnet_2xb32_digit")
    with pytest.raises(ValueError, match=f"{FMNIST}: dataset 'fmnist' is not prepared in .*convert it first"):
        pretrainlab.get_model(FMNIST)
    with pytest.raises(ValueError, match=f"a checkpoint of {DIGITS}, not of {FMNIST}"):
        pretrainlab.get_model(FMNIST, pretrained=zoo.trained)
    with pytest.raises(ValueError, match="pretrained=.* applies to zoo names"):
        pretrainlab.get_model(zoo.trained, pretrained=zoo.scratch)
    with pytest.raises(ValueError, match="models:/nope: no such registered model"):
        pretrainlab.get_model("models:/nope")
    with pytest.raises(ValueError, match="no inferencer for 'segmentation' models yet"):
        inferencer_for("segmentation")


def test_classification_matches_the_evaluation_path(zoo, test_images):
    images, labels = test_images
    evaluation = evaluate_checkpoint(zoo.trained, split="test")
    logits = predict(load_model(zoo.trained).model, images, zoo.cfg.data)
    results = pretrainlab.ImageClassificationInferencer(zoo.trained)([image[0] for image in images], batch_size=64)
    assert [r["pred_label"] for r in results] == evaluation.preds.tolist()
    np.testing.assert_allclose(np.stack([r["pred_scores"] for r in results]), logits.softmax(1).numpy(), atol=1e-5)
    assert evaluation.metrics["top1"] > 50  # trained: the comparison is not between constant predictions

    first = results[0]
    assert set(first) == {"pred_scores", "pred_label", "pred_score", "pred_class"}
    assert first["pred_scores"].shape == (10,) and first["pred_scores"].dtype == np.float32
    assert isinstance(first["pred_label"], int) and isinstance(first["pred_score"], float)
    assert first["pred_class"] == str(first["pred_label"])
    assert first["pred_score"] == pytest.approx(float(first["pred_scores"].max()))


def test_every_kind_of_input_and_topk(zoo, test_images, tmp_path):
    image = test_images[0][3, 0]  # 8 x 8 uint8
    path = tmp_path / "digit.png"
    path.write_bytes(png(image))
    inferencer = pretrainlab.ImageClassificationInferencer(pretrainlab.get_model(zoo.trained))
    inputs = [image, image[:, :, None], png(image), path, str(path), Image.fromarray(image), np.stack([image] * 3, 2)]
    results = inferencer(inputs, topk=3)
    for result in results:
        np.testing.assert_allclose(result["pred_scores"], results[0]["pred_scores"], atol=1e-6)
    top = results[0]["pred_topk"]
    assert [t["label"] for t in top][0] == results[0]["pred_label"] and len(top) == 3
    assert top[0]["score"] >= top[1]["score"] >= top[2]["score"] and top[1]["class"] == str(top[1]["label"])
    assert len(inferencer(image)) == 1  # a single input


def test_batched_equals_one_by_one(zoo, test_images):
    images = [image[0] for image in test_images[0][:20]]
    model = pretrainlab.get_model(zoo.trained)
    batched = pretrainlab.inference_model(model, images, batch_size=7)
    single = [pretrainlab.inference_model(model, image)[0] for image in images]
    np.testing.assert_allclose(
        np.stack([r["pred_scores"] for r in batched]), np.stack([r["pred_scores"] for r in single]), atol=1e-5
    )
    assert len(pretrainlab.inference_model(str(zoo.trained), images[0], images[1], topk=2)) == 2
    extractor = pretrainlab.FeatureExtractor(model)
    np.testing.assert_allclose(
        np.stack(extractor(images, batch_size=6)), np.stack([extractor(i)[0] for i in images]), atol=1e-5
    )


def test_other_sizes_are_resized_to_the_training_size(zoo, test_images):
    image = test_images[0][0, 0]
    big = np.kron(image, np.ones((3, 2), np.uint8))  # 24 x 16
    preprocess = pretrainlab.get_model(zoo.trained).info.preprocessor()
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(big)[None, None].float(), size=(8, 8), mode="bilinear", antialias=True
    )
    expected = normalize(resized.round().clamp(0, 255).to(torch.uint8), zoo.cfg.data)
    torch.testing.assert_close(preprocess([big]), expected, rtol=0, atol=1.01 / 255 / zoo.cfg.data.std[0])


def test_feature_extractor_gives_the_backbone_features(zoo, test_images):
    model = pretrainlab.get_model(zoo.trained)
    features = pretrainlab.FeatureExtractor(model)([image[0] for image in test_images[0][:5]])
    assert len(features) == 5 and features[0].shape == (feature_dim(model.backbone),)
    with torch.no_grad():
        expected = model.backbone(normalize(torch.from_numpy(test_images[0][:5]), zoo.cfg.data))
    np.testing.assert_allclose(np.stack(features), expected.numpy(), atol=1e-5)


def test_retrieval_finds_the_gallery_image_itself(zoo, test_images):
    images = [image[0] for image in test_images[0][:20]]
    retrieval = pretrainlab.ImageRetrievalInferencer(zoo.trained, images, batch_size=8)
    results = retrieval([images[7], images[12]], topk=3)
    assert [r["sample_idx"][0] for r in results] == [7, 12]
    assert all(len(r["sample_idx"]) == len(r["match_score"]) == 3 for r in results)
    assert results[0]["match_score"][0] == pytest.approx(1.0, abs=1e-5)
    assert results[0]["match_score"] == sorted(results[0]["match_score"], reverse=True)

    from_split = pretrainlab.ImageRetrievalInferencer.from_split(zoo.trained, split="test")
    (found,) = from_split(images[7], topk=1)
    np.testing.assert_array_equal(test_images[0][found["sample_idx"][0], 0], images[7])
    assert found["match_score"][0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((8, 8), np.float32), "input 2: numpy array of dtype float32; expected uint8"),
        (np.zeros((8, 8, 2), np.uint8), r"input 2: numpy array of shape \(8, 8, 2\)"),
        (b"not an image", "input 2: unreadable image"),
        (png(np.zeros((8, 8), np.uint8))[:40], "input 2: unreadable image"),
        ("/no/such/digit.png", "input 2: cannot read /no/such/digit.png"),
        (7, "input 2: unsupported type int"),
    ],
)
def test_bad_inputs_are_named(zoo, bad, message):
    inferencer = pretrainlab.ImageClassificationInferencer(zoo.trained)
    good = np.zeros((8, 8), np.uint8)
    with pytest.raises(ValueError, match=message):
        inferencer([good, good, bad], batch_size=2)  # the index counts across batches
