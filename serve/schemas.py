"""The typed arguments of the Serve application and the JSON bodies of its routes."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_TOP_K = 100
MAX_TEXT_CHARS = 1000


class AutoscalingArgs(BaseModel):
    """Ray Serve ``autoscaling_config`` of the deployment."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)


class ServeArgs(BaseModel):
    """Arguments of :func:`serve.app.build_app` (the ``args`` of a Serve config file).

    ``models`` maps the name a request gives (field ``model`` or header
    ``serve_multiplexed_model_id``) to what :func:`pretrainlab.get_model` loads:
    ``models:/NAME@champion``, ``models:/NAME/3``, ``models:/NAME``, ``runs:/ID/checkpoint``
    or a checkpoint folder. The first one is the default.
    """

    model_config = ConfigDict(extra="forbid")

    models: dict[str, str] = Field(min_length=1)
    gallery: str | None = None  # dataset split of the retrieval gallery, e.g. "train"; None: no /v1/retrieve
    gallery_dataset: str | None = None  # prepared dataset folder of the gallery; default: each model's own dataset
    tracking_uri: str | None = None  # MLflow store; default: $MLFLOW_TRACKING_URI, else the project's
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(64, ge=-1)
    max_models_per_replica: int = Field(4, ge=1)
    request_timeout_s: float = Field(30.0, gt=0)
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    auth_token_env: str | None = None  # name of the environment variable holding the bearer token
    auth_token_file: str | None = None  # file holding the bearer token
    alias_check_interval_s: float = Field(60.0, ge=0)  # 0: only on reconfigure
    num_replicas: int = Field(1, ge=1)  # when autoscaling is None
    autoscaling: AutoscalingArgs | None = None
    num_cpus: float = Field(1.0, ge=0)  # Ray CPUs reserved by each replica
    num_gpus: float = Field(0.0, ge=0)  # Ray GPUs reserved by each replica
    device: str | None = None  # torch device of the models; default: CUDA when the replica sees one, else CPU
    torch_threads: int | None = Field(None, ge=1)

    @field_validator("models")
    @classmethod
    def _names(cls, models: dict[str, str]) -> dict[str, str]:
        for name, source in models.items():
            if not name.strip() or not source.strip():
                raise ValueError(f"model {name!r}: empty name or source")
        return models


class ImageRequest(BaseModel):
    """The JSON body of every image route; ``text`` is the question (``/v1/vqa``) or the referring expression
    (``/v1/ground``)."""

    model_config = ConfigDict(extra="forbid")

    image_base64: str
    model: str | None = None
    top_k: int = Field(5, ge=1, le=MAX_TOP_K, strict=True)
    text: str | None = Field(None, max_length=MAX_TEXT_CHARS)


def check_args(args: ServeArgs) -> None:
    """Relations between arguments that one field cannot check."""
    if args.max_ongoing_requests <= args.max_batch_size:
        raise ValueError(
            f"max_ongoing_requests ({args.max_ongoing_requests}) must exceed max_batch_size ({args.max_batch_size}): "
            "a replica takes at most max_ongoing_requests requests at a time, so a batch could never fill"
        )
    if args.auth_token_env and args.auth_token_file:
        raise ValueError("give auth_token_env or auth_token_file, not both")


def describe_error(errors: list[dict[str, Any]]) -> str:
    """A pydantic ``ValidationError.errors()`` list as one line naming each field."""
    parts = []
    for error in errors:
        field = ".".join(str(part) for part in error.get("loc", ())) or "body"
        parts.append(f"{field}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)
