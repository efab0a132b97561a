"""A model card per registered version: what it is, what data made it, how well it does per
class, what it is for and where it will fail. Markdown, logged next to the model. And the
shorter texts the MLflow UI shows: the registered model's description (aliases, their history
as a table) and each version's."""

from __future__ import annotations

from pipeline.data.contract import some_names
from pipeline.training.scoring import class_keys

EXPLAINED = "explain/summary.json"  # `pipeline explain`'s summary on the run


def render(
    name: str,
    version: int,
    lineage: dict,
    config: dict,
    metrics: dict,
    spec,
    tags: dict,
    explained: dict | None = None,
) -> str:
    """The card of version `version`: `lineage` (lineage.json), `config` (config.json),
    `metrics` and `tags` of its run, `spec` of its weights, `explained` its explanation summary
    (`pipeline explain`; None: not explained)."""
    data, train = lineage["data"], config["train"]
    classes = list(spec.classes)
    c, h, w = spec.shape
    rows = [
        f"| {_cell(name)} | {metrics.get(f'test_precision.{k}', 0):.4f} | "
        f"{metrics.get(f'test_recall.{k}', 0):.4f} |"
        for k, name in class_keys(classes).items()
    ]
    lines = [
        f"# Model card: {name} v{version}",
        "",
        "## Model",
        f"- architecture: `{train['model']['name']}` ({_describe_model(train['model'])}), "
        f"input {c} x {h} x {w} raw pixels 0-255 (normalization is inside the model)",
        f"- output: logits over {len(classes)} classes: {some_names(classes)}",
        f"- inputs: {spec.input_contract().describe()} (`contract.json` beside the weights)",
        f"- training: {train['optimizer']['name']} lr {train['optimizer']['lr']}, "
        f"{train['schedule']['name']} schedule, {train['epochs']} epochs, batch "
        f"{train['batch_size']}, seed {config['base']['seed']}, params hash "
        f"`{lineage['params']['hash']}`",
        f"- code: git `{lineage['git']['commit']}`"
        + (" (uncommitted changes)" if lineage["git"]["dirty"] else ""),
        *_privacy(tags, spec),
        "",
        *_compression(tags, metrics),
        "## Data",
        f"- dataset `{data['dataset']}`, DVC version `{data['md5']}`: "
        f"{data.get('train_rows')} training images ({_held_out(train, data.get('train_rows'))}), "
        f"{data.get('test_rows')} test images",
        f"- validation: {lineage['validation']['passed']}/{lineage['validation']['evaluated']} "
        "expectations met (Great Expectations; Data Docs in the run's `data_docs/`)",
        "",
        "## Results on the test split",
        f"- accuracy {metrics['test_accuracy']:.4f}, macro-F1 {metrics['test_macro_f1']:.4f}",
        *_calibration(metrics, tags),
        "",
        "| class | precision | recall |",
        "|---|---|---|",
        *rows,
        "",
        *_explanations(explained),
        "## Intended use",
        f"Classifying {h} x {w} {'grayscale' if c == 1 else 'color'} images into the classes "
        f"above, drawn from the same distribution as `{data['dataset']}`.",
        "",
        "## Limitations",
        f"- It always answers with one of the {len(classes)} known classes; an image of "
        "anything else still gets a (possibly confident) class.",
        "- Inputs unlike the training data (other resolution before resizing, inverted colors, "
        "other devices or writing styles) degrade accuracy; the pipeline's drift check "
        "compares only mean pixel value and contrast.",
        "- Test accuracy is measured on one held-out split of the same source, not on "
        "production traffic.",
        f"- Reproduce it with `{compress_command(tags) or f'pipeline reproduce {name}/{version}'}`"
        + (" on its teacher's data version" if tags.get("compress.method") else "")
        + ".",
    ]
    return "\n".join(lines) + "\n"


HISTORY_ROWS = 30  # the description shows the newest moves; `pipeline history` has them all


