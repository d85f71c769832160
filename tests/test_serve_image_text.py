"""The Serve application's image-text routes (caption, VQA, grounding) on a real local Ray with real HTTP,
serving tiny BLIP-style checkpoints of a tiny scenes set."""

from __future__ import annotations

import base64
import io
import sys
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import REPO, free_port
from pretrainlab.checkpoint import checkpoint_meta, save_checkpoint
from pretrainlab.config import validate
from pretrainlab.data.dataset import load_split_annotated
from pretrainlab.data.scenes import write_scenes
from pretrainlab.strategies import get_strategy

pytestmark = pytest.mark.needs_ray

sys.path.insert(0, str(REPO))  # the serve/ application folder, as `serve run` from the repository root sees it

TINY_BLIP = {"embed_dim": 16, "width": 16, "text_layers": 1, "decoder_layers": 1, "heads": 2}


def blip_checkpoint(folder, task: str, out):
    cfg = validate(
        {
            "name": f"blip-{task}-test",
            "strategy": "blip",
            "strategy_params": TINY_BLIP,
            "model": {"backbone": "test_resnet"},
            "data": {"dataset": str(folder), "mean": [0.65] * 3, "std": [0.15] * 3, "context_length": 32},
        }
    )
    torch.manual_seed(0)
    model = get_strategy("blip").build_model(cfg, 0, 3)
    info = {"class_names": [], "num_classes": 0, "in_chans": 3, "task": task}
    return save_checkpoint(out, model.state_dict(), checkpoint_meta(cfg, info, 1, 2, {}, None))


def png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import ray
    from ray import serve

    from serve.app import build_app
    from serve.schemas import ServeArgs

    home = tmp_path_factory.mktemp("project")
    scenes = write_scenes(home / "scenes", num_images=40, image_size=64, seed=2, workers=1)
    models = {
        name: str(blip_checkpoint(scenes[task], task, home / name))
        for name, task in (("captioner", "caption"), ("answerer", "vqa"), ("grounder", "grounding"))
    }
    images, _ = load_split_annotated(scenes["vqa"], "test")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PRETRAINLAB_HOME", str(home))
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home}/mlflow.db")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = ServeArgs(
            models=models,
            max_batch_size=4,
            max_ongoing_requests=16,
            torch_threads=1,
            num_cpus=0.25,
            alias_check_interval_s=0,
        )
        try:
            serve.run(build_app(args), name="multimodal", route_prefix="/")
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
                yield SimpleNamespace(http=http, image=png(images[0].transpose(1, 2, 0)))
        finally:
            serve.shutdown()
            ray.shutdown()


def test_caption_route_writes_a_caption(served):
    response = served.http.post("/v1/caption", json={"image_base64": served.image, "model": "captioner"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "captioner" and isinstance(body["pred_caption"], str) and body["score"] <= 0


def test_vqa_route_answers_the_question_in_text(served):
    question = "how many objects are there?"
    response = served.http.post("/v1/vqa", json={"image_base64": served.image, "model": "answerer", "text": question})
    assert response.status_code == 200, response.text
    assert response.json()["question"] == question and isinstance(response.json()["pred_answer"], str)
    missing = served.http.post("/v1/vqa", json={"image_base64": served.image, "model": "answerer"})
    assert missing.status_code == 422 and "text: field required (the question)" in missing.json()["error"]


def test_ground_route_returns_a_box_in_image_pixels_from_a_multipart_upload(served):
    data = base64.b64decode(served.image)
    response = served.http.post(
        "/v1/ground", files={"file": ("scene.png", data, "image/png")}, data={"model": "grounder", "text": "the bag"}
    )
    assert response.status_code == 200, response.text
    x1, y1, x2, y2 = response.json()["pred_bbox"]
    assert 0 <= x1 <= x2 <= 64 and 0 <= y1 <= y2 <= 64


def test_a_route_of_another_task_and_too_long_text_are_refused(served):
    wrong = served.http.post("/v1/vqa", json={"image_base64": served.image, "model": "captioner", "text": "why?"})
    assert wrong.status_code == 400 and "is a caption model, not a vqa model" in wrong.json()["error"]
    long = served.http.post("/v1/ground", json={"image_base64": served.image, "model": "grounder", "text": "x" * 1001})
    assert long.status_code == 422 and "text" in long.json()["error"]


def test_models_lists_each_models_routes(served):
    listed = {m["name"]: m for m in served.http.get("/v1/models").json()["models"]}
    assert listed["captioner"]["task"] == "caption" and "/v1/caption" in listed["captioner"]["routes"]
    assert listed["answerer"]["routes"] == ["/v1/embed", "/v1/vqa"]
    assert listed["grounder"]["routes"] == ["/v1/embed", "/v1/ground"]


texts = st.one_of(
    st.none(),
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=900, max_size=1100),
    st.integers(),
    st.lists(st.text(max_size=5), max_size=3),
)


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    route=st.sampled_from([("/v1/caption", "captioner"), ("/v1/vqa", "answerer"), ("/v1/ground", "grounder")]),
    text=texts,
    multipart=st.booleans(),
)
def test_fuzzed_questions_and_expressions_never_get_5xx(served, route, text, multipart):
    path, model = route
    if multipart:
        fields = {"model": model, **({"text": str(text)} if text is not None else {})}
        files = {"file": ("a.png", base64.b64decode(served.image))}
        answer = served.http.post(path, data=fields, files=files)
    else:
        answer = served.http.post(path, json={"image_base64": served.image, "model": model, "text": text})
    assert answer.status_code < 500, (text, answer.text)
    if answer.status_code >= 400:
        assert isinstance(answer.json()["error"], str)
