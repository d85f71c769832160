"""Connecting to Ray: a running cluster when there is one, else a local one bound to 127.0.0.1."""

from __future__ import annotations

import json
import os

import ray


def init_ray(**kwargs) -> None:
    """``ray.init`` once: joins ``$RAY_ADDRESS`` or a running ``ray start`` head, else starts a local Ray."""
    if not ray.is_initialized():
        ray.init(**kwargs)


def ray_job_tags() -> dict[str, str]:
    """The Ray job id and, under ``ray job submit``, the submission id (for MLflow tags)."""
    tags = {"ray.job_id": ray.get_runtime_context().get_job_id()}
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    submission = job_config.get("metadata", {}).get("job_submission_id")
    if submission:
        tags["ray.submission_id"] = submission
    return tags
