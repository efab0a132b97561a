"""What a run says about itself: progress lines in logs, the model card and the learning curves
written from what the run did."""

import io
import sys

from pipeline.training import progress


def test_progress_lines_reach_logs_that_are_not_terminals(monkeypatch):
    log = io.StringIO()  # not a TTY, as an Airflow task log or a redirected file
    monkeypatch.setattr(sys, "stderr", log)
    clock = iter(range(0, 1000, 4))  # 4 s per step
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    bar = progress.Progress(epochs=2)
    bar.start_epoch(1, samples=1000)
    for step in range(1, 11):
        bar.step(step, 100, loss_sum=0.5 * step, lr=0.01)
    lines = log.getvalue().splitlines()
    assert not bar.live and len(lines) == 3  # every LOG_EVERY_S (10 s), not at the epoch's end
    first = lines[0]
    assert first.startswith("epoch 1/2") and "300/1,000 img" in first and "img/s" in first
    assert "ETA" in first and "(run" in first and "loss 0.5000" in first


def _card(val_fraction):
    from pipeline.config import Config
    from pipeline.registry import model_card
    from pipeline.training.models import ModelSpec

    config = Config().to_dict()
    config["train"]["val_fraction"] = val_fraction
    lineage = {
        "data": {"dataset": "mnist", "md5": "abc.dir", "train_rows": 60000, "test_rows": 10000},
        "params": {"hash": "h"},
        "git": {"commit": "c", "dirty": False},
        "validation": {"passed": 5, "evaluated": 5},
    }
    spec = ModelSpec(config["train"]["model"], (1, 28, 28), tuple("0123456789"), 33.3, 78.6)
    metrics = {"test_accuracy": 0.99, "test_macro_f1": 0.99}
    return model_card.render("m", 1, lineage, config, metrics, spec, {})


def test_the_model_card_says_what_was_held_out_for_validation():
    assert "60000 training images (all trained on; no validation split" in _card(0.0)
    assert "carved" not in _card(0.0)
    assert "6000 images (10%) held out for validation, not trained on" in _card(0.1)


def test_learning_curves_have_no_empty_validation_panel(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    from pipeline.training import plots

    made, close = [], pyplot.close

    def titles_then_close(fig=None):
        made.append([ax.get_title() for ax in fig.axes])
        close(fig)

    monkeypatch.setattr(pyplot, "close", titles_then_close)
    history = [{"epoch": e, "train_loss": 1 / e, "lr": 0.01} for e in (1, 2)]
    plots.plot_learning_curves(history, tmp_path / "no_val.png")
    with_val = [h | {"val_loss": 1.0, "val_accuracy": 0.9} for h in history]
    plots.plot_learning_curves(with_val, tmp_path / "val.png")
    assert made[0] == ["training loss (no validation split)", "learning rate"]
    assert made[1] == ["loss", "val accuracy", "learning rate"]
