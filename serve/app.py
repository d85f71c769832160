"""The Ray Serve application: registered checkpoints behind HTTP endpoints.

::

    serve run serve/config.yaml                       # from the repository root

Two deployments. ``Ingress``, the FastAPI app: auth, body and image checks, JSON errors, request
timeouts, dynamic batching (a batch becomes one call per model and task, routed to a model replica
holding that model); a call whose model replica dies is sent once more to another replica.
``ModelServer``: models loaded with :func:`pretrainlab.get_model`, multiplexed by name, a batch run
in one call; alias watching.
Routes: ``POST /v1/classify``, ``POST /v1/embed``, ``POST /v1/retrieve``,
``POST /v1/caption``, ``POST /v1/vqa`` (field ``text``: the question), ``POST /v1/ground`` (field
``text``: the referring expression), ``GET /v1/models``, ``GET /healthz``.
"""

import asyncio
import base64
import binascii
import hmac
import io
import logging
import os
import re
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from PIL import Image
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile

from serve.errors import ApiError, install_handlers
from serve.schemas import MAX_TEXT_CHARS, MAX_TOP_K, ImageRequest, ServeArgs, check_args, describe_error

logger = logging.getLogger("ray.serve")

MODEL_HEADER = "serve_multiplexed_model_id"
REPLICA_ATTEMPTS = 2  # a call whose replica dies goes once more to another
_ALIAS_URI = re.compile(r"models:/([^/@]+)@([\w-]+)")
_VERSION_URI = re.compile(r"models:/([^/@]+)/(\d+)")
_BARE_URI = re.compile(r"models:/([^/@]+)/?")


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Resolved:
    """A served source resolved to what is loaded: a pinned URI or folder, its version and alias."""

    uri: str
    version: str | None
    alias: str | None
    watch: bool  # an alias (or a bare models:/NAME) that can move to another version


def resolve_source(source: str, tracking_uri: str | None = None) -> Resolved:
    """``models:/NAME@alias`` and ``models:/NAME`` to the version they name now; other sources as they are.

    Raises:
        ValueError: the alias or model is not in the registry.
    """
    from pretrainlab.inference.zoo import served_version
    from pretrainlab.tracking.mlflow import resolve_tracking_uri
    from pretrainlab.tracking.registry import DEFAULT_ALIAS, alias_holder, open_store

    aliased, pinned, bare = (pattern.fullmatch(source) for pattern in (_ALIAS_URI, _VERSION_URI, _BARE_URI))
    if pinned:
        return Resolved(source, pinned.group(2), None, False)
    if not (aliased or bare):
        return Resolved(source, None, None, False)
    uri = resolve_tracking_uri(tracking_uri)
    client = open_store(uri)
    if aliased:
        name, alias = aliased.groups()
        version = alias_holder(client, name, alias)
        if version is None:
            raise ValueError(f"{source}: model {name!r} has no version with alias {alias!r} in {uri}")
    else:
        name = bare.group(1)
        version = served_version(client, name)
        if version is None:
            raise ValueError(f"{source}: no such registered model, or no version of it, in {uri}")
        alias = DEFAULT_ALIAS if DEFAULT_ALIAS in (version.aliases or []) else None
    return Resolved(f"models:/{name}/{version.version}", str(version.version), alias, True)


