"""The KubeRay manifests under deploy/kuberay/, checked offline against what they name.

KubeRay's CRD schemas are not installable here (they ship with the Go operator), so the
RayJob and RayService are checked against a small JSON schema of the KubeRay fields these
files use (unknown keys refused, so a typo fails; a new KubeRay field must be added to
``KUBERAY_SCHEMA``). Their pod templates are checked against the Kubernetes API schema with
``kubernetes-validate`` (strict). Then cross-checks: the job's script and config exist and
the config with its ``--set`` overrides loads; the Serve config passes Ray Serve's own
``ServeDeploySchema`` and ``ServeArgs``, and its ``import_path`` imports (without Ray);
versions match pyproject.toml; GPU pods request what Ray Train and Serve will reserve.
What no offline check can see: the image's existence, the cluster's KubeRay version,
storage classes, secrets, and whether the pods get scheduled.
"""

from __future__ import annotations

import importlib
import re
import shlex
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from pretrainlab.config import load_config

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "deploy" / "kuberay"
K8S_VERSION = "1.33.0"  # a Kubernetes release that current KubeRay supports

_STR = {"type": "string"}
_STRINGS = {"type": "object", "additionalProperties": _STR}
_POD_TEMPLATE = {"type": "object", "required": ["spec"]}  # checked by kubernetes-validate
_HEAD = {
    "type": "object",
    "required": ["rayStartParams", "template"],
    "additionalProperties": False,
    "properties": {"rayStartParams": _STRINGS, "template": _POD_TEMPLATE, "serviceType": _STR},
}
_WORKER_GROUP = {
    "type": "object",
    "required": ["groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"],
    "additionalProperties": False,
    "properties": {
        "groupName": _STR,
        "replicas": {"type": "integer", "minimum": 0},
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 1},
        "rayStartParams": _STRINGS,
        "template": _POD_TEMPLATE,
    },
}
_RAY_CLUSTER_SPEC = {
    "type": "object",
    "required": ["rayVersion", "headGroupSpec", "workerGroupSpecs"],
    "additionalProperties": False,
    "properties": {
        "rayVersion": _STR,
        "authOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"mode": {"enum": ["disabled", "token"]}},
        },
        "enableInTreeAutoscaling": {"type": "boolean"},
        "headGroupSpec": _HEAD,
        "workerGroupSpecs": {"type": "array", "minItems": 1, "items": _WORKER_GROUP},
    },
}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}, "labels": _STRINGS},
}
KUBERAY_SCHEMA = {
    "RayJob": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": "RayJob"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["entrypoint", "rayClusterSpec"],
                "additionalProperties": False,
                "properties": {
                    "entrypoint": _STR,
                    "shutdownAfterJobFinishes": {"type": "boolean"},
                    "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                    "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                    "backoffLimit": {"type": "integer", "minimum": 0},
                    "runtimeEnvYAML": _STR,
                    "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                    "rayClusterSpec": _RAY_CLUSTER_SPEC,
                },
            },
        },
    },
    "RayService": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": "RayService"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["serveConfigV2", "rayClusterConfig"],
                "additionalProperties": False,
                "properties": {"serveConfigV2": _STR, "rayClusterConfig": _RAY_CLUSTER_SPEC},
            },
        },
    },
}


