"""A model card per registered version: what it is, what data made it, how well it does per
class, what it is for and where it will fail. Markdown, logged next to the model."""

from __future__ import annotations


def render(name: str, version: int, lineage: dict, config: dict, metrics: dict, spec) -> str:
    data, train = lineage["data"], config["train"]
    classes = list(spec.classes)
    c, h, w = spec.shape
    rows = [
        f"| {k} | {metrics.get(f'test_precision.{k}', 0):.4f} | "
        f"{metrics.get(f'test_recall.{k}', 0):.4f} |"
        for k in classes
    ]
    lines = [
        f"# Model card: {name} v{version}",
        "",
        "## Model",
        f"- architecture: `{train['model']['name']}` ({_describe_model(train['model'])}), "
        f"input {c} x {h} x {w} raw pixels 0-255 (normalization is inside the model)",
        f"- output: logits over {len(classes)} classes: {', '.join(classes)}",
        f"- inputs: {spec.input_contract().describe()} (`contract.json` beside the weights)",
        f"- training: {train['optimizer']['name']} lr {train['optimizer']['lr']}, "
        f"{train['schedule']['name']} schedule, {train['epochs']} epochs, batch "
        f"{train['batch_size']}, seed {config['base']['seed']}, params hash "
        f"`{lineage['params']['hash']}`",
        f"- code: git `{lineage['git']['commit']}`"
        + (" (uncommitted changes)" if lineage["git"]["dirty"] else ""),
        "",
        "## Data",
        f"- dataset `{data['dataset']}`, DVC version `{data['md5']}`: "
        f"{data.get('train_rows')} training images ({_held_out(train, data.get('train_rows'))}), "
        f"{data.get('test_rows')} test images",
        f"- validation: {lineage['validation']['passed']}/{lineage['validation']['evaluated']} "
        "expectations met (Great Expectations; Data Docs in the run's `data_docs/`)",
        "",
        "## Results on the test split",
        f"- accuracy {metrics['test_accuracy']:.4f}, macro-F1 {metrics['test_macro_f1']:.4f}",
        "",
        "| class | precision | recall |",
        "|---|---|---|",
        *rows,
        "",
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
        f"- Reproduce it with `pipeline reproduce {name}/{version}`.",
    ]
    return "\n".join(lines) + "\n"


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