@dataclass
class Served:
    """One loaded version of a served model and its inferencers."""

    name: str
    source: str
    resolved: Resolved
    task: str
    meta: dict[str, Any]
    class_names: list[str]
    classifier: Any = None
    extractor: Any = None
    retriever: Any = None
    captioner: Any = None
    answerer: Any = None
    grounder: Any = None
    gallery_size: int = 0
    loaded_at: float = field(default_factory=time.time)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "uri": self.resolved.uri,
            "version": self.resolved.version,
            "alias": self.resolved.alias,
            "task": self.task,
            "classes": len(self.class_names),
            "metrics": self.meta.get("metrics", {}),
            "epoch": self.meta.get("epoch"),
            "step": self.meta.get("step"),
            "run_id": self.meta.get("mlflow_run_id"),
            "gallery_size": self.gallery_size,
            "routes": [route for route, ready in self.routes().items() if ready],
        }

    def routes(self) -> dict[str, bool]:
        return {
            "/v1/classify": self.classifier is not None,
            "/v1/embed": self.extractor is not None,
            "/v1/retrieve": self.retriever is not None,
            "/v1/caption": self.captioner is not None,
            "/v1/vqa": self.answerer is not None,
            "/v1/ground": self.grounder is not None,
        }


def load_served(
    name: str,
    source: str,
    resolved: Resolved,
    gallery: str | None,
    gallery_dataset: str | None,
    device: str | None = None,
) -> Served:
    """Load ``resolved.uri`` with :func:`pretrainlab.get_model` and build its inferencers."""
    import pretrainlab
    from pretrainlab.inference.inferencers import (
        FeatureExtractor,
        ImageCaptionInferencer,
        ImageRetrievalInferencer,
        VisualGroundingInferencer,
        VisualQuestionAnsweringInferencer,
    )

    model = pretrainlab.get_model(resolved.uri, device=device)
    info = model.info
    served = Served(name, source, resolved, info.task, dict(info.meta), list(info.class_names))
    if info.task == "classification":
        served.classifier = pretrainlab.ImageClassificationInferencer(model)
    if info.task == "caption":
        served.captioner = ImageCaptionInferencer(model)
    if info.task == "vqa":
        served.answerer = VisualQuestionAnsweringInferencer(model)
    if info.task == "grounding":
        served.grounder = VisualGroundingInferencer(model)
    if isinstance(getattr(model, "backbone", None), torch.nn.Module):
        served.extractor = FeatureExtractor(model)
        if gallery:
            served.retriever = ImageRetrievalInferencer.from_split(model, split=gallery, dataset=gallery_dataset)
            served.gallery_size = len(served.retriever.gallery)
    return served


class Slot:
    """What the multiplexed loader caches per model name; the alias watcher swaps ``current``."""

    def __init__(self, served: Served) -> None:
        self.current = served


def _run_each(function: Any, items: list[Any]) -> list[Any]:
    """``function(items)``; when one input is bad, each input alone, a bad one giving an error dict."""
    try:
        return list(function(items))
    except ValueError:
        pass
    results = []
    for item in items:
        try:
            results.append(function([item])[0])
        except ValueError as err:
            results.append({"error": f"image: {str(err).removeprefix('input 0: ')}", "status": 422})
    return results


Item = tuple[bytes, int, str | None]  # image bytes, top_k, text (question or referring expression)


def _classify(served: Served, requests: list[Item]) -> list[dict[str, Any]]:
    if served.classifier is None:
        return [{"error": f"{served.name} is a {served.task} model, not a classification model", "status": 400}] * len(
            requests
        )
    top = max(top_k for _, top_k, _ in requests)
    results = _run_each(
        lambda images: served.classifier(images, batch_size=len(images), topk=top), [r[0] for r in requests]
    )
    out = []
    for result, (_, top_k, _) in zip(results, requests, strict=True):
        if "error" in result:
            out.append(result)
            continue
        out.append(
            {
                "pred_label": result["pred_label"],
                "pred_score": result["pred_score"],
                "pred_class": result["pred_class"],
                "pred_scores": [float(score) for score in result["pred_scores"]],
                "pred_topk": result["pred_topk"][:top_k],
            }
        )
    return out


def _embed(served: Served, requests: list[Item]) -> list[dict[str, Any]]:
    if served.extractor is None:
        return [{"error": f"{served.name} has no backbone to embed with", "status": 400}] * len(requests)
    results = _run_each(lambda images: served.extractor(images, batch_size=len(images)), [r[0] for r in requests])
    return [
        result if isinstance(result, dict) else {"embedding": [float(x) for x in result], "dim": int(result.shape[0])}
        for result in results
    ]


