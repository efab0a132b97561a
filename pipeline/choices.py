"""The names of every pluggable choice, and where each one's code lives: one table per kind.

The config's allowed values, the DAG trigger forms, the CLI's choices and the docs all read these
tables, so adding a dataset source, a model, an optimizer, a schedule, a compression, an attribution
method or a sweep strategy is its
code plus one line here (docs/extending.md). This module imports nothing heavy: the DAG files read
it while Airflow parses them. `load` imports an entry's code only when it is used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class Choice:
    name: str  # the value in params.yaml, the forms and the CLI
    code: str  # "module:attribute", imported by `load`
    help: str  # one line for the docs and the forms


def _table(*entries: Choice) -> dict[str, Choice]:
    return {entry.name: entry for entry in entries}


DATASETS = _table(
    Choice("digits", "pipeline.data.sources.digits:SOURCE", "scikit-learn's 8x8 digits, offline"),
    Choice("mnist", "pipeline.data.sources.idx:MNIST", "MNIST from its IDX files"),
    Choice("fashion_mnist", "pipeline.data.sources.idx:FASHION_MNIST", "Fashion-MNIST, IDX files"),
    Choice("cifar10", "pipeline.data.sources.cifar10:SOURCE", "CIFAR-10 python batches"),
    Choice("imagefolder", "pipeline.data.sources.imagefolder:SOURCE", "a folder per class"),
)
MODELS = _table(
    Choice("mlp", "pipeline.training.models:mlp", "the classic tutorial's one hidden layer"),
    Choice("cnn", "pipeline.training.models:small_cnn", "three conv blocks with batch norm"),
    Choice(
        "lenet",
        "pipeline.training.models:lenet",
        "LeNet-5: two 5x5 conv + pool blocks; fast on CPU",
    ),
    Choice("resnet18", "pipeline.training.models:resnet18", "torchvision's ResNet-18"),
)
OPTIMIZERS = _table(
    Choice("sgd", "pipeline.training.optim:sgd", "SGD with momentum (nesterov optional)"),
    Choice("adam", "pipeline.training.optim:adam", "Adam"),
    Choice("adamw", "pipeline.training.optim:adamw", "Adam with decoupled weight decay"),
    Choice("rmsprop", "pipeline.training.optim:rmsprop", "RMSprop with momentum"),
)
SCHEDULES = _table(
    Choice("constant", "pipeline.training.schedules:constant", "the base lr throughout"),
    Choice("exponential", "pipeline.training.schedules:exponential", "x gamma every epoch"),
    Choice("step", "pipeline.training.schedules:step", "x gamma every step_size epochs"),
    Choice("multistep", "pipeline.training.schedules:multistep", "x gamma at each milestone"),
    Choice("cosine", "pipeline.training.schedules:cosine", "cosine decay to min_lr_ratio"),
    Choice("onecycle", "pipeline.training.schedules:onecycle", "rise then fall (1cycle)"),
)
COMPRESSIONS = _table(
    Choice("distill", "pipeline.stages.compress:distill", "a smaller student learns the outputs"),
    Choice("prune", "pipeline.stages.compress:prune", "remove channels, then fine-tune"),
    Choice("quantize", "pipeline.stages.compress:quantize", "int8 ONNX for CPU serving"),
)
ATTRIBUTIONS = _table(
    Choice(
        "integrated_gradients",
        "pipeline.training.attribution:integrated_gradients",
        "gradients along the path from a black image (needs gradients)",
    ),
    Choice("saliency", "pipeline.training.attribution:saliency", "|gradient| at the input"),
    Choice(
        "occlusion", "pipeline.training.attribution:occlusion", "the drop when a patch is hidden"
    ),
    Choice("kernel_shap", "pipeline.training.attribution:kernel_shap", "Shapley values of patches"),
    Choice("lime", "pipeline.training.attribution:lime", "a local linear model of patches"),
)
SWEEP_STRATEGIES = _table(
    Choice("grid", "pipeline.stages.sweep.grid", "every optimizer x schedule x lr"),
    Choice("optuna", "pipeline.stages.sweep.search", "a seeded TPE study with pruning"),
)


# The params.yaml key each table's names are the values of.
KEYS = {
    "base.dataset": DATASETS,
    "train.model.name": MODELS,
    "train.optimizer.name": OPTIMIZERS,
    "train.schedule.name": SCHEDULES,
    "sweep.strategy": SWEEP_STRATEGIES,
    "compress.methods": COMPRESSIONS,
    "explain.methods": ATTRIBUTIONS,
}


def names(table: dict[str, Choice]) -> tuple[str, ...]:
    return tuple(table)


@cache
def _resolve(code: str):
    module, _, attribute = code.partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attribute) if attribute else loaded


def load(table: dict[str, Choice], name: str):
    """The code behind `name` in `table` (a function, an object or a module).

    Raises ValueError naming the allowed values when `name` is not in the table (the config
    refuses such names first; this guards callers that skip it)."""
    if name not in table:
        raise ValueError(f"unknown choice {name!r}; allowed: {', '.join(table)}")
    return _resolve(table[name].code)
