"""Engine features: resume, checkpoints, presets, loaders, augmentation, early stop, clipping."""

import os
import pickle

import numpy as np
import pytest
import torch

from pipeline.config import config_from_dict, load_config
from pipeline.data.store import Split
from pipeline.training import checkpoint
from pipeline.training.augment import crop_flip
from pipeline.training.engine import fit
from pipeline.training.models import rebuild
from pipeline.training.schedules import lr_factor
from tests.conftest import REPO

TIMING = {"epoch_seconds", "samples_per_second"}


def _cfg(**overrides):
    return config_from_dict({}, {"train.val_fraction": 0.1, **overrides}).train


class Killed(Exception):
    """Stands in for SIGKILL right after an epoch's checkpoint hit the disk."""


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_resumed_run_equals_an_uninterrupted_one(digits, tmp_path, model):
    cfg = _cfg(
        **{
            "train.model.name": model,
            "train.epochs": 4,
            "train.model.dropout": 0.2,  # the global torch RNG must be restored too
            "train.augment.crop_padding": 1,  # and the data-order/augmentation generator
        }
    )
    whole = fit(cfg, digits.train, digits.classes, seed=5)

    ckpt = tmp_path / "ckpt.pt"

    def kill_after_epoch_2(row):
        if row["epoch"] == 2:
            raise Killed

    with pytest.raises(Killed):
        extra = lambda: {"run": "r1"}  # noqa: E731
        fit(cfg, digits.train, digits.classes, 5, kill_after_epoch_2, ckpt, None, extra)
    state = checkpoint.load(ckpt)
    assert (state["epoch"], state["run"]) == (2, "r1")
    resumed = fit(cfg, digits.train, digits.classes, 5, resume=state)

    _same_weights(whole.model, resumed.model)
    strip = [
        [{k: v for k, v in h.items() if k not in TIMING} for h in r.history]
        for r in (whole, resumed)
    ]
    assert strip[0] == strip[1] and [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]


def test_checkpoint_holds_everything_needed_and_loads_without_pickle(digits, tmp_path):
    cfg = _cfg(**{"train.model.name": "cnn", "train.epochs": 1})
    fit(cfg, digits.train, digits.classes, 0, checkpoint_path=tmp_path / "c.pt")
    state = checkpoint.load(tmp_path / "c.pt")
    assert {"model", "optimizer", "scaler", "rng", "epoch", "step", "best_val_loss"} <= set(state)
    assert state["step"] == -(-int(len(digits.train.labels) * 0.9 + 1) // cfg.batch_size)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp files left behind


def test_malicious_checkpoint_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps({"model": Exploit()}, protocol=2))
    with pytest.raises(checkpoint.CheckpointError, match="refusing checkpoint .*evil.pt"):
        checkpoint.load(bad)
    assert not marker.exists()


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save({"epoch": 1, "w": torch.ones(3)}, path)

    def disk_full(obj, fh):
        fh.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_resume_refuses_a_checkpoint_of_another_model(digits, tmp_path):
    fit(
        _cfg(**{"train.model.name": "mlp", "train.epochs": 1}),
        digits.train,
        digits.classes,
        0,
        checkpoint_path=tmp_path / "c.pt",
    )
    state = checkpoint.load(tmp_path / "c.pt")
    with pytest.raises(checkpoint.CheckpointError, match="another model"):
        fit(
            _cfg(**{"train.model.name": "cnn", "train.epochs": 2}),
            digits.train,
            digits.classes,
            0,
            resume=state,
        )


SHAPES = {
    "digits": (1, 8, 8),
    "mnist": (1, 28, 28),
    "fashion_mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
}