def load(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def cluster_spec(manifest: dict) -> dict:
    spec = manifest["spec"]
    return spec.get("rayClusterSpec") or spec["rayClusterConfig"]


def containers(manifest: dict) -> dict[str, dict]:
    """The one container of each group's pod: ``{"head": ..., GROUP: ...}``."""
    cluster = cluster_spec(manifest)
    groups = {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}
    out = {}
    for name, group in groups.items():
        (container,) = group["template"]["spec"]["containers"]
        out[name] = container
    return out


def quantity(value: str | int) -> float:
    """A Kubernetes CPU or GPU quantity as a number ("500m" -> 0.5)."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def pinned(name: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        match = re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?==([\w.]+)", dep)
        if match:
            return match.group(2)
    raise AssertionError(f"pyproject.toml pins no exact version of {name}")


def serve_config(manifest: dict) -> dict:
    return yaml.safe_load(manifest["spec"]["serveConfigV2"])


MANIFESTS = {"rayjob.yaml": "RayJob", "rayservice.yaml": "RayService"}


@pytest.mark.parametrize("name, kind", MANIFESTS.items())
def test_manifest_matches_the_kuberay_fields_it_uses(name, kind):
    manifest = load(name)
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", kind)
    jsonschema.validate(manifest, KUBERAY_SCHEMA[kind])


@pytest.mark.parametrize(
    "name, path, typo",
    [
        ("rayjob.yaml", ("spec",), "shutdownAfterJobFinish"),
        ("rayjob.yaml", ("spec", "rayClusterSpec", "workerGroupSpecs", 0), "minReplica"),
        ("rayservice.yaml", ("spec",), "serveConfig"),
    ],
)
def test_a_typod_kuberay_key_fails_naming_it(name, path, typo):
    manifest = load(name)
    section = manifest
    for key in path:
        section = section[key]
    right = next(key for key in section if key.startswith(typo))
    section[typo] = section.pop(right)
    errors = [
        error.message
        for error in jsonschema.Draft202012Validator(KUBERAY_SCHEMA[MANIFESTS[name]]).iter_errors(manifest)
    ]
    assert any(f"'{typo}' was unexpected" in message for message in errors), errors


@pytest.mark.parametrize("name", MANIFESTS)
def test_pod_templates_pass_the_kubernetes_schema(name):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    cluster = cluster_spec(load(name))
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        resource = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


def test_a_typod_pod_field_fails_the_kubernetes_schema():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    template = cluster_spec(load("rayjob.yaml"))["headGroupSpec"]["template"]
    template["spec"]["containers"][0]["volumeMount"] = template["spec"]["containers"][0].pop("volumeMounts")
    resource = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
    with pytest.raises(kubernetes_validate.ValidationError, match="volumeMount"):
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name", MANIFESTS)
def test_versions_and_image_match_the_repository(name):
    manifest = load(name)
    assert cluster_spec(manifest)["rayVersion"] == pinned("ray")
    (image,) = {container["image"] for container in containers(manifest).values()}  # one image for every pod
    assert re.fullmatch(r"[\w.\-/:]+/pretrainlab:[\w.\-]+", image), image  # REGISTRY/pretrainlab:COMMIT or a real one
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(pinned('ray'))}-py311-gpu$", dockerfile, re.MULTILINE)
    assert f"torch=={pinned('torch')} torchvision=={pinned('torchvision')}" in dockerfile
    for container in containers(manifest).values():
        assert container["workingDir"] == "/home/ray/pretrainlab"
        assert re.search(rf"^WORKDIR {container['workingDir']}$", dockerfile, re.MULTILINE)


@pytest.mark.parametrize("name", MANIFESTS)
def test_gpu_pods_request_gpus_and_the_head_none(name):
    manifest = load(name)
    for group, container in containers(manifest).items():
        resources = container["resources"]
        assert resources["requests"] == resources["limits"], f"{group}: requests differ from limits"
        gpus = quantity(resources["limits"].get("nvidia.com/gpu", 0))
        assert gpus == (0 if group == "head" else 1), group
    for group in cluster_spec(manifest)["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert any(t["key"] == "nvidia.com/gpu" for t in group["template"]["spec"]["tolerations"])


def job_command(manifest: dict) -> list[str]:
    """The entrypoint's ``python SCRIPT ...`` words, after its ``cd DIR &&``."""
    words = shlex.split(manifest["spec"]["entrypoint"])
    if words[0] == "cd":
        directory, separator, words = words[1], words[2], words[3:]
        assert separator == "&&" and directory == containers(manifest)["head"]["workingDir"]
    return words


def test_rayjob_runs_the_pretrain_job_with_a_loadable_config():
    manifest = load("rayjob.yaml")
    assert manifest["spec"]["shutdownAfterJobFinishes"] is True
    python, script, config, *rest = job_command(manifest)
    assert python == "python" and (ROOT / script).is_file() and script == "jobs/pretrain.py"
    assert (ROOT / config).is_file(), config
    overrides = [rest[i + 1] for i, word in enumerate(rest) if word == "--set"]
    cfg = load_config(ROOT / config, overrides)  # unknown keys or bad values raise, naming them
    assert cfg.train.use_gpu is True
    (group,) = cluster_spec(manifest)["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    assert cfg.train.num_workers <= group["minReplicas"], "more Ray Train workers than GPU pods"
    assert cfg.train.cpus_per_worker <= quantity(worker["resources"]["limits"]["cpu"])


def test_rayjob_pods_share_pretrainlab_home():
    manifest = load("rayjob.yaml")
    homes = set()
    for container in containers(manifest).values():
        env = {item["name"]: item.get("value") for item in container["env"]}
        homes.add(env["PRETRAINLAB_HOME"])
        mounts = [mount["mountPath"] for mount in container["volumeMounts"]]
        assert any(env["PRETRAINLAB_HOME"].startswith(mount + "/") for mount in mounts)
        assert env["MLFLOW_TRACKING_URI"].startswith("http"), "rank 0 logs from a worker pod: use a server"
    assert len(homes) == 1


def test_rayservice_serve_config_passes_rays_schema_and_the_apps_arguments():
    sys.path.insert(0, str(ROOT))  # `serve/`, as a pod's PYTHONPATH has it
    try:
        from serve.schemas import ServeArgs, check_args

        config = serve_config(load("rayservice.yaml"))
        ServeDeploySchema.model_validate(config)
        (app,) = config["applications"]
        module, attribute = app["import_path"].split(":")
        builder = getattr(importlib.import_module(module), attribute)
        assert callable(builder)
        assert (
            app["import_path"]
            == yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())["applications"][0]["import_path"]
        )
        args = ServeArgs.model_validate(app["args"])
        check_args(args)
    finally:
        sys.path.remove(str(ROOT))
    assert config["http_options"]["port"] == 8000
    env = {item["name"] for item in containers(load("rayservice.yaml"))["head"]["env"]}
    assert args.auth_token_env in env


def test_rayservice_replicas_fit_the_gpu_pods():
    manifest = load("rayservice.yaml")
    sys.path.insert(0, str(ROOT))
    try:
        from serve.schemas import ServeArgs

        args = ServeArgs.model_validate(serve_config(manifest)["applications"][0]["args"])
    finally:
        sys.path.remove(str(ROOT))
    (group,) = cluster_spec(manifest)["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    limits = worker["resources"]["limits"]
    per_pod = int(quantity(limits["nvidia.com/gpu"]) / args.num_gpus) if args.num_gpus else None
    per_pod_cpu = int(quantity(limits["cpu"]) // args.num_cpus)
    fit = per_pod_cpu if per_pod is None else min(per_pod, per_pod_cpu)
    assert fit >= 1, "one replica does not fit a GPU pod"
    assert args.autoscaling.max_replicas <= fit * group["maxReplicas"], "max_replicas cannot all be placed"
    head = containers(manifest)["head"]
    assert cluster_spec(manifest)["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
