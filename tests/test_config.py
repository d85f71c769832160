"""Typed config: inheritance, overrides, errors, and every checked-in YAML."""

from __future__ import annotations

import pytest
import yaml

from conftest import CONFIGS
from pretrainlab.config import ConfigError, ExperimentConfig, load_config, validate
from pretrainlab.data.transforms import eval_pipeline, train_views
from pretrainlab.sweep.space import check_space


def write(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_several_bases_merge_in_order_and_the_file_wins(tmp_path):
    (tmp_path / "_base_").mkdir()
    write(
        tmp_path / "_base_" / "a.yaml",
        {"model": {"backbone": "resnet50", "label_smoothing": 0.1}, "optim": {"lr": 1.0}},
    )
    write(tmp_path / "_base_" / "b.yaml", {"model": {"backbone": "resnet18"}, "train": {"epochs": 3}})
    cfg = load_config(
        write(
            tmp_path / "exp.yaml", {"_base_": ["_base_/a.yaml", "_base_/b.yaml"], "name": "exp", "optim": {"lr": 0.5}}
        )
    )
    assert cfg.model.backbone == "resnet18"  # b overrides a
    assert cfg.model.label_smoothing == 0.1  # kept from a: mappings merge key by key
    assert cfg.train.epochs == 3
    assert cfg.optim.lr == 0.5  # the file wins over its bases


def test_nested_bases_and_a_single_string_base(tmp_path):
    write(tmp_path / "root.yaml", {"train": {"batch_size": 7}})
    write(tmp_path / "mid.yaml", {"_base_": "root.yaml", "train": {"epochs": 9}})
    cfg = load_config(write(tmp_path / "leaf.yaml", {"_base_": "mid.yaml", "name": "leaf"}))
    assert (cfg.train.batch_size, cfg.train.epochs) == (7, 9)


def test_lists_replace_rather_than_merge(tmp_path):
    write(tmp_path / "base.yaml", {"data": {"mean": [0.1, 0.2, 0.3], "std": [1, 1, 1]}})
    cfg = load_config(
        write(tmp_path / "x.yaml", {"_base_": "base.yaml", "name": "x", "data": {"mean": [0.5], "std": [2]}})
    )
    assert cfg.data.mean == [0.5] and cfg.data.std == [2.0]


def test_overrides_are_typed_and_applied_last(tmp_path):
    path = write(tmp_path / "x.yaml", {"name": "x", "optim": {"lr": 0.1}})
    cfg = load_config(path, ["optim.lr=0.05", "train.epochs=4", "data.mask.ratio=0.6", "optim.name=adamw"])
    assert cfg.optim.lr == 0.05 and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 4 and cfg.data.mask.ratio == 0.6 and cfg.optim.name == "adamw"


def test_amp_off_unquoted_in_yaml_means_full_precision(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("name: x\ntrain:\n  amp: off\n")  # YAML 1.1 reads this off as false
    assert load_config(str(path)).train.amp == "off"
    assert load_config(write(tmp_path / "y.yaml", {"name": "y"}), ["train.amp=off"]).train.amp == "off"
    with pytest.raises(ConfigError, match=r"train\.amp"):
        load_config(str(path), ["train.amp=on"])


def test_override_with_the_wrong_type_names_the_key(tmp_path):
    path = write(tmp_path / "x.yaml", {"name": "x"})
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config(path, ["train.epochs=many"])
    with pytest.raises(ConfigError, match=r"optim\.name"):
        load_config(path, ["optim.name=adagrad"])


def test_unknown_key_names_the_key_and_the_valid_ones(tmp_path):
    path = write(tmp_path / "x.yaml", {"name": "x", "model": {"backbon": "resnet18"}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "model.backbon: unknown key" in message
    assert "backbone" in message and "label_smoothing" in message
    assert str(path) in message


def test_unknown_override_key_is_rejected(tmp_path):
    path = write(tmp_path / "x.yaml", {"name": "x"})
    with pytest.raises(ConfigError, match=r"train\.epoch: unknown key.*epochs"):
        load_config(path, ["train.epoch=3"])


def test_malformed_override_and_override_through_a_value(tmp_path):
    path = write(tmp_path / "x.yaml", {"name": "x"})
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(path, ["optim.lr"])
    with pytest.raises(ConfigError, match="name is a value"):
        load_config(path, ["name.sub=1"])


def test_missing_base_and_cycles_are_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(write(tmp_path / "x.yaml", {"_base_": "nope.yaml", "name": "x"}))
    write(tmp_path / "a.yaml", {"_base_": "b.yaml"})
    write(tmp_path / "b.yaml", {"_base_": "a.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_invalid_yaml_and_non_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_value_constraints():
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        validate({"name": "x", "optim": {"lr": -1}})
    with pytest.raises(ConfigError, match="mean has 3 values but std has 1"):
        validate({"name": "x", "data": {"mean": [0, 0, 0], "std": [1]}})


def test_flat_params_and_digest_are_stable():
    cfg = validate({"name": "x", "optim": {"lr": 0.25}})
    flat = cfg.flat()
    assert flat["optim.lr"] == "0.25" and flat["name"] == "x" and flat["data.materialize"] == "true"
    assert cfg.digest() == validate({"name": "x", "optim": {"lr": 0.25}}).digest()
    assert cfg.digest() != validate({"name": "x", "optim": {"lr": 0.5}}).digest()
    assert ExperimentConfig.model_validate(cfg.to_dict()) == cfg


EXPERIMENTS = sorted([*CONFIGS.glob("*.yaml"), *CONFIGS.glob("sweeps/*.yaml")])
BASES = sorted(CONFIGS.glob("_base_/**/*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[str(p.relative_to(CONFIGS)) for p in EXPERIMENTS])
def test_every_checked_in_config_validates(path):
    cfg = load_config(path)
    assert cfg.name == path.stem, "a config's name must match its file name"
    assert train_views(cfg.data) and eval_pipeline(cfg.data)  # every op and its arguments build
    if path.parent.name == "sweeps":
        check_space(cfg)  # every key and every value of the search space


@pytest.mark.parametrize("path", BASES, ids=[str(p.relative_to(CONFIGS)) for p in BASES])
def test_every_base_file_is_a_valid_partial_config(path):
    validate({"name": "base-check", **yaml.safe_load(path.read_text())}, source=str(path))


def test_there_are_configs_to_check():
    assert EXPERIMENTS and BASES