def model_description(name: str, moves: list[dict]) -> str:
    """The registered model's description (markdown): what it is, what each alias means, and
    the alias history as a table, newest first. `moves`: `promotion.history`, oldest first."""

    def cell(text) -> str:
        return "-" if text is None else str(text).replace("|", "\\|").replace("\n", " ")

    def row(m: dict) -> str:
        was = "-" if m["previous"] is None else f"v{m['previous']}"
        return (
            f"| {_when(m['at'])} | `{m['alias']}` | v{m['version']} | {was} | {cell(m['by'])} "
            f"| {cell(m['reason'])} |"
        )

    lines = [
        f"Image classifier trained and registered by image-pipeline; serve "
        f"`models:/{name}@champion`.",
        "",
        "- `champion`: the serving model. It moves only through the promotion policy, "
        "`pipeline promote` and `pipeline rollback`.",
        "- `challenger`: the newest candidate (a DVC experiment's model stays one).",
        f"- `previous-champion`: what `pipeline rollback {name}` brings back.",
        "",
        "Each version's description gives its data version, scores, promotion decision and "
        "input contract; its run holds the model card and the decision report.",
        "",
        f"### Alias history, newest first (`pipeline history {name}` has every move)",
        "",
        "| at (UTC) | alias | version | was | by | reason |",
        "|---|---|---|---|---|---|",
        *(row(m) for m in reversed(moves[-HISTORY_ROWS:])),
    ]
    return "\n".join(lines) + "\n"


def version_description(name: str, version, run, report: dict, inputs: str) -> str:
    """A version's description (markdown): the model and its data, its scores, the latest
    promotion decision (`report`, `pipeline.stages.register`'s) and what it takes (`inputs`)."""
    tags, params, metrics, nan = run.data.tags, run.data.params, run.data.metrics, float("nan")
    decision = report["decision"]
    verdict = "promoted to champion" if decision["promote"] else "not promoted"
    commit = tags.get("git.commit", "unknown")[:12]
    experiment = tags.get("dvc.experiment")
    lines = [
        f"**{name} v{version}**: `{params.get('train.model.name', '?')}` trained on "
        f"`{tags.get('data.dataset', '?')}`, data version `{tags.get('data.md5', '?')}`, "
        f"code `{commit}`"
        + (" (uncommitted changes)" if tags.get("git.dirty") == "true" else "")
        + f", run `{run.info.run_id}`.",
        "",
        f"Scores on its test split: test_accuracy **{metrics.get('test_accuracy', nan):.4f}**, "
        f"test_macro_f1 **{metrics.get('test_macro_f1', nan):.4f}**.",
        "",
        f"**Promotion decision** ({_when(report['at'])} UTC, by {report['by']}; the aliases "
        f"above are today's): {verdict}, rule "
        f"`{decision['rule']}`. {decision['reason']}",
    ]
    if experiment:
        lines += ["", f"From DVC experiment `{experiment}` (baseline "
                  f"`{tags.get('dvc.baseline_rev', '?')[:12]}`)."]  # fmt: skip
    lines += [
        "",
        f"**Inputs**: {inputs}",
        "",
        "On the run: the model card (`model_card.md`), the decision (`promotion/decision.md`).",
    ]
    return "\n".join(lines) + "\n"


def _calibration(metrics: dict, tags: dict) -> list[str]:
    """The line on calibrated probabilities (evaluate's temperature scaling), if evaluated so."""
    if "val_temperature" not in metrics:
        return []
    t, before = metrics["val_temperature"], metrics["test_prob_ece"]
    where = tags.get("calibration.fitted_on", "")
    if where.startswith("not fitted"):
        return [
            f"- probabilities: the plain softmax, {where}; expected calibration error {before:.4f}"
        ]
    return [
        f"- probabilities: calibrated by temperature scaling, softmax(logits / {t:.4f}), the "
        f"temperature fitted on {where or 'the validation split'}, held out from training; "
        f"expected calibration error {before:.4f} before, "
        f"{metrics['test_prob_ece_calibrated']:.4f} after (15 bins; reliability diagram "
        "`plots/reliability.png`)"
    ]


def _when(at: str) -> str:
    """An ISO time as the tables show it: 2026-12-01T03:53:02+00:00 -> 2026-12-01 03:53."""
    return at[:16].replace("T", " ")


def _held_out(train: dict, rows) -> str:
    """What the run did with the training split, from its config (`split_validation`)."""
    share = train.get("val_fraction", 0)
    if not share:
        return "all trained on; no validation split (train.val_fraction 0)"
    held = f"{max(1, int(rows * share))} images" if isinstance(rows, int) else "a share"
    return f"{held} ({share:.0%}) held out for validation, not trained on"