@pytest.mark.parametrize("preset", sorted(load_config(REPO / "params.yaml").presets))
def test_every_preset_trains_one_epoch(preset):
    cfg = load_config(REPO / "params.yaml", {"base.preset": preset, "train.epochs": 1})
    rng = np.random.default_rng(0)
    n = 64  # enough for a batch and a validation split; resnet18 costs ~70 ms per image here
    images = rng.integers(0, 256, (n, *SHAPES[cfg.base.dataset]), dtype=np.uint8)
    labels = np.arange(n) % 10
    result = fit(cfg.train, Split(images, labels), [str(i) for i in range(10)], cfg.base.seed)
    assert len(result.history) == 1 and np.isfinite(result.history[0]["train_loss"])
    out = result.model(torch.from_numpy(images[:2]).float())
    assert out.shape == (2, 10)


def test_seed_mlp_mnist_is_the_classic_tutorial_recipe():
    cfg = load_config(REPO / "params.yaml", {"base.preset": "seed-mlp-mnist"})
    t = cfg.train
    assert (cfg.base.dataset, t.model.name, t.model.hidden) == ("mnist", "mlp", 128)
    assert (t.optimizer.name, t.optimizer.lr, t.optimizer.momentum) == ("sgd", 0.01, 0.9)
    assert (t.schedule.name, t.schedule.warmup_epochs, t.epochs, t.batch_size) == (
        "constant",
        0,
        10,
        64,
    )
    assert t.label_smoothing == 0 and t.optimizer.weight_decay == 0


def test_set_overrides_win_over_the_preset():
    cfg = load_config(REPO / "params.yaml", {"base.preset": "seed-mlp-mnist", "train.epochs": 2})
    assert cfg.train.epochs == 2 and cfg.train.optimizer.name == "sgd"


def test_streaming_loader_learns_like_the_resident_one(digits, tmp_path):
    np.save(tmp_path / "x.npy", digits.train.images)
    mapped = Split(np.load(tmp_path / "x.npy", mmap_mode="r"), digits.train.labels)
    cfg = _cfg(**{"train.model.name": "mlp", "train.epochs": 3, "train.loader": "stream"})
    streamed = fit(cfg, mapped, digits.classes, seed=1)
    resident = fit(cfg.model_copy(update={"loader": "resident"}), digits.train, digits.classes, 1)
    assert streamed.history[-1]["val_accuracy"] > 0.85
    # same permutation and batches; only summation order inside a batch may differ
    assert streamed.history[-1]["val_loss"] == pytest.approx(
        resident.history[-1]["val_loss"], rel=1e-3
    )


def test_crop_flip_shifts_within_the_padding_and_mirrors():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6) + 1
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        out = crop_flip(x, gen, padding=2, flip=True, fill=0.0)
        assert out.shape == x.shape
        for i in range(2):
            padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
            windows = [padded[:, r : r + 6, c : c + 6] for r in range(5) for c in range(5)]
            windows += [w.flip(2) for w in windows]
            assert any(torch.equal(out[i], w) for w in windows)
    assert torch.equal(crop_flip(x, gen, padding=0, flip=False, fill=0.0), x)


def test_early_stopping_stops_when_val_loss_stops_improving(digits):
    cfg = _cfg(
        **{
            "train.model.name": "mlp",
            "train.epochs": 6,
            "train.early_stopping.patience": 1,
            "train.early_stopping.min_delta": 100.0,
        }
    )
    result = fit(cfg, digits.train, digits.classes, seed=0)
    assert result.stopped_early and len(result.history) == 2


