"""Every pluggable choice is one entry of one table (pipeline/choices.py): its code resolves,
and its name goes through the config, the trigger forms and the CLI."""

import inspect

import pytest

from pipeline import choices
from pipeline.cli import build_parser
from pipeline.config import ConfigError, config_from_dict

TABLES = choices.KEYS
ENTRIES = [(key, name) for key, table in TABLES.items() for name in table]


@pytest.mark.parametrize(("key", "name"), ENTRIES)
def test_each_entry_is_accepted_by_the_config_and_its_code_resolves(key, name):
    cfg = config_from_dict({}, {key: name})
    value = cfg.to_dict()
    for part in key.split("."):
        value = value[part]
    assert value == name
    assert choices.load(TABLES[key], name) is not None


@pytest.mark.parametrize("key", TABLES)
def test_a_name_outside_the_table_is_a_config_error_naming_the_allowed_ones(key):
    with pytest.raises(ConfigError) as refused:
        config_from_dict({}, {key: "nope"})
    assert all(f"'{name}'" in str(refused.value) for name in TABLES[key])


def test_each_entry_has_the_interface_of_its_kind():
    from pipeline.data.sources.common import Source

    for name in choices.DATASETS:
        assert isinstance(choices.load(choices.DATASETS, name), Source), name
    for table, params in (
        (choices.MODELS, ["shape", "num_classes", "cfg"]),
        (choices.OPTIMIZERS, ["groups", "cfg", "fused"]),
        (choices.SCHEDULES, ["step", "steps_per_epoch", "epochs", "cfg"]),
    ):
        for name in table:
            function = choices.load(table, name)
            assert list(inspect.signature(function).parameters) == params, name
    for name in choices.SWEEP_STRATEGIES:
        strategy = choices.load(choices.SWEEP_STRATEGIES, name)
        assert all(callable(getattr(strategy, f)) for f in ("start", "trial", "finish")), name


@pytest.mark.parametrize("name", choices.DATASETS)
def test_the_cli_takes_every_dataset(name):
    assert build_parser().parse_args(["data", "pull", "--dataset", name]).dataset == name


def test_the_cli_refuses_a_dataset_outside_the_table(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["data", "pull", "--dataset", "nope"])
    assert "invalid choice" in capsys.readouterr().err


def test_an_unknown_name_is_refused_by_load_too():
    with pytest.raises(ValueError) as refused:
        choices.load(choices.MODELS, "vgg")
    assert str(refused.value) == f"unknown choice 'vgg'; allowed: {', '.join(choices.MODELS)}"


# Where the docs describe each kind: a new entry without its paragraph fails here.
DOCS = {
    "base.dataset": "docs/data.md",
    "train.model.name": "docs/training.md",
    "train.optimizer.name": "docs/training.md",
    "train.schedule.name": "docs/training.md",
    "sweep.strategy": "docs/running.md",
}


@pytest.mark.parametrize(("key", "name"), ENTRIES)
def test_each_entry_is_documented(key, name):
    from tests.conftest import REPO

    assert f"`{name}`" in (REPO / DOCS[key]).read_text(), f"describe {name!r} in {DOCS[key]}"


def test_pipeline_choices_lists_every_entry(capsys):
    from pipeline.cli import main

    assert main(["choices"]) == 0
    listed = capsys.readouterr().out
    assert all(f"  {name} " in listed for _, name in ENTRIES)
