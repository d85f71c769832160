"""The ``Ingress`` deployment: the FastAPI app in front of the ``ModelServer`` replicas.

It checks the bearer token, the body and the image, answers every failure as JSON, and batches requests
(``@serve.batch``): a batch becomes one call per model and task, sent to a ``ModelServer`` replica holding that
model within ``request_timeout_s``, and once more to another replica when that one dies mid-call. It loads no
model (no torch here); requests name models, never files.
"""

import asyncio
import base64
import binascii
import hmac
import io
import logging
import os
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from PIL import Image
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile

from serve.errors import ApiError, install_handlers
from serve.schemas import MAX_TEXT_CHARS, MAX_TOP_K, ImageRequest, ServeArgs, describe_error

logger = logging.getLogger("ray.serve")

MODEL_HEADER = "serve_multiplexed_model_id"
REPLICA_ATTEMPTS = 2  # a call whose replica dies goes once more to another
Fields = tuple[Any, bytes, int, str | None]  # the model field (unchecked), image bytes, top_k, text
Row = tuple[str, str, bytes, int, str | None]  # model name, task, image bytes, top_k, text: one batched request

# No /docs or /openapi.json: they would sit outside the bearer token, and the routes read their bodies themselves.
app = FastAPI(title="PretrainLab Serve", docs_url=None, redoc_url=None, openapi_url=None)
install_handlers(app)


# --------------------------------------------------------------------------- requests


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


def authorize(token: str | None, request: Request) -> None:
    """Refuse (401) a request without ``Authorization: Bearer <token>``; with no token, let all through."""
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) past ``limit`` bytes, as declared or as read (a chunked body)."""
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


async def multipart_fields(request: Request, body: bytes) -> Fields:
    """The fields of a multipart body: ``file`` (the image), ``model``, ``top_k`` and ``text``."""
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
    return model, image, top_k, text


def json_fields(body: bytes) -> Fields:
    """The fields of a JSON body (:class:`ImageRequest`), the image decoded from ``image_base64``."""
    try:
        parsed = ImageRequest.model_validate_json(body)
    except ValidationError as err:
        raise ApiError(422, describe_error(err.errors(include_url=False))) from None
    try:
        image = base64.b64decode(parsed.image_base64, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ApiError(422, f"image_base64: invalid base64: {err}") from None
    return parsed.model, image, parsed.top_k, parsed.text


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
    """``value`` as an integer from 1 to ``MAX_TOP_K``; anything else answers 422."""
    try:
        top_k = int(value)
    except (TypeError, ValueError):
        raise ApiError(422, f"top_k: must be an integer from 1 to {MAX_TOP_K}, got {value!r}") from None
    if not 1 <= top_k <= MAX_TOP_K:
        raise ApiError(422, f"top_k: must be an integer from 1 to {MAX_TOP_K}, got {top_k}")
    return top_k


# --------------------------------------------------------------------------- model calls


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


def group_rows(rows: list[Row]) -> dict[tuple[str, str], list[int]]:
    """(model, task) -> the indices of ``rows`` that ask it."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row[:2], []).append(i)
    return groups


# --------------------------------------------------------------------------- deployment


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    """Auth, body and image checks and JSON errors; requests batched, each batch's requests of one model sent in
    one call to a ``ModelServer`` replica holding it, once more to another when that replica is lost mid-call."""

    def __init__(self, settings: dict[str, Any], models: DeploymentHandle) -> None:
        self.args = ServeArgs.model_validate(settings)
        self.token = read_token(self.args)
        self.names = list(self.args.models)
        self.models = models
        Image.MAX_IMAGE_PIXELS = self.args.max_image_pixels
        self._batch.set_max_batch_size(self.args.max_batch_size)
        self._batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)

    async def _image_request(self, request: Request) -> tuple[str, bytes, int, str | None]:
        """The model name, image bytes, top_k and text of a multipart or JSON request, each checked."""
        authorize(self.token, request)
        body = await read_body(request, self.args.max_body_bytes)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            model, image, top_k, text = await multipart_fields(request, body)
        elif kind == "application/json":
            model, image, top_k, text = json_fields(body)
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

    @serve.batch  # max_batch_size and batch_wait_timeout_s: the app's, set in __init__
    async def _batch(self, rows: list[Row]) -> list[Any]:
        """Requests of any models and tasks: one model-server call per (model, task), run side by side.
        Each request gets its result, or the :class:`ApiError` of its call."""
        groups = group_rows(rows)
        answers = await asyncio.gather(*(self._run(name, task, rows, i) for (name, task), i in groups.items()))
        results: list[Any] = [None] * len(rows)
        for indices, answer in zip(groups.values(), answers, strict=True):
            for index, result in zip(indices, answer, strict=True):
                results[index] = result
        return results

    async def _run(self, name: str, task: str, rows: list[Row], indices: list[int]) -> list[Any]:
        """``ModelServer.run`` of the rows at ``indices``; a failed call is each row's :class:`ApiError`."""
        try:
            return await self._call(name, "run", task, [rows[i][2:] for i in indices])
        except ApiError as err:
            return [err] * len(indices)

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
        authorize(self.token, request)
        described = []
        for name in self.names:
            try:
                described.append(await self._call(name, "describe"))
            except ApiError as err:  # listed with why it cannot answer
                described.append({"name": name, "source": self.args.models[name], "error": err.message})
        return {"default": self.names[0], "models": described}

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Liveness, without the token: the served model names."""
        return {"status": "ok", "models": self.names}
