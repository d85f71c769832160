"""The Ray cluster launcher configs, checked offline with Ray's own code.

``prepare_config`` merges each file with the provider's ``defaults.yaml`` shipped in Ray
(a file read; no cloud call: the AWS bootstrap that looks up AMIs, subnets and IAM roles
runs only in ``ray up``), then ``validate_config`` checks the result against
``ray-schema.json``. What no offline check can see: instance types, AMIs, quotas,
the Docker images' tags, SSH access and whether the repository URL and commit exist.
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray._private.label_utils import parse_node_labels_string, validate_label_key, validate_label_value
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"aws": ROOT / "cluster.yaml", "local": ROOT / "deploy" / "cluster-local.yaml"}


def load(name: str) -> dict:
    return yaml.safe_load(CONFIGS[name].read_text())


def prepared(config: dict) -> dict:
    """What ``ray up`` validates: the config merged with Ray's defaults for its provider."""
    merged = prepare_config(copy.deepcopy(config))
    validate_config(merged)
    return merged


def pinned(requirement_name: str) -> str:
    """The exact version pyproject.toml pins for one dependency."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        match = re.fullmatch(rf"{re.escape(requirement_name)}(\[[^\]]*\])?==([\w.]+)", dep)
        if match:
            return match.group(2)
    raise AssertionError(f"pyproject.toml pins no exact version of {requirement_name}")


def all_commands(config: dict) -> list[str]:
    keys = ("setup_commands", "head_setup_commands", "worker_setup_commands")
    keys += ("head_start_ray_commands", "worker_start_ray_commands")
    return [command for key in keys for command in config.get(key, [])]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_passes_rays_schema_after_defaults(name):
    merged = prepared(load(name))
    assert merged["cluster_name"].startswith("pretrainlab")
    assert merged["head_node_type"] in merged["available_node_types"]


def test_aws_config_has_a_cpu_head_and_autoscaled_gpu_workers():
    merged = prepared(load("aws"))
    types = merged["available_node_types"]
    head = types[merged["head_node_type"]]
    assert "GPU" not in head["resources"] and head["max_workers"] == 0
    (gpu_name,) = [name for name, node in types.items() if node["resources"].get("GPU", 0) >= 1]
    gpu = types[gpu_name]
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= merged["max_workers"]
    assert gpu["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p4", "p5"))
    assert merged["docker"]["worker_image"].endswith("-gpu")
    for image in (merged["docker"]["head_image"], merged["docker"]["worker_image"]):
        assert image.startswith(f"rayproject/ray:{pinned('ray')}-py311"), image
    assert any("boto3" in command for command in merged["head_setup_commands"])  # the autoscaler needs it


def test_local_config_names_its_machines():
    merged = prepared(load("local"))
    provider = merged["provider"]
    assert provider["head_ip"] and provider["worker_ips"]
    (node,) = merged["available_node_types"].values()
    assert node["max_workers"] == len(provider["worker_ips"])


@pytest.mark.parametrize("name", CONFIGS)
def test_node_labels_follow_rays_syntax(name):
    config = load(name)
    labels = [node.get("labels", {}) for node in config.get("available_node_types", {}).values()]
    for command in all_commands(config):
        labels += [parse_node_labels_string(flag) for flag in re.findall(r"--labels='([^']*)'", command)]
    assert any(labels), "no node carries a label"
    for mapping in labels:
        for key, value in mapping.items():
            assert validate_label_key(key) is None, validate_label_key(key)
            validate_label_value(value)


@pytest.mark.parametrize("name", CONFIGS)
def test_setup_installs_the_pinned_torch_and_this_package(name):
    commands = load(name)["setup_commands"]
    joined = " ".join(commands)
    torch_pins = dict(re.findall(r"\b(torch|torchvision)==([\w.]+)", joined))
    assert torch_pins == {"torch": pinned("torch"), "torchvision": pinned("torchvision")}
    clone_dir = re.search(r"git clone --quiet \"\$REPO\" ([^\s)]+)", joined).group(1)
    installs = re.findall(r"cd (\S+) && (?:\S*/)?pip install (?:--quiet )?-e (\.(?:\[([\w,-]+)\])?)", joined)
    assert installs, "the package itself is not installed (cd CLONE && pip install -e .)"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for directory, _, extras in installs:
        assert directory == clone_dir, f"pip install -e runs in {directory}, the clone is {clone_dir}"
        for extra in filter(None, extras.split(",")):
            assert extra in project.get("optional-dependencies", {}), f"pyproject.toml has no extra {extra!r}"
    for path in re.findall(r"~/pretrainlab/([\w./-]+)", joined):  # files of the checkout a command names
        assert path.startswith(".venv") or (ROOT / path).exists(), path


def clone_command(config: dict) -> str:
    (clone,) = [command for command in config["setup_commands"] if "git checkout" in command]
    return clone


@pytest.mark.parametrize("name", CONFIGS)
def test_the_commit_is_set_by_the_headers_sed_line(name):
    """Unedited, setup stops with a message naming the file; the header's ``sed`` line sets the commit."""
    text = CONFIGS[name].read_text()
    clone = clone_command(yaml.safe_load(text))
    assert "COMMIT=REPLACE_WITH_COMMIT;" in clone
    assert f"{CONFIGS[name].name}: set COMMIT" in clone
    sed = re.search(r'sed -i "s/(.+?)/(.+?)/" ', text)
    assert sed, "the header has no sed line that sets the commit"
    pattern = sed.group(1).replace("\\(", "(").replace("\\)", ")")
    commit = "0123456789abcdef0123456789abcdef01234567"
    replacement = sed.group(2).replace("\\1", "\\g<1>").replace("$(git rev-parse HEAD)", commit)
    edited = yaml.safe_load(re.sub(pattern, replacement, text, flags=re.MULTILINE))
    assert f"COMMIT={commit};" in clone_command(edited)
    prepared(edited)


@pytest.mark.parametrize("name", CONFIGS)
def test_ray_starts_with_token_auth_and_a_private_dashboard(name):
    config = load(name)
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [command for command in config[key] if "ray start" in command]
        assert start and all("RAY_AUTH_MODE=token" in command for command in start), key
    (head_start,) = [command for command in config["head_start_ray_commands"] if "ray start" in command]
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start


@pytest.mark.parametrize(
    "name, path, typo",
    [
        ("aws", ("available_node_types", "worker.gpu"), "min_worker"),
        ("aws", (), "setup_command"),
        ("aws", ("docker",), "run_option"),
        ("local", (), "head_start_ray_command"),
    ],
)
def test_a_typod_key_fails_naming_it(name, path, typo):
    config = load(name)
    section = config
    for key in path:
        section = section[key]
    right = next(key for key in section if key.startswith(typo))
    section[typo] = section.pop(right)
    with pytest.raises(jsonschema.ValidationError, match=rf"'{typo}' was unexpected"):
        prepared(config)


def test_a_negative_resource_fails():
    config = load("aws")
    config["available_node_types"]["worker.gpu"]["resources"]["GPU"] = -1
    with pytest.raises(jsonschema.ValidationError, match="-1 is less than the minimum of 0"):
        prepared(config)