def _retrieve(served: Served, requests: list[Item]) -> list[dict[str, Any]]:
    if served.retriever is None:
        return [{"error": "no retrieval gallery is served (set the gallery argument)", "status": 404}] * len(requests)
    top = max(top_k for _, top_k, _ in requests)
    results = _run_each(
        lambda images: served.retriever(images, batch_size=len(images), topk=top), [r[0] for r in requests]
    )
    return [
        result
        if "error" in result
        else {"match_score": result["match_score"][:top_k], "sample_idx": result["sample_idx"][:top_k]}
        for result, (_, top_k, _) in zip(results, requests, strict=True)
    ]


def _wrong_task(served: Served, requests: list[Item], wanted: str) -> list[dict[str, Any]]:
    return [{"error": f"{served.name} is a {served.task} model, not a {wanted} model", "status": 400}] * len(requests)


def _caption(served: Served, requests: list[Item]) -> list[dict[str, Any]]:
    if served.captioner is None:
        return _wrong_task(served, requests, "caption")
    results = _run_each(lambda images: served.captioner(images, batch_size=len(images)), [r[0] for r in requests])
    return [r if "error" in r else {"pred_caption": r["pred_caption"], "score": r["score"]} for r in results]


def _with_text(function: Any, field_name: str) -> Any:
    """``function(images, texts)`` over (image, text) items, an item without text answering 422."""

    def run(items: list[tuple[bytes, str | None]]) -> list[dict[str, Any]]:
        missing = [i for i, (_, text) in enumerate(items) if not text]
        if missing and len(items) > 1:
            raise ValueError("an item without text")  # _run_each then answers item by item
        if missing:
            return [{"error": f"text: field required (the {field_name})", "status": 422}]
        return function([image for image, _ in items], [text for _, text in items])

    return run


def _vqa(served: Served, requests: list[Item]) -> list[dict[str, Any]]:
    if served.answerer is None:
        return _wrong_task(served, requests, "vqa")
    answer = _with_text(lambda images, texts: served.answerer(images, texts, batch_size=len(images)), "question")
    results = _run_each(answer, [(image, text) for image, _, text in requests])
    return [r if "error" in r else {"question": r["question"], "pred_answer": r["pred_answer"]} for r in results]


def _ground(served: Served, requests: list[Item]) -> list[dict[str, Any]]:
    if served.grounder is None:
        return _wrong_task(served, requests, "grounding")
    ground = _with_text(lambda images, texts: served.grounder(images, texts, batch_size=len(images)), "expression")
    results = _run_each(ground, [(image, text) for image, _, text in requests])
    return [r if "error" in r else {"text": r["text"], "pred_bbox": r["pred_bbox"]} for r in results]


_TASKS = {
    "classify": _classify,
    "embed": _embed,
    "retrieve": _retrieve,
    "caption": _caption,
    "vqa": _vqa,
    "ground": _ground,
}

# --------------------------------------------------------------------------- HTTP


def read_token(args: ServeArgs) -> str | None:
    """The bearer token from ``auth_token_env`` or ``auth_token_file``; None when neither is set.

    Raises:
        ValueError: the variable is unset or empty, or the file is unreadable or empty.
    """
    if args.auth_token_env:
        token = os.environ.get(args.auth_token_env, "").strip()
        if not token:
            raise ValueError(f"auth_token_env: ${args.auth_token_env} is unset or empty")
        return token
    if args.auth_token_file:
        try:
            token = Path(args.auth_token_file).expanduser().read_text().strip()
        except OSError as err:
            raise ValueError(f"auth_token_file: cannot read {args.auth_token_file}: {err.strerror or err}") from None
        if not token:
            raise ValueError(f"auth_token_file: {args.auth_token_file} is empty")
        return token
    return None


