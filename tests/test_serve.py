"""The Serve application on a real local Ray, real HTTP on 127.0.0.1, a real MLflow sqlite registry.

One deployment per module: digits prepared, timm's ``test_resnet`` trained for a few SGD
steps and registered as ``digits-classifier`` v1 (``champion``); the app serves it as
``digits`` (the alias, watched every second) with a retrieval gallery of the test split,
and ``pinned`` (``models:/digits-classifier/1``), behind a bearer token. A second app at
``/open`` serves the same checkpoint folder without auth.
"""

from __future__ import annotations

import asyncio
import base64
import io
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import pretrainlab
from conftest import CONFIGS, REPO, free_port, train_digits_checkpoint
from pretrainlab.config import load_config
from pretrainlab.data.builtin import prepare_builtin
from pretrainlab.data.dataset import load_split_numpy
from pretrainlab.tracking.mlflow import client_for, ensure_experiment, register_checkpoint

sys.path.insert(0, str(REPO))  # the serve/ application folder, as `serve run` from the repository root sees it

TOKEN = "s3cret-token"
TOKEN_ENV = "PRETRAINLAB_TEST_SERVE_TOKEN"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The registry, the running apps and an HTTP client; Serve and Ray are shut down afterwards."""
    import ray
    from ray import serve

    from serve.app import build_app
    from serve.schemas import ServeArgs

    home = tmp_path_factory.mktemp("project")
    tracking = f"sqlite:///{home}/mlflow.db"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PRETRAINLAB_HOME", str(home))
        env.setenv("MLFLOW_TRACKING_URI", tracking)
        env.setenv(TOKEN_ENV, TOKEN)
        env.delenv("PRETRAINLAB_CONFIGS", raising=False)
        cfg = load_config(CONFIGS / "test-resnet_2xb32_digits.yaml")
        folder = prepare_builtin("digits", home / "data")
        client = client_for(tracking)
        experiment = ensure_experiment(client, "digits")
        runs = {}
        for name, steps in (("trained", 40), ("second", 5)):
            runs[name] = client.create_run(experiment, tags={"strategy": "supervised"}).info.run_id
            checkpoint = train_digits_checkpoint(cfg, folder, home / name, steps, runs[name])
            client.log_artifacts(runs[name], str(checkpoint), "checkpoint")
        register_checkpoint(client, runs["trained"], "digits-classifier")
        client.set_registered_model_alias("digits-classifier", "champion", "1")

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        common = {"max_batch_size": 4, "max_ongoing_requests": 16, "max_body_bytes": 200_000, "torch_threads": 1}
        common |= {"num_cpus": 0.25}
        secure = ServeArgs(
            models={
                "digits": "models:/digits-classifier@champion",
                "pinned": "models:/digits-classifier/1",
                "missing": "models:/no-such-model@champion",
            },
            gallery="test",
            max_image_pixels=100_000,
            auth_token_env=TOKEN_ENV,
            alias_check_interval_s=1.0,
            **common,
        )
        opened = ServeArgs(  # tight limits: one request at a time, one waiting
            models={"folder": str(home / "trained")},
            alias_check_interval_s=0,
            **(common | {"max_batch_size": 1, "max_ongoing_requests": 2, "max_queued_requests": 1}),
        )
        try:
            serve.run(build_app(secure), name="secure", route_prefix="/")
            serve.run(build_app(opened), name="open", route_prefix="/open")
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
                local = threading.local()

                def http_for_threads() -> httpx.Client:  # httpx clients are not shared across threads here
                    if not hasattr(local, "client"):
                        local.client = httpx.Client(base_url=http.base_url, timeout=60)
                    return local.client

                yield SimpleNamespace(
                    http=http,
                    http_for_threads=http_for_threads,
                    client=client,
                    runs=runs,
                    folder=folder,
                    home=home,
                    checkpoint=home / "trained",
                )
        finally:
            serve.shutdown()
            ray.shutdown()


@pytest.fixture(scope="module")
def digits_test(served):
    images, labels = load_split_numpy(served.folder, "test")
    return images[:, 0], labels  # N x 8 x 8 uint8


@pytest.mark.needs_ray
def test_healthz_needs_no_token(served):
    answer = served.http.get("/healthz")
    assert answer.status_code == 200
    assert answer.json() == {"status": "ok", "models": ["digits", "pinned", "missing"]}


@pytest.mark.needs_ray
def test_auth_on_and_off(served, digits_test):
    image = b64(png(digits_test[0][0]))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/classify", {"image_base64": image})):
            answer = served.http.request(method, path, json=body, headers=headers)
            assert answer.status_code == 401, (path, headers)
            assert "bearer token" in answer.json()["error"]
    assert served.http.post("/v1/classify", json={"image_base64": image}, headers=AUTH).status_code == 200
    assert served.http.get("/open/v1/models").status_code == 200  # an app without a token
    assert served.http.post("/open/v1/classify", json={"image_base64": image}).status_code == 200


@pytest.mark.needs_ray
def test_classify_matches_the_inference_api(served, digits_test):
    images, _ = digits_test
    model = pretrainlab.get_model(str(served.checkpoint), device="cpu")
    expected = pretrainlab.inference_model(model, list(images[:12]), topk=3)
    for i, (image, want) in enumerate(zip(images[:12], expected, strict=True)):
        if i % 2:
            answer = served.http.post(
                "/v1/classify",
                files={"file": ("x.png", png(image), "image/png")},
                data={"top_k": "3", "model": "pinned"},
                headers=AUTH,
            )
        else:
            answer = served.http.post("/v1/classify", json={"image_base64": b64(png(image)), "top_k": 3}, headers=AUTH)
        assert answer.status_code == 200, answer.text
        got = answer.json()
        assert got["model"] == ("pinned" if i % 2 else "digits") and got["version"] == "1"
        assert got["pred_label"] == want["pred_label"] and got["pred_class"] == want["pred_class"]
        assert got["pred_score"] == pytest.approx(want["pred_score"], abs=1e-5)
        assert [t["label"] for t in got["pred_topk"]] == [t["label"] for t in want["pred_topk"]]
        assert len(got["pred_scores"]) == 10 and sum(got["pred_scores"]) == pytest.approx(1, abs=1e-4)


@pytest.mark.needs_ray
def test_concurrent_requests_are_batched_per_model_with_their_own_top_k(served, digits_test):
    images, _ = digits_test
    model = pretrainlab.get_model(str(served.checkpoint), device="cpu")
    expected = pretrainlab.inference_model(model, list(images[:16]), topk=5)

    def post(i):
        body = {"image_base64": b64(png(images[i])), "top_k": 1 + i % 5, "model": ("pinned", "missing")[i % 8 == 7]}
        return served.http_for_threads().post("/v1/classify", json=body, headers=AUTH)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(post, range(16)))
    for i, answer in enumerate(answers):
        if i % 8 == 7:
            assert answer.status_code == 503, answer.text
            continue
        assert answer.status_code == 200, answer.text
        got = answer.json()
        assert got["pred_label"] == expected[i]["pred_label"]
        assert [t["label"] for t in got["pred_topk"]] == [t["label"] for t in expected[i]["pred_topk"][: 1 + i % 5]]


@pytest.mark.needs_ray
def test_embed_and_retrieve(served, digits_test):
    images, _ = digits_test
    answer = served.http.post("/v1/embed", json={"image_base64": b64(png(images[3]))}, headers=AUTH)
    assert answer.status_code == 200, answer.text
    embedding = answer.json()
    assert embedding["dim"] == len(embedding["embedding"]) > 0
    for row in (0, 7, 42):
        answer = served.http.post(
            "/v1/retrieve", json={"image_base64": b64(png(images[row])), "top_k": 4}, headers=AUTH
        )
        assert answer.status_code == 200, answer.text
        found = answer.json()
        assert found["sample_idx"][0] == row and found["match_score"][0] == pytest.approx(1, abs=1e-4)
        assert len(found["sample_idx"]) == len(found["match_score"]) == 4
    # the open app has no gallery
    answer = served.http.post("/open/v1/retrieve", json={"image_base64": b64(png(images[0]))})
    assert answer.status_code == 404 and "gallery" in answer.json()["error"]


@pytest.mark.needs_ray
def test_models_lists_versions_and_metrics(served):
    answer = served.http.get("/v1/models", headers=AUTH)
    assert answer.status_code == 200
    listed = {m["name"]: m for m in answer.json()["models"]}
    assert set(listed) == {"digits", "pinned", "missing"}
    assert "no-such-model" in listed["missing"]["error"]
    assert listed["digits"]["source"] == "models:/digits-classifier@champion"
    assert listed["digits"]["alias"] == "champion" and listed["pinned"]["version"] == "1"
    assert listed["digits"]["task"] == "classification" and "train/loss" in listed["digits"]["metrics"]
    assert listed["digits"]["gallery_size"] > 0


def bad_requests(image: bytes) -> list[tuple[str, dict, int, str]]:
    """(path, httpx request kwargs, status, word of the error) for each kind of bad input."""
    bomb = io.BytesIO()
    Image.new("L", (1000, 1000)).save(bomb, format="PNG")  # 10^6 pixels, tiny file, over max_image_pixels
    return [
        ("/v1/classify", {"content": b"x" * 300_000, "headers": {"content-type": "application/json"}}, 413, "max_body"),
        ("/v1/classify", {"json": {"image_base64": b64(b"not an image at all")}}, 415, "not an image"),
        ("/v1/classify", {"json": {"image_base64": b64(image[: len(image) // 2])}}, 422, "truncated"),
        ("/v1/classify", {"json": {"image_base64": b64(bomb.getvalue())}}, 413, "max_image_pixels"),
        ("/v1/classify", {"json": {"image_base64": "@@not base64@@"}}, 422, "base64"),
        ("/v1/classify", {"json": {"top_k": 3}}, 422, "image_base64"),
        ("/v1/embed", {"files": {"other": ("a.png", image)}}, 422, "file"),
        ("/v1/classify", {"json": {"image_base64": b64(image), "model": "nope"}}, 404, "digits, pinned, missing"),
        ("/v1/classify", {"json": {"image_base64": b64(image), "model": "../trained"}}, 404, "is not served"),
        (
            "/v1/classify",
            {"json": {"image_base64": b64(image)}, "headers": {"serve_multiplexed_model_id": "x"}},
            404,
            "pinned",
        ),
        ("/v1/classify", {"json": {"image_base64": b64(image), "top_k": 0}}, 422, "top_k"),
        ("/v1/classify", {"json": {"image_base64": b64(image), "top_k": "many"}}, 422, "top_k"),
        ("/v1/retrieve", {"files": {"file": ("a.png", image)}, "data": {"top_k": "-1"}}, 422, "top_k"),
        ("/v1/classify", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "json"),
        ("/v1/classify", {"content": b"raw", "headers": {"content-type": "text/plain"}}, 415, "content-type"),
        (
            "/v1/classify",
            {"content": iter([b"{" + b" " * 150_000] * 2), "headers": {"content-type": "application/json"}},
            413,
            "max_body",
        ),  # chunked: no Content-Length, counted as read
        ("/v1/classify", {"files": {"file": ("big.png", b"\0" * 250_000)}}, 413, "max_body"),
    ]


@pytest.mark.needs_ray
def test_bad_inputs_get_4xx_json_and_the_replica_survives(served, digits_test):
    image = png(digits_test[0][0])
    cases = bad_requests(image)
    for path, kwargs, status, word in cases:
        headers = {**AUTH, **kwargs.pop("headers", {})}
        answer = served.http.post(path, headers=headers, **kwargs)
        assert answer.status_code == status, (path, status, answer.text)
        assert word.lower() in answer.json()["error"].lower(), (word, answer.json())
    for i in range(200):
        path, kwargs, status, _ = bad_requests(image)[i % len(cases)]
        headers = {**AUTH, **kwargs.pop("headers", {})}
        assert served.http.post(path, headers=headers, **kwargs).status_code == status
    answer = served.http.post("/v1/classify", json={"image_base64": b64(image)}, headers=AUTH)
    assert answer.status_code == 200 and "pred_label" in answer.json()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
base64ish = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=60).map(b64),
    st.builds(lambda v, n: b64(png(np.full((n, n), v, dtype=np.uint8))), st.integers(0, 255), st.integers(1, 40)),
)
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"image_base64": base64ish},
        optional={
            "model": st.one_of(st.text(max_size=10), st.just("pinned"), json_values),
            "top_k": json_values,
            "text": st.one_of(st.text(max_size=30), st.text(min_size=1001, max_size=1010), json_values),
        },
    ),
)


IMAGE_ROUTES = ["/v1/classify", "/v1/embed", "/v1/retrieve", "/v1/caption", "/v1/vqa", "/v1/ground"]
FUZZ = settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.mark.needs_ray
@FUZZ
@given(path=st.sampled_from(IMAGE_ROUTES), body=bodies)
def test_fuzzed_json_bodies_never_get_5xx(served, path, body):
    answer = served.http.post(path, json=body, headers=AUTH)
    assert answer.status_code < 500, (body, answer.text)
    if answer.status_code >= 400:
        assert isinstance(answer.json()["error"], str)


@pytest.mark.needs_ray
@FUZZ
@given(path=st.sampled_from(IMAGE_ROUTES), raw=st.binary(max_size=200))
def test_fuzzed_raw_json_bodies_never_get_5xx(served, path, raw):
    answer = served.http.post(path, content=raw, headers={**AUTH, "content-type": "application/json"})
    assert answer.status_code < 500, (raw, answer.text)
    assert answer.status_code == 422 and isinstance(answer.json()["error"], str)


@pytest.mark.needs_ray
@FUZZ
@given(
    path=st.sampled_from(IMAGE_ROUTES),
    fields=st.dictionaries(
        st.sampled_from(["model", "top_k", "file", "text", "other"]), st.text(max_size=12), max_size=4
    ),
    upload=st.one_of(st.none(), st.binary(max_size=80)),
)
def test_fuzzed_multipart_fields_never_get_5xx(served, path, fields, upload):
    files = {"file": ("a.png", upload)} if upload is not None else {"other": ("b.txt", b"x")}
    answer = served.http.post(path, data=fields, files=files, headers=AUTH)
    assert answer.status_code < 500, (fields, upload, answer.text)
    assert 400 <= answer.status_code and isinstance(answer.json()["error"], str)


@pytest.mark.needs_ray
def test_alias_move_swaps_the_version_without_failed_requests(served, digits_test):
    image = b64(png(digits_test[0][0]))
    failures, versions, stop = [], [], threading.Event()

    def hammer():
        with httpx.Client(base_url=served.http.base_url, timeout=60) as http:
            while not stop.is_set():
                answer = http.post("/v1/classify", json={"image_base64": image}, headers=AUTH)
                if answer.status_code != 200:
                    failures.append(answer.text)
                else:
                    versions.append(answer.json()["version"])

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        register_checkpoint(served.client, served.runs["second"], "digits-classifier")
        served.client.set_registered_model_alias("digits-classifier", "champion", "2")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not versions or versions[-1] != "2"):
            time.sleep(0.5)
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not failures, failures[:3]
    assert versions[0] == "1" and versions[-1] == "2"
    listed = {m["name"]: m for m in served.http.get("/v1/models", headers=AUTH).json()["models"]}
    assert listed["digits"]["version"] == "2" and listed["pinned"]["version"] == "1"


@pytest.mark.needs_ray
def test_a_model_that_cannot_load_answers_503(served, digits_test):
    answer = served.http.post(
        "/v1/classify", json={"image_base64": b64(png(digits_test[0][0])), "model": "missing"}, headers=AUTH
    )
    assert answer.status_code == 503
    assert "unavailable" in answer.json()["error"] and "no-such-model" in answer.json()["error"]


@pytest.mark.needs_ray
def test_a_full_queue_answers_503(served, digits_test):
    """The open app's model replica takes 2 requests at a time and queues 1: a burst of 24 gets some 503s,
    no 5xx else. The ingress answers them as JSON, or Serve's proxy as plain text past what the ingress
    holds; both name ``max_queued_requests``.
    """
    image = {"image_base64": b64(png(digits_test[0][0]))}

    def post(_):
        with httpx.Client(base_url=served.http.base_url, timeout=60) as http:
            answer = http.post("/open/v1/classify", json=image)
            return answer.status_code, answer.text

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(post, range(24)))
    codes = [code for code, _ in answers]
    assert set(codes) <= {200, 503} and 200 in codes, codes
    assert 503 in codes, codes
    assert all("max_queued_requests" in body for code, body in answers if code == 503)
    assert served.http.post("/open/v1/classify", json=image).status_code == 200


def test_config_file_is_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    from serve.schemas import ServeArgs, check_args

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "serve" / "config.yaml").read_text()))
    assert config.http_options.host == "127.0.0.1"
    (application,) = config.applications
    assert application.import_path == "serve.app:build_app"
    args = ServeArgs.model_validate(application.args)
    check_args(args)
    assert args.max_ongoing_requests > args.max_batch_size and args.autoscaling is not None
    assert all(source.startswith("models:/") for source in args.models.values())


def test_args_are_checked():
    from serve.app import build_app
    from serve.schemas import ServeArgs

    with pytest.raises(ValueError, match="must exceed max_batch_size"):
        build_app(ServeArgs(models={"a": "models:/a"}, max_batch_size=8, max_ongoing_requests=8))
    with pytest.raises(ValueError, match="unset or empty"):
        build_app(ServeArgs(models={"a": "models:/a"}, auth_token_env="PRETRAINLAB_NO_SUCH_VARIABLE"))
    with pytest.raises(ValueError):
        ServeArgs(models={})


@pytest.mark.needs_ray
def test_reconfigure_re_resolves_aliases_at_once(served):
    """What a redeploy with a changed ``user_config`` runs: the alias is re-resolved before it returns."""
    from ray import serve

    served.client.set_registered_model_alias("digits-classifier", "champion", "1")
    server = serve.get_deployment_handle("ModelServer", app_name="secure")
    server.reconfigure.remote({"alias_check_interval_s": 0}).result(timeout_s=60)
    listed = {m["name"]: m for m in served.http.get("/v1/models", headers=AUTH).json()["models"]}
    assert listed["digits"]["version"] == "1"


def test_a_call_past_request_timeout_is_cancelled_and_answers_504():
    from serve.errors import ApiError
    from serve.ingress import answer_of

    class Never:
        cancelled = False

        def __await__(self):
            return asyncio.sleep(3600).__await__()

        def cancel(self):
            self.cancelled = True

    response = Never()
    with pytest.raises(ApiError, match="request_timeout_s 0.1") as raised:
        asyncio.run(answer_of(response, "digits", 0.1))
    assert raised.value.status == 504 and response.cancelled
