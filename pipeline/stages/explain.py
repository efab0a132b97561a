"""explain: what a model looks at. Attributions (`explain.methods`, Captum) for a seeded sample of
test images per class plus the most confident mistakes, each toward the class the model
predicted; logged to the model's run as image grids, per-class mean maps and a summary, which
the model card shows. Works on every kind of model the registry holds: an ONNX (int8) model
has no gradients, so it gets the gradient-free methods only, and the summary says so."""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import choices
from pipeline.config import Config, ConfigError, ExplainConfig
from pipeline.context import RunContext
from pipeline.data import check_data, read_dataset
from pipeline.registry.model_card import EXPLAINED
from pipeline.settings import Settings

FALLBACK = "occlusion"
MEAN_CLASSES = 20  # columns of class_means.png: a figure people can still read
KINDS = (
    ("class", "samples", "test images per class"),
    ("mistake", "mistakes", "worst mistakes"),
)  # what a model without gradients gets when no asked method fits it


def run(cfg: Config, settings: Settings, inputs: dict, ctx: RunContext) -> dict:
    """The graph's explain stage: the train stage's (evaluated) run, or a registered model
    (`--model`)."""
    ref = inputs["train"]
    return explain_stage(cfg, settings, run_id=ref.get("run_id"), model=ref.get("model"))


@dataclass(frozen=True)
class Sample:
    """The test images explained: `index` into the test split, `kind` "class" or "mistake"."""

    index: np.ndarray  # (n,) int
    kind: list[str]
    predicted: np.ndarray  # (n,) class index
    confidence: np.ndarray  # (n,) softmax probability of the predicted class


def explain_stage(
    cfg: Config, settings: Settings, run_id: str | None = None, model: str | None = None
) -> dict:
    """Attributions for the model of `run_id` or of registered `model` (NAME/VERSION, NAME@ALIAS)
    on the test split of data/ (checked against data.dvc), logged to its run under `explain/`;
    a registered version's model card is rewritten with them.

    Returns {"run_id", "methods" (run), "skipped" ({method: why}), "images",
    "ms_per_image" ({method: CPU milliseconds per image})}; methods [] when explain.methods is
    []. Raises DataError when data/ differs from data.dvc, LookupError for an unknown model,
    a deleted run or a model built for other inputs or classes than data/ holds."""
    e = cfg.explain
    if not e.methods:
        print("explain: explain.methods is [], nothing to do", file=sys.stderr)
        return {"run_id": run_id, "methods": [], "skipped": {}, "images": 0, "ms_per_image": {}}
    data = check_data(cfg.base.dataset, settings.root, settings.data_dir, wait=False)
    import mlflow

    from pipeline.registry import versions
    from pipeline.tracking import store, weights
    from pipeline.training import inference

    data["wait"]()
    store.configure(settings, cfg.tracking.experiment)
    client = mlflow.MlflowClient()
    if model:
        run_id = versions.resolve(client, model).run_id
    store.active_run(client, run_id)
    ds = read_dataset(settings.data_dir, mmap=True)
    net, spec = weights.load_weights(run_id)
    spec.require_fits(ds, f"the model of run {run_id}")
    methods, skipped = usable(e.methods, net)
    side = min(spec.shape[1:])
    if e.patch is not None and e.patch >= side:
        raise ConfigError(
            f"explain.patch {e.patch} is not smaller than the images' side ({side} px): the "
            f"occlusion window and superpixels must fit; set it below {side}, or null for an "
            "eighth of the side"
        )
    probs = inference.probabilities(net, ds.test.images)
    sample = select(np.asarray(ds.test.labels), probs, e, cfg.base.seed)
    if not len(sample.index):
        raise ConfigError(
            "explain.per_class and explain.mistakes leave no test image to explain (the model "
            "makes no mistakes, or both are 0); raise explain.per_class, or set "
            "explain.methods=[] to turn explain off"
        )
    images = np.asarray(ds.test.images[sample.index])
    maps, ms = _attribute(net, methods, images, sample, e)
    summary = {
        "methods": methods,
        "skipped": skipped,
        "images": len(sample.index),
        "per_class": e.per_class,
        "mistakes": sample.kind.count("mistake"),
        "target": "the predicted class",
        "baseline": "a black image (0)",
        "steps": e.steps,
        "samples": e.samples,
        "patch": _patch(e, spec.shape),
        "ms_per_image": ms,
        "seed": cfg.base.seed,
        "data_md5": data["data_md5"],
    }
    _log(client, run_id, ds.classes, images, sample, maps, summary, np.asarray(ds.test.labels))
    _rewrite_cards(client, run_id)
    return {k: summary[k] for k in ("methods", "skipped", "images", "ms_per_image")} | {
        "run_id": run_id
    }


def usable(asked: list[str], model) -> tuple[list[str], dict[str, str]]:
    """The asked methods this model can take, and why the others were not run: a model without
    gradients (ONNX) takes only the gradient-free ones, occlusion when none of those was asked."""
    from pipeline.training import attribution

    if attribution.differentiable(model):
        return list(asked), {}
    why = "needs gradients; an ONNX (int8) model has none, so only gradient-free methods ran"
    free = [m for m in asked if not choices.load(choices.ATTRIBUTIONS, m).gradients]
    skipped = {m: why for m in asked if m not in free}
    return free or [FALLBACK], skipped