def check_image(data: bytes, max_pixels: int) -> None:
    """Decode ``data`` fully, refusing more than ``max_pixels`` pixels before decoding.

    Raises:
        ApiError: 413 for too many pixels, 415 for what is no image, 422 for a truncated or corrupt image.
    """
    if not data:
        raise ApiError(422, "image: empty")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ApiError(413, f"image: decompression bomb refused (over max_image_pixels {max_pixels}): {err}") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise ApiError(415, f"image: not an image PIL can read: {err}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ApiError(413, f"image: {width} x {height} = {width * height} pixels, over max_image_pixels {max_pixels}")
    try:
        image.load()
    except Image.DecompressionBombError as err:
        raise ApiError(413, f"image: decompression bomb refused (over max_image_pixels {max_pixels}): {err}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ApiError(422, f"image: truncated or corrupt {image.format or ''} image: {err}") from None


def parse_top_k(value: Any) -> int:
    try:
        top_k = int(value)
    except (TypeError, ValueError):
        raise ApiError(422, f"top_k: must be an integer from 1 to {MAX_TOP_K}, got {value!r}") from None
    if not 1 <= top_k <= MAX_TOP_K:
        raise ApiError(422, f"top_k: must be an integer from 1 to {MAX_TOP_K}, got {top_k}")
    return top_k


async def _result(response: Any) -> Any:
    return await response


class ReplicaLost(Exception):
    """The replica running a call died or became unreachable before it answered."""


async def answer_of(response: Any, name: str, timeout_s: float) -> Any:
    """The result of a model call, its failures as :class:`ApiError` (503 or 504) or :class:`ReplicaLost`.

    Args:
        response: The call, as a task (anything awaitable with ``cancel()``).
        name: The model's name, for messages.
        timeout_s: Cancel the call and answer 504 after this long.
    """
    try:
        return await asyncio.wait_for(_result(response), timeout_s)
    except TimeoutError:
        response.cancel()
        raise ApiError(504, f"model {name!r}: no answer within request_timeout_s {timeout_s:.3g}") from None
    except BackPressureError:
        raise ApiError(
            503,
            f"model {name!r}: every replica is busy and its queue full (max_queued_requests); retry",
            {"Retry-After": "1"},
        ) from None
    except RayActorError as err:
        raise ReplicaLost(f"{type(err).__name__}: {err}") from None
    except Exception as err:  # the model failed to load, or a bug: name it rather than a bare 500
        logger.error("model %r: %s", name, err)
        raise ApiError(503, f"model {name!r} is unavailable: {type(err).__name__}: {err}") from None


def model_server(args: ServeArgs) -> Any:
    """The ``ModelServer`` deployment class, with ``args``' multiplexing and batching limits."""

    @serve.deployment(name="ModelServer")
    class ModelServer:
        """The models: loaded by name (multiplexed), a batch of one model's requests run in one call, moved
        aliases swapped in."""

        def __init__(self, settings: dict[str, Any]) -> None:
            self.args = ServeArgs.model_validate(settings)
            if self.args.torch_threads:
                torch.set_num_threads(self.args.torch_threads)
            Image.MAX_IMAGE_PIXELS = self.args.max_image_pixels
            self.interval = self.args.alias_check_interval_s
            self.slots: weakref.WeakValueDictionary[str, Slot] = weakref.WeakValueDictionary()
            self.watcher: asyncio.Task | None = None
            self.swap_lock = asyncio.Lock()
            self.compute = asyncio.Lock()  # one batch at a time on the replica's torch threads

        async def reconfigure(self, config: dict[str, Any]) -> None:
            """``user_config``: ``alias_check_interval_s``; any change also re-resolves aliases now."""
            self.interval = float(config.get("alias_check_interval_s", self.interval))
            if self.slots:
                await self.refresh()

        @serve.multiplexed(max_num_models_per_replica=args.max_models_per_replica)
        async def slot(self, name: str) -> Slot:
            source = self.args.models[name]
            resolved = await asyncio.to_thread(resolve_source, source, self.args.tracking_uri)
            served = await asyncio.to_thread(
                load_served, name, source, resolved, self.args.gallery, self.args.gallery_dataset, self.args.device
            )
            slot = Slot(served)
            self.slots[name] = slot
            self._start_watcher()
            return slot

        def _start_watcher(self) -> None:
            if self.watcher is None or self.watcher.done():
                self.watcher = asyncio.get_running_loop().create_task(self._watch())

        async def _watch(self) -> None:
            while True:
                await asyncio.sleep(self.interval if self.interval > 0 else 5.0)
                if self.interval > 0:
                    await self.refresh()

        async def refresh(self) -> list[str]:
            """Re-resolve every loaded alias; load and swap in the versions that moved. Returns the swapped names."""
            swapped = []
            async with self.swap_lock:
                for name, slot in list(self.slots.items()):
                    served = slot.current
                    if not served.resolved.watch:
                        continue
                    try:
                        resolved = await asyncio.to_thread(resolve_source, served.source, self.args.tracking_uri)
                        if resolved.uri == served.resolved.uri:
                            continue
                        slot.current = await asyncio.to_thread(
                            load_served,
                            name,
                            served.source,
                            resolved,
                            self.args.gallery,
                            self.args.gallery_dataset,
                            self.args.device,
                        )
                    except Exception as err:  # a store hiccup or a broken version keeps the loaded one
                        logger.warning("%s: keeping %s: %s", name, served.resolved.uri, err)
                        continue
                    logger.info("%s: swapped %s -> %s", name, served.resolved.uri, resolved.uri)
                    swapped.append(name)
            return swapped

        async def run(self, task: str, items: list[Item]) -> list[dict[str, Any]]:
            """A batch of ``task`` requests for the model the call is multiplexed to, run in one call: each
            request's result, or ``{"error", "status"}``."""
            served = (await self.slot(serve.get_multiplexed_model_id())).current
            async with self.compute:
                results = await asyncio.to_thread(_TASKS[task], served, items)
            return [{"model": served.name, "version": served.resolved.version, **result} for result in results]

        async def describe(self) -> dict[str, Any]:
            """What :meth:`Served.describe` says of the model the call is multiplexed to."""
            return (await self.slot(serve.get_multiplexed_model_id())).current.describe()

    return ModelServer


def ingress(args: ServeArgs) -> Any:
    """The ``Ingress`` deployment class: the FastAPI app in front of the ``ModelServer`` replicas."""
    # No /docs or /openapi.json: they would sit outside the bearer token, and the routes read their bodies themselves.
    app = FastAPI(title="PretrainLab Serve", docs_url=None, redoc_url=None, openapi_url=None)
    install_handlers(app)

    @serve.deployment(name="Ingress")
    @serve.ingress(app)
    class Ingress:
        """Auth, body and image checks and JSON errors; requests batched, each batch's requests of one model
        sent in one call to a ``ModelServer`` replica holding it, once more to another when that replica is
        lost mid-call."""

        def __init__(self, settings: dict[str, Any], models: DeploymentHandle) -> None:
            self.args = ServeArgs.model_validate(settings)
            self.token = read_token(self.args)
            self.names = list(self.args.models)
            self.models = models
            Image.MAX_IMAGE_PIXELS = self.args.max_image_pixels

        def _authorize(self, request: Request) -> None:
            if self.token is None:
                return
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                raise ApiError(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

        async def _body(self, request: Request) -> bytes:
            limit = self.args.max_body_bytes
            length = request.headers.get("content-length")
            if length is not None:
                if not length.isdigit():
                    raise ApiError(400, f"Content-Length: not a number: {length!r}")
                if int(length) > limit:
                    raise ApiError(413, f"body of {length} bytes, over max_body_bytes {limit}")
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"body over max_body_bytes {limit}")
                chunks.append(chunk)
            return b"".join(chunks)

        async def _image_request(self, request: Request) -> tuple[str, bytes, int, str | None]:
            """The model name, image bytes, top_k and text of a multipart or JSON request."""
            self._authorize(request)
            body = await self._body(request)
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind == "multipart/form-data":
                request._body = body  # parsed from the bytes already read and counted
                try:
                    form = await request.form(max_files=1, max_fields=8)
                except Exception as err:  # python-multipart / Starlette parse errors
                    raise ApiError(400, f"multipart body: cannot parse: {err}") from None
                upload = form.get("file")
                if upload is None:
                    raise ApiError(422, "file: field required (multipart upload of the image)")
                if not isinstance(upload, UploadFile):
                    raise ApiError(422, "file: must be a file upload, not a text field")
                image = await upload.read()
                model, top_k, text = form.get("model"), parse_top_k(form.get("top_k", 5)), form.get("text")
                if text is not None and not isinstance(text, str):
                    raise ApiError(422, "text: must be a text field, not a file upload")
                if text is not None and len(text) > MAX_TEXT_CHARS:
                    raise ApiError(422, f"text: {len(text)} characters, over {MAX_TEXT_CHARS}")
            elif kind == "application/json":
                try:
                    parsed = ImageRequest.model_validate_json(body)
                except ValidationError as err:
                    raise ApiError(422, describe_error(err.errors(include_url=False))) from None
                try:
                    image = base64.b64decode(parsed.image_base64, validate=True)
                except (binascii.Error, ValueError) as err:
                    raise ApiError(422, f"image_base64: invalid base64: {err}") from None
                model, top_k, text = parsed.model, parsed.top_k, parsed.text
            else:
                raise ApiError(415, f"Content-Type {kind or 'missing'}: send multipart/form-data or application/json")
            name = self._model_name(request, model if isinstance(model, str) else None)
            await asyncio.to_thread(check_image, image, self.args.max_image_pixels)
            return name, image, top_k, text

        def _model_name(self, request: Request, field_value: str | None) -> str:
            name = field_value or request.headers.get(MODEL_HEADER) or self.names[0]
            if name not in self.args.models:
                raise ApiError(404, f"model {name!r} is not served; served: {', '.join(self.names)}")
            return name

        async def _call(self, name: str, method: str, *call_args: Any) -> Any:
            """``ModelServer.<method>(*call_args)`` on a replica holding model ``name``, within request_timeout_s."""
            handle = getattr(self.models.options(multiplexed_model_id=name), method)
            deadline = time.monotonic() + self.args.request_timeout_s
            for attempt in range(1, REPLICA_ATTEMPTS + 1):
                try:
                    return await answer_of(handle.remote(*call_args), name, max(deadline - time.monotonic(), 0.01))
                except ReplicaLost as lost:
                    logger.warning("model %r: attempt %d of %d: %s", name, attempt, REPLICA_ATTEMPTS, lost)
            raise ApiError(
                503, f"model {name!r}: the replicas serving it were lost mid-request; retry", {"Retry-After": "1"}
            )

        async def _task(self, request: Request, task: str) -> dict[str, Any]:
            name, image, top_k, text = await self._image_request(request)
            result = await self._batch((name, task, image, top_k, text))
            if isinstance(result, ApiError):
                raise result
            if "error" in result:
                raise ApiError(result.get("status", 422), result["error"])
            return result

        @serve.batch(max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s)
        async def _batch(self, requests: list[tuple[str, str, bytes, int, str | None]]) -> list[Any]:
            """Requests of any models and tasks: one model-server call per (model, task), run side by side.
            Each request gets its result, or the :class:`ApiError` of its call."""
            groups = {
                key: [i for i, request in enumerate(requests) if request[:2] == key]
                for key in {r[:2] for r in requests}
            }

            async def run(name: str, task: str, rows: list[int]) -> list[Any]:
                try:
                    return await self._call(name, "run", task, [requests[i][2:] for i in rows])
                except ApiError as err:
                    return [err] * len(rows)

            answers = await asyncio.gather(*(run(name, task, rows) for (name, task), rows in groups.items()))
            results: list[Any] = [None] * len(requests)
            for rows, answer in zip(groups.values(), answers, strict=True):
                for row, result in zip(rows, answer, strict=True):
                    results[row] = result
            return results

        @app.post("/v1/classify")
        async def classify(self, request: Request) -> dict[str, Any]:
            """Top-k labels and scores of an image (``file`` upload or JSON ``image_base64``)."""
            return await self._task(request, "classify")

        @app.post("/v1/embed")
        async def embed(self, request: Request) -> dict[str, Any]:
            """The backbone's pooled features of an image."""
            return await self._task(request, "embed")

        @app.post("/v1/retrieve")
        async def retrieve(self, request: Request) -> dict[str, Any]:
            """The top-k gallery rows most similar to an image: ``sample_idx`` and ``match_score``."""
            return await self._task(request, "retrieve")

        @app.post("/v1/caption")
        async def caption(self, request: Request) -> dict[str, Any]:
            """The caption a caption model writes for an image (beam search)."""
            return await self._task(request, "caption")

        @app.post("/v1/vqa")
        async def vqa(self, request: Request) -> dict[str, Any]:
            """The answer a VQA model gives to the question in field ``text`` about an image."""
            return await self._task(request, "vqa")

        @app.post("/v1/ground")
        async def ground(self, request: Request) -> dict[str, Any]:
            """The box (``pred_bbox``, image pixels) of the object that field ``text`` refers to."""
            return await self._task(request, "ground")

        @app.get("/v1/models")
        async def models(self, request: Request) -> dict[str, Any]:
            """Every served model: source, version, alias, task and the checkpoint's metrics."""
            self._authorize(request)
            described = []
            for name in self.names:
                try:
                    described.append(await self._call(name, "describe"))
                except ApiError as err:  # listed with why it cannot answer
                    described.append({"name": name, "source": self.args.models[name], "error": err.message})
            return {"default": self.names[0], "models": described}

        @app.get("/healthz")
        async def healthz(self) -> dict[str, Any]:
            return {"status": "ok", "models": self.names}

    return Ingress


def build_app(args: ServeArgs) -> serve.Application:
    """The application: the ``Ingress`` deployment in front of the ``ModelServer`` deployment, sized by ``args``.

    ``max_ongoing_requests``, ``max_queued_requests``, ``num_cpus``, ``num_gpus`` and the user config are the
    model servers'; the ingress holds the requests they can take and queue (twice over), on no CPU of its own.
    Both scale by ``autoscaling`` (or ``num_replicas``).
    """
    check_args(args)
    read_token(args)  # fail at deploy time, not on the first request
    scale: dict[str, Any] = (
        {"autoscaling_config": args.autoscaling.model_dump()}
        if args.autoscaling is not None
        else {"num_replicas": args.num_replicas}
    )
    settings = args.model_dump()
    models = (
        model_server(args)
        .options(
            max_ongoing_requests=args.max_ongoing_requests,
            max_queued_requests=args.max_queued_requests,
            ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
            user_config={"alias_check_interval_s": args.alias_check_interval_s},
            **scale,
        )
        .bind(settings)
    )
    capacity = 2 * (args.max_ongoing_requests + max(args.max_queued_requests, 0))
    return (
        ingress(args)
        .options(
            max_ongoing_requests=capacity,
            max_queued_requests=args.max_queued_requests,
            ray_actor_options={"num_cpus": 0},
            **scale,
        )
        .bind(settings, models)
    )
