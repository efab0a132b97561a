"""Config: params.yaml loads; every bad value is rejected up front with the key and the fix."""

import pytest

from pipeline.config import (
    ConfigError,
    config_from_dict,
    load_config,
    parse_overrides,
    resolved_config,
)
from tests.conftest import REPO


def test_committed_params_load_and_flatten_to_one_column_per_hyperparameter():
    cfg = load_config(REPO / "params.yaml")
    flat = cfg.flat()
    for key in ("train.optimizer.name", "train.optimizer.lr", "train.schedule.name", "base.seed"):
        assert key in flat
    assert flat["base.dataset"] == "digits"


@pytest.mark.parametrize(
    ("raw", "overrides", "must_mention"),
    [
        (
            {"train": {"optimizr": {}}},
            {},
            ["train.optimizr", "unknown key", "optimizer", "schedule"],
        ),
        ({"bogus": 1}, {}, ["bogus", "unknown key", "base", "train"]),
        (
            {},
            {"train.optimizer.name": "adamx"},
            ["train.optimizer.name", "'sgd'", "'adamw'", "adamx"],
        ),
        ({}, {"train.schedule.name": "cosinus"}, ["train.schedule.name", "'cosine'", "'onecycle'"]),
        ({}, {"train.optimizer.lr": 0}, ["train.optimizer.lr", "greater than 0"]),
        ({}, {"train.optimizer.lr": -0.1}, ["train.optimizer.lr"]),
        ({}, {"train.epochs": 0}, ["train.epochs", "greater than or equal to 1"]),
        ({}, {"train.batch_size": "many"}, ["train.batch_size", "integer", "many"]),
        ({}, {"base.dataset": "imagenet"}, ["base.dataset", "'digits'", "'cifar10'"]),
        ({}, {"train.optimizer.nesterov": True, "train.optimizer.name": "adam"}, ["nesterov"]),
        # the compress stage's settings
        ({}, {"compress.methods": ["zip"]}, ["compress.methods.0", "'distill'", "'quantize'"]),
        ({}, {"compress.methods": "prune"}, ["compress.methods", "list"]),
        ({}, {"compress.methods": ["prune", "prune"]}, ["compress.methods", "twice"]),
        ({}, {"compress.prune.sparsity": 1.0}, ["compress.prune.sparsity", "less than 1"]),
        ({}, {"compress.prune.max_params": 0}, ["compress.prune.max_params"]),
        ({}, {"compress.distill.temperature": 0}, ["compress.distill.temperature"]),
        ({}, {"compress.distill.alpha": 1.5}, ["compress.distill.alpha"]),
        ({}, {"compress.distill.student.name": "vit"}, ["compress.distill.student.name", "'mlp'"]),
        ({}, {"compress.distill.temp": 2}, ["compress.distill.temp", "unknown key", "temperature"]),
        ({}, {"compress.quantize.calibration_images": 0}, ["compress.quantize.calibration_images"]),
        ({}, {"register.max_accuracy_drop": -0.1}, ["register.max_accuracy_drop"]),
        ({}, {"register.min_size_ratio": 0.5}, ["register.min_size_ratio", "1"]),
    ],
)
def test_bad_config_names_the_key_and_what_is_allowed(raw, overrides, must_mention):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, overrides)
    for text in must_mention:
        assert text in str(err.value)


def test_overrides_parse_yaml_values_and_apply_nested():
    overrides = parse_overrides(
        ["train.optimizer.name=sgd", "train.optimizer.lr=0.05", "train.epochs=3"]
    )
    cfg = config_from_dict({}, overrides)
    assert (cfg.train.optimizer.name, cfg.train.optimizer.lr, cfg.train.epochs) == ("sgd", 0.05, 3)


def test_malformed_override_is_a_config_error():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["train.epochs"])
    with pytest.raises(ConfigError, match="is a value, not a block"):
        config_from_dict({"train": {"epochs": 3}}, {"train.epochs.x": 1})


def test_params_hash_follows_training_inputs_only():
    base = config_from_dict({})
    assert base.params_hash() == config_from_dict({}).params_hash()
    assert base.params_hash() != config_from_dict({}, {"train.optimizer.lr": 0.01}).params_hash()
    assert base.params_hash() == config_from_dict({}, {"register.floor": 0.5}).params_hash()


def test_missing_or_broken_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "params.yaml"
    broken.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_a_resolved_config_round_trips_without_reapplying_its_preset():
    """DAG tasks and `pipeline reproduce` rebuild the config from its dict: a form field that
    beat the preset must still win there."""
    cfg = load_config(REPO / "params.yaml", {"base.preset": "fast-cnn-digits", "train.epochs": 3})
    again = resolved_config(cfg.to_dict())
    assert again.train.epochs == 3 and again.base.preset == "fast-cnn-digits"
    assert again.params_hash() == cfg.params_hash()
    with pytest.raises(ConfigError, match="train.epochs"):
        resolved_config({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "epochs": 0}})


def test_typed_defaults_are_the_values_in_params_yaml():
    """One source of defaults: a key left out of a params file means params.yaml's value."""
    committed = load_config(REPO / "params.yaml").to_dict()
    defaults = config_from_dict({}).to_dict()
    committed.pop("presets"), defaults.pop("presets")
    assert defaults == committed


def test_params_yaml_writes_every_key_of_the_config():
    """A setting the config has but params.yaml does not show is a setting nobody finds."""
    import yaml

    from pipeline.config import _flatten

    written = yaml.safe_load((REPO / "params.yaml").read_text())
    written.pop("presets")
    defaults = config_from_dict({}).to_dict()
    defaults.pop("presets")
    space = "sweep.optuna.space."  # the dimensions are the user's, each with its own keys
    missing = {
        k for k in set(_flatten(defaults)) - set(_flatten(written)) if not k.startswith(space)
    }
    assert missing == set(), "add these keys to params.yaml with their default values"


def test_a_key_written_twice_is_refused_with_both_lines(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  epochs: 3\n  batch_size: 32\n  epochs: 4\n")
    with pytest.raises(
        ConfigError, match=r"key 'epochs' is written twice in one block \(lines 2 and 4\)"
    ):
        load_config(params)
    params.write_text(
        "train:\n  epochs: 3\nvalidate:\n  min_rows_per_split: 5\ntrain:\n  batch_size: 8\n"
    )
    with pytest.raises(ConfigError, match=r"key 'train' is written twice .*lines 1 and 5"):
        load_config(params)


def test_a_value_of_either_kind_is_explained_in_one_line_without_pydantics_names():
    with pytest.raises(ConfigError) as err:
        config_from_dict({}, {"train.optimizer.lr": -1})
    (line,) = [x for x in str(err.value).splitlines() if "train.optimizer.lr" in x]
    assert line.strip() == (
        "train.optimizer.lr: input should be greater than 0, or input should be 'auto' (got -1)"
    )
    assert "constrained" not in str(err.value) and "literal[" not in str(err.value)