def _describe_model(model: dict) -> str:
    if model["name"] == "resnet18":
        return "torchvision ResNet-18, random init"
    return f"hidden {model['hidden']}, dropout {model['dropout']}"


def _compression(tags: dict, metrics: dict) -> list[str]:
    """What a compressed model was made from and what it costs beside its teacher."""
    method = tags.get("compress.method")
    if not method:
        return []
    teacher = tags.get("compress.teacher_model") or "an unregistered run"
    settings = ", ".join(
        f"{k.rpartition('.')[2]} {v}" for k, v in sorted(tags.items())
        if k.startswith(f"compress.{method}.")
    )  # fmt: skip
    lines = [
        "## Compression",
        f"- made by `{method}` ({settings}) from {teacher}, run "
        f"`{tags.get('compress.teacher_run_id')}` (`pipeline compress`)",
    ]
    rows = [
        ("parameters", "params", ",.0f"),
        ("file bytes", "model_bytes", ",.0f"),
        ("MACs per image", "macs", ",.0f"),
        ("latency p50, batch 1 (ms)", "latency_p50_ms", ".3f"),
        ("throughput, batch 256 (images/s)", "throughput", ",.0f"),
        ("test accuracy", "test_accuracy", ".4f"),
    ]
    if "params" in metrics:
        lines += ["", "| | this model | teacher |", "|---|---|---|"]
        for label, key, form in rows:
            mine, theirs = metrics.get(key), metrics.get(f"teacher_{key}")
            cells = ["-" if v is None else format(v, form) for v in (mine, theirs)]
            lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
        lines.append("")
        lines.append("Speed measured on CPU in one process, one model after the other.")
    return [*lines, ""]


def _privacy(tags: dict, spec) -> list[str]:
    """DP-SGD's guarantee (the run's privacy.* tags), or why a model made from a private one
    has none."""
    if "privacy.epsilon" in tags:
        norm = "; its batch norms became group norms" if spec.norm == "group" else ""
        return [
            f"- privacy: trained with DP-SGD (Opacus), epsilon {float(tags['privacy.epsilon']):.3g}"
            f" at delta {float(tags['privacy.delta']):.3g}: whether any one training image was "
            f"in the data changes what the model does by a factor of at most "
            f"e^{float(tags['privacy.epsilon']):.3g}, except with probability delta{norm}"
        ]
    return [f"- privacy: {tags['privacy.note']}"] if "privacy.note" in tags else []


def _explanations(summary: dict | None) -> list[str]:
    """What `pipeline explain` looked at and where its pictures are; a pointer when not run."""
    if summary is None:
        return [
            "## Explanations",
            "- none yet: `pipeline explain --model NAME/VERSION` adds them to this card",
            "",
        ]
    ms = summary["ms_per_image"]
    done = ", ".join(f"`{m}` ({ms[m]:.1f} ms per image)" for m in summary["methods"])
    lines = [
        "## Explanations",
        f"- {summary['images']} test images ({summary['per_class']} per class, seeded, and "
        f"the {summary['mistakes']} most confident mistakes), each explained toward "
        f"{summary['target']} against {summary['baseline']}: {done}",
        "- pictures in the run's `explain/`: each image beside its heat map "
        "(`<method>_samples.png`, `<method>_mistakes.png`) and each class's mean map "
        "(`class_means.png`); `pipeline explain` makes them again",
    ]
    lines += [f"- `{m}` not run: {why}" for m, why in summary["skipped"].items()]
    return [*lines, ""]


def compress_command(tags: dict) -> str:
    """The `pipeline compress` call that made a compressed model again from its teacher, with
    the method's settings as they were (its run's `compress.*` tags); '' for a trained one."""
    method = tags.get("compress.method")
    if not method:
        return ""
    teacher = tags.get("compress.teacher_model") or "NAME/VERSION"
    sets = [f"compress.methods=[{method}]", f"compress.teacher={teacher}"]
    sets += [
        f"{key}={value}" for key, value in sorted(tags.items())
        if key.startswith(f"compress.{method}.")
    ]  # fmt: skip
    return "pipeline compress " + " ".join(f"--set '{s}'" for s in sets)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a class named "a|b" must not split the table row