def select(labels: np.ndarray, probs: np.ndarray, e: ExplainConfig, seed: int) -> Sample:
    """`e.per_class` seeded test images of each class (taken a round at a time, so a small
    budget still covers every class it can), then the most confident mistakes, within
    `e.max_images` of which mistakes take at most half."""
    predicted = probs.argmax(1)
    confidence = probs[np.arange(len(probs)), predicted]
    wrong = np.flatnonzero(predicted != labels)
    worst = wrong[np.argsort(-confidence[wrong], kind="stable")]
    mistakes = min(e.mistakes, e.max_images // 2, len(worst))
    rng = np.random.default_rng(seed)
    drawn = []
    for k in range(probs.shape[1]):
        members = np.flatnonzero(labels == k)
        drawn.append(np.sort(rng.choice(members, min(e.per_class, len(members)), replace=False)))
    rounds = [d[r] for r in range(e.per_class) for d in drawn if r < len(d)]
    rounds = rounds[: e.max_images - mistakes]
    worst = worst[~np.isin(worst, rounds)][:mistakes]  # each image once
    index = np.array([*rounds, *worst], dtype=np.int64)
    kind = ["class"] * len(rounds) + ["mistake"] * len(worst)
    return Sample(index, kind, predicted[index], confidence[index])


def _attribute(net, methods: list[str], images, sample: Sample, e: ExplainConfig):
    """{method: (n, H, W)} and {method: milliseconds per image}, with a progress line per
    chunk (a slow method on a big model runs for minutes)."""
    from pipeline.training import attribution

    maps, ms = {}, {}
    for name in methods:
        start = time.perf_counter()

        def progress(done: int, name=name, start=start) -> None:
            took = time.perf_counter() - start
            print(f"explain: {name} {done}/{len(images)} images ({took:.1f}s)", file=sys.stderr)

        method = choices.load(choices.ATTRIBUTIONS, name)
        maps[name] = attribution.attribute(
            net, method, images, sample.predicted, e, on_chunk=progress
        )
        ms[name] = round(1000 * (time.perf_counter() - start) / max(1, len(images)), 2)
    return maps, ms


def _patch(e: ExplainConfig, shape) -> int:
    from pipeline.training.attribution import patch_size

    return patch_size(e, *shape[1:])


def _log(client, run_id, classes, images, sample: Sample, maps, summary, labels) -> None:
    """The grids (class samples, mistakes) per method, the per-class means, the summary and
    each method's cost as metrics, under the run's `explain/`."""
    from pipeline.training import plots

    def title(i: int) -> str:
        true, said = classes[labels[sample.index[i]]], classes[sample.predicted[i]]
        return f"true {true[:10]} / said {said[:10]} ({sample.confidence[i]:.2f})"

    kinds = np.array(sample.kind)
    with tempfile.TemporaryDirectory(prefix="explain-") as tmp:
        folder = Path(tmp)
        files = []
        for name, heat in maps.items():
            for kind, label, what in KINDS:
                rows = np.flatnonzero(kinds == kind)
                if len(rows):
                    path = folder / f"{name}_{label}.png"
                    titles = [title(i) for i in rows]
                    heading = f"{name}: {what}, where the model looked for the class it said"
                    files.append(
                        plots.plot_attributions(images[rows], heat[rows], titles, heading, path)
                    )
        if kinds.tolist().count("class"):
            means, names = _class_means(maps, sample, labels, classes)
            files.append(plots.plot_class_means(means, names, folder / "class_means.png"))
        summary["files"] = sorted(f"explain/{p.name}" for p in files)
        _clear(client, run_id)
        for path in files:
            client.log_artifact(run_id, str(path), "explain")
        client.log_dict(run_id, summary, EXPLAINED)
    for name, value in summary["ms_per_image"].items():
        client.log_metric(run_id, f"explain_ms_per_image.{name}", value)


def _clear(client, run_id: str) -> None:
    """Remove an earlier explain's files from the run, so that its `explain/` shows this one's
    only (where the artifact store can delete; the earlier cost metrics stay in MLflow)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(client.get_run(run_id).info.artifact_uri)
    try:
        if client.list_artifacts(run_id, "explain"):
            repo.delete_artifacts("explain")
    except NotImplementedError:  # a store without deletes: summary.json lists the current files
        pass


def _class_means(maps: dict, sample: Sample, labels, classes: list[str]):
    """({method: (K, H, W)}, the K class names): per method, the mean of each sampled class's
    |attribution| maps, each image's map scaled to sum 1 first so that no image outweighs the
    others; the first `MEAN_CLASSES` classes with sampled images."""
    rows = np.array([k == "class" for k in sample.kind])
    truth = labels[sample.index]
    shown = [k for k in range(len(classes)) if (rows & (truth == k)).any()][:MEAN_CLASSES]
    means = {}
    for name, heat in maps.items():
        share = np.abs(heat) / np.maximum(np.abs(heat).sum((1, 2), keepdims=True), 1e-12)
        means[name] = np.stack([share[rows & (truth == k)].mean(0) for k in shown])
    return means, [classes[k] for k in shown]


def _rewrite_cards(client, run_id: str) -> None:
    """Every registered version of the run gets its model card again, explanations included."""
    from pipeline.stages.register import write_card

    for version in client.search_model_versions(f"run_id = '{run_id}'"):
        write_card(client, version.name, int(version.version), run_id)
