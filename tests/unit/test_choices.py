"""Every pluggable choice is one entry of one table (pipeline/choices.py): its code resolves,
and its name goes through the config, the trigger forms and the CLI."""

import inspect

import pytest

from pipeline import choices
from pipeline.cli import build_parser
from pipeline.config import ConfigError, config_from_dict

TABLES = choices.KEYS
ENTRIES = [(key, name) for key, table in TABLES.items() for name in table]
LISTS = {"compress.methods", "explain.methods"}  # keys that take a list of names


def _as_value(key: str, name: str):
    return [name] if key in LISTS else name


@pytest.mark.parametrize(("key", "name"), ENTRIES)
def test_each_entry_is_accepted_by_the_config_and_its_code_resolves(key, name):
    cfg = config_from_dict({}, {key: _as_value(key, name)})
    value = cfg.to_dict()
    for part in key.split("."):
        value = value[part]
    assert value == _as_value(key, name)
    assert choices.load(TABLES[key], name) is not None


@pytest.mark.parametrize("key", TABLES)
def test_a_name_outside_the_table_is_a_config_error_naming_the_allowed_ones(key):
    with pytest.raises(ConfigError) as refused:
        config_from_dict({}, {key: _as_value(key, "nope")})
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
    for name in choices.COMPRESSIONS:
        method = choices.load(choices.COMPRESSIONS, name)
        params = list(inspect.signature(method).parameters)
        assert params == ["cfg", "settings", "validation", "teacher", "ctx"], name
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


# Where the docs list each kind (the start of the line that lists it): a new entry without its
# description fails here.
DOCS = {
    "base.dataset": ("docs/data.md", "| `"),  # a row of the datasets table
    "train.model.name": ("docs/training.md", "- Models:"),
    "train.optimizer.name": ("docs/training.md", "- Optimizers:"),
    "train.schedule.name": ("docs/training.md", "- Schedules:"),
    "sweep.strategy": ("docs/running.md", ""),  # "(`sweep.strategy`: `NAME`" in its paragraph
    "compress.methods": ("docs/training.md", "- Compression methods:"),
    "explain.methods": ("docs/training.md", "- Attribution methods:"),
}


@pytest.mark.parametrize(("key", "name"), ENTRIES)
def test_each_entry_is_documented_where_its_kind_is_listed(key, name):
    from tests.conftest import REPO

    doc, start = DOCS[key]
    listing: list[str] = []  # each listing line with its indented continuation lines
    for line in (REPO / doc).read_text().splitlines():
        if line.startswith(start):
            listing.append(line)
        elif listing and line.startswith("  "):
            listing[-1] += " " + line.strip()
    if key == "sweep.strategy":
        wanted = f"(`sweep.strategy`: `{name}`"
    else:
        wanted = f"`{name}`"
    assert any(wanted in line for line in listing), f"list {name!r} in {doc} ({start!r})"


def test_pipeline_choices_lists_every_entry(capsys):
    from pipeline.cli import main

    assert main(["choices"]) == 0
    listed = capsys.readouterr().out
    assert all(f"  {name} " in listed for _, name in ENTRIES)


@pytest.mark.parametrize("name", choices.MODELS)
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_every_model_maps_images_to_one_logit_per_class(name, shape):
    import torch

    from pipeline.config import ModelConfig
    from pipeline.training.models import build_model

    net = build_model(ModelConfig(name=name), shape, 7)
    assert net(torch.zeros(2, *shape)).shape == (2, 7)


@pytest.mark.parametrize("name", choices.OPTIMIZERS)
def test_every_optimizer_builds_at_the_configured_lr_and_steps(name):
    import torch

    from pipeline.config import OptimizerConfig
    from pipeline.training.optim import build_optimizer

    model = torch.nn.Linear(4, 2)
    optimizer = build_optimizer(model, OptimizerConfig(name=name, lr=0.0123))
    assert {group["lr"] for group in optimizer.param_groups} == {0.0123}
    before = model.weight.detach().clone()
    model(torch.ones(3, 4)).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model.weight)


@pytest.mark.parametrize("name", choices.SCHEDULES)
def test_every_schedule_is_a_finite_multiplier_of_at_most_one(name):
    from pipeline.config import ScheduleConfig
    from pipeline.training.schedules import lr_factor

    cfg = ScheduleConfig(name=name, warmup_epochs=0)
    factors = [lr_factor(step, 10, 5, cfg) for step in range(50)]
    assert all(0 <= f <= 1 for f in factors) and max(factors) > 0