def test_gradient_clipping_bounds_every_update(digits):
    cfg = _cfg(
        **{
            "train.model.name": "mlp",
            "train.epochs": 1,
            "train.optimizer.name": "sgd",
            "train.optimizer.lr": 1.0,
            "train.optimizer.momentum": 0.0,
            "train.optimizer.weight_decay": 0.0,
            "train.schedule.name": "constant",
            "train.schedule.warmup_epochs": 0,
            "train.grad_clip": 1e-4,
        }
    )
    result = fit(cfg, digits.train, digits.classes, seed=0)
    torch.manual_seed(0)
    start = rebuild(result.spec)  # fit seeds torch with the same seed before building
    steps = -(-int(len(digits.train.labels) * 0.9 + 1) // cfg.batch_size)
    moved = torch.cat(
        [
            (a - b).flatten()
            for a, b in zip(result.model.parameters(), start.parameters(), strict=True)
        ]
    )
    assert 0 < moved.norm() <= steps * 1.0 * 1e-4 * 1.001


def test_lr_follows_the_schedule_function_each_epoch(digits):
    cfg = _cfg(
        **{
            "train.model.name": "mlp",
            "train.epochs": 4,
            "train.schedule.name": "step",
            "train.schedule.step_size": 1,
            "train.schedule.gamma": 0.5,
            "train.schedule.warmup_epochs": 0,
        }
    )
    result = fit(cfg, digits.train, digits.classes, seed=0)
    steps = -(-(len(digits.train.labels) - int(len(digits.train.labels) * 0.1)) // 64)
    expected = [cfg.optimizer.lr * lr_factor(e * steps, steps, 4, cfg.schedule) for e in range(4)]
    assert [h["lr"] for h in result.history] == pytest.approx(expected)
    assert [h["lr"] for h in result.history] == pytest.approx([0.003, 0.0015, 0.00075, 0.000375])


def test_deterministic_flag_is_applied_and_then_restored(digits):
    cfg = _cfg(**{"train.model.name": "cnn", "train.epochs": 1, "train.deterministic": True})
    a, b = (fit(cfg, digits.train, digits.classes, seed=2) for _ in range(2))
    _same_weights(a.model, b.model)
    assert not torch.are_deterministic_algorithms_enabled()


def test_early_stopping_without_a_validation_split_is_a_config_error():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="early_stopping.patience > 0 needs train.val_fraction"):
        config_from_dict({}, {"train.early_stopping.patience": 2, "train.val_fraction": 0})


def test_val_loss_is_the_plain_cross_entropy_whatever_the_label_smoothing(digits):
    """Smoothing raises the loss floor: a smoothed val_loss would rank trials that differ only
    in label_smoothing by their smoothing, not by how well they predict."""
    import torch.nn.functional as F

    from pipeline.training.batches import split_validation

    cfg = _cfg(**{"train.epochs": 1, "train.model.name": "mlp", "train.label_smoothing": 0.2})
    result = fit(cfg, digits.train, digits.classes, seed=0)
    _, val = split_validation(digits.train, cfg.val_fraction, 0)
    images, labels = next(val.chunks(len(val)))
    with torch.no_grad():
        logits = result.model(torch.from_numpy(images.astype(np.float32)))
    plain = float(F.cross_entropy(logits, torch.from_numpy(labels)))
    smoothed = float(F.cross_entropy(logits, torch.from_numpy(labels), label_smoothing=0.2))
    assert result.history[-1]["val_loss"] == pytest.approx(plain, rel=1e-5)
    assert abs(plain - smoothed) > 1e-3  # the two differ, so the check above can fail


def test_batch_norm_trains_on_a_last_batch_of_one_and_names_a_batch_size_it_cannot_take(
    digits,
):
    from pipeline.config import ConfigError
    from pipeline.data.store import Split

    # 65 images, batch 32: the last batch of one joins the one before (batch norm needs two).
    few = Split(digits.train.images[:65], digits.train.labels[:65])
    cfg = _cfg(**{"train.val_fraction": 0, "train.epochs": 1, "train.batch_size": 32})
    result = fit(cfg, few, digits.classes, seed=0)
    assert result.last_batch == "merged" and result.steps_per_epoch == 2
    # cnn's batch norm averages over height x width too: one image a batch trains ...
    eight = Split(digits.train.images[:8], digits.train.labels[:8])
    ones = {"train.batch_size": 1, "train.epochs": 1, "train.val_fraction": 0}
    assert fit(_cfg(**ones), eight, digits.classes, seed=0).steps_per_epoch == 8
    # ... resnet18's last block is 1x1: a one-line config error, not torch's ValueError.
    with pytest.raises(ConfigError, match="train.batch_size=1: resnet18's batch norm cannot"):
        fit(_cfg(**ones, **{"train.model.name": "resnet18"}), eight, digits.classes, seed=0)
