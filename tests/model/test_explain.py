"""Explanations that are right, not only drawn: on images whose class is decided by a small corner
patch alone (noise everywhere else), a trained model's attributions must sit in that patch;
and the sample `pipeline explain` draws is seeded, covers every class and keeps its budget."""

import numpy as np
import pytest

from pipeline import choices
from pipeline.config import ExplainConfig, config_from_dict
from pipeline.data.store import Split
from pipeline.stages.explain import select, usable
from pipeline.training import attribution, runtime
from pipeline.training.engine import fit
from pipeline.training.inference import predict

SIDE, PATCH = 28, 8  # the deciding 8x8 corner is 8.2 % of the pixels
REGION = np.zeros((SIDE, SIDE), bool)
REGION[:PATCH, :PATCH] = True
ELSEWHERE = np.zeros((SIDE, SIDE), bool)
ELSEWHERE[-PATCH:, -PATCH:] = True  # the opposite corner, as large: a control


def corner_images(n: int, seed: int) -> Split:
    """Four classes: which 4x4 quarter of the black top-left 8x8 patch is white. Every other
    pixel is uniform noise 0..127, drawn anew per image."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    images = rng.integers(0, 128, (n, 1, SIDE, SIDE)).astype(np.uint8)
    images[:, :, :PATCH, :PATCH] = 0
    for i, label in enumerate(labels):
        r, c = divmod(int(label), 2)
        images[i, 0, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] = 255
    return Split(images, labels.astype(np.int64))


@pytest.fixture(scope="module")
def corner_model():
    """LeNet trained to 100 % on the corner task. Label smoothing keeps the loss from reaching
    zero, so training goes on pushing the weights on the noise toward zero: without it the
    model keeps its random initial weights on the noise (the noise then does move its logits,
    and a truthful attribution says so)."""
    cfg = config_from_dict(
        {},
        {
            "train.model.name": "lenet",
            "train.epochs": 20,
            "train.val_fraction": 0.0,
            "train.label_smoothing": 0.2,
            "train.schedule.warmup_epochs": 0,
        },
    ).train
    model = fit(cfg, corner_images(4000, 0), list("abcd"), seed=0).model
    test = corner_images(16, 1)
    assert (predict(model, test.images) == test.labels).all()
    return model, test


@pytest.mark.parametrize("name", ["integrated_gradients", "occlusion", "kernel_shap", "lime"])
def test_attributions_put_their_mass_in_the_patch_that_decides_the_class(corner_model, name):
    model, test = corner_model
    method = choices.load(choices.ATTRIBUTIONS, name)
    maps = attribution.attribute(model, method, test.images, test.labels, ExplainConfig())
    assert maps.shape == (16, SIDE, SIDE)
    inside = attribution.mass_in(maps, REGION)
    assert inside.mean() >= 0.7, f"{name}: {inside.mean():.3f} of |attribution| in the patch"
    assert inside.min() >= 0.5
    assert attribution.mass_in(maps, ELSEWHERE).mean() < 0.05  # the check is not vacuous


@pytest.mark.parametrize("name", ["kernel_shap", "lime"])
def test_black_superpixels_get_no_attribution(corner_model, name):
    """Removing a black superpixel (the baseline already) changes nothing: its Shapley value is
    exactly 0, and the fit must not spread sampling noise onto it."""
    model, test = corner_model
    images = test.images.copy()
    images[:, :, 16:, :] = 0  # the bottom 12 rows black (3 rows of 4x4 cells), and 3/4 of the patch
    method = choices.load(choices.ATTRIBUTIONS, name)
    maps = attribution.attribute(model, method, images, test.labels, ExplainConfig())
    assert (maps[:, 16:, :] == 0).all()
    patch = maps[:, :PATCH, :PATCH]  # its black quarters are whole 4x4 cells
    assert (patch[images[:, 0, :PATCH, :PATCH] == 0] == 0).all()
    assert attribution.mass_in(maps, REGION).mean() >= 0.7
    black = attribution.attribute(model, method, images[:2] * 0, test.labels[:2], ExplainConfig())
    assert (black == 0).all()


def test_saliency_is_densest_in_the_patch(corner_model):
    """Saliency is the gradient's size, what a small change would do, not what a pixel
    contributed: the many noise pixels share much of it, but per pixel it is far denser in
    the patch."""
    model, test = corner_model
    method = choices.load(choices.ATTRIBUTIONS, "saliency")
    maps = np.abs(attribution.attribute(model, method, test.images, test.labels, ExplainConfig()))
    density = maps[:, REGION].mean(1) / maps[:, ~REGION].mean(1)
    assert density.min() >= 5


def test_an_onnx_model_takes_the_gradient_free_methods_and_they_find_the_patch(
    corner_model, tmp_path
):
    from pipeline.training.models import ModelSpec

    model, test = corner_model
    lenet = {"name": "lenet", "hidden": 128, "dropout": 0.0}
    spec = ModelSpec(lenet, (1, SIDE, SIDE), tuple("abcd"), 0.0, 1.0)
    onnx = runtime.OnnxModel(runtime.export(model, spec, tmp_path / "m.onnx"))
    ig = choices.load(choices.ATTRIBUTIONS, "integrated_gradients")
    with pytest.raises(ValueError, match="needs gradients"):
        attribution.attribute(onnx, ig, test.images, test.labels, ExplainConfig())
    methods, skipped = usable(["integrated_gradients", "saliency", "lime"], onnx)
    assert methods == ["lime"] and set(skipped) == {"integrated_gradients", "saliency"}
    assert usable(["saliency"], onnx)[0] == ["occlusion"]  # never nothing
    occlusion = choices.load(choices.ATTRIBUTIONS, "occlusion")
    maps = attribution.attribute(onnx, occlusion, test.images, test.labels, ExplainConfig())
    assert attribution.mass_in(maps, REGION).mean() >= 0.7


def test_the_sample_is_seeded_covers_each_class_and_keeps_the_budget():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 30)
    probs = rng.dirichlet(np.ones(10), len(labels)).astype(np.float32)
    e = ExplainConfig(per_class=3, mistakes=4, max_images=20)
    a, b = select(labels, probs, e, seed=1), select(labels, probs, e, seed=1)
    assert np.array_equal(a.index, b.index)
    assert not np.array_equal(a.index, select(labels, probs, e, seed=2).index)
    assert len(a.index) == 20 and a.kind.count("mistake") == 4
    chosen = labels[a.index[np.array(a.kind) == "class"]]
    assert set(chosen) == set(range(10))  # 16 class images: every class once before any twice
    mistakes = a.index[np.array(a.kind) == "mistake"]
    assert (probs[mistakes].argmax(1) != labels[mistakes]).all()
    assert len(set(a.index)) == len(a.index)  # each image once
    wrong = np.flatnonzero(probs.argmax(1) != labels)
    left = wrong[~np.isin(wrong, a.index[np.array(a.kind) == "class"])]
    top = left[np.argsort(-probs.max(1)[left], kind="stable")][:4]
    assert list(mistakes) == list(top)  # the most confident of those not sampled already
    small = select(labels, probs, ExplainConfig(mistakes=40, max_images=6), seed=1)
    assert len(small.index) == 6 and small.kind.count("mistake") == 3  # at most half
