"""The prediction log as monitoring reads it back: every scored image a row with its profile and
answer, refusals as rows of their own, sampling at the configured rate, a full buffer dropping
and counting instead of waiting, a failed write counted, and both stores (Parquet by day, a
real PostgreSQL table) giving back what was written."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import MonitorConfig
from pipeline.errors import ConfigError
from pipeline.monitoring.log import ParquetStore, PostgresStore, PredictionLog, open_store
from pipeline.monitoring.profile import EMBED_DIMS, profile
from pipeline.settings import Settings
from pipeline.training.inference import logits_and_features


def _scored(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(0, 255, (n, 3, 4, 4)).astype(np.float32)
    features = rng.normal(size=(n, 16)).astype(np.float32)
    probs = rng.dirichlet(np.ones(10), n).astype(np.float32)
    return pixels, features, probs, [str(k) for k in probs.argmax(1)]


class _Counts(dict):
    def __call__(self, outcome: str, n: int) -> None:
        self[outcome] = self.get(outcome, 0) + n


def test_rows_carry_the_profile_and_answer_and_refusals_are_rows(tmp_path):
    store, counts = ParquetStore(tmp_path), _Counts()
    log = PredictionLog(store, 1.0, 1000, counts)
    pixels, features, probs, answers = _scored(5)
    abstained = [None, "ood", None, None, None]
    log.scored("serve", ("m", 3), pixels, features, probs, answers, abstained)
    log.refused("serve", ("m", 3), "contract")
    log.close()
    assert counts == {"written": 6}
    rows = store.read().to_pylist()
    assert len({r["id"] for r in rows}) == 6
    images = [r for r in rows if r["refused"] is None]
    made = profile(pixels, features)
    for k, row in enumerate(images):
        assert (row["model"], row["version"], row["source"]) == ("m", 3, "serve")
        assert np.allclose(row["mean"], pixels[k].reshape(3, -1).mean(1))
        assert np.allclose(row["contrast"], pixels[k].reshape(3, -1).std(1), rtol=1e-5)
        assert np.allclose(row["embedding"], made["embedding"][k], rtol=1e-5)
        assert len(row["embedding"]) == EMBED_DIMS
        assert np.allclose(row["probabilities"], probs[k])
        assert row["prediction"] == answers[k] and row["abstained"] == abstained[k]
        assert row["probability"] == pytest.approx(float(probs[k].max()))
    (refusal,) = [r for r in rows if r["refused"]]
    assert refusal["refused"] == "contract" and refusal["prediction"] is None
    assert all(datetime.now(UTC) - r["time"] < timedelta(minutes=1) for r in rows)


def test_sampling_keeps_about_the_rate_and_a_full_buffer_drops_without_waiting(tmp_path):
    store, counts = ParquetStore(tmp_path), _Counts()
    log = PredictionLog(store, 0.25, 100_000, counts)
    for seed in range(20):
        log.scored("serve", ("m", 1), *_scored(200, seed)[:3], _scored(200, seed)[3])
    log.close()
    kept = store.read().num_rows
    assert abs(kept - 1000) < 4 * (4000 * 0.25 * 0.75) ** 0.5  # binomial, 4 sd

    blocked, counts = threading.Event(), _Counts()

    class Stuck(ParquetStore):
        def write(self, columns):
            blocked.wait(30)
            super().write(columns)

    log = PredictionLog(Stuck(tmp_path / "stuck"), 1.0, 8, counts)
    pixels, features, probs, answers = _scored(5)
    log.scored("serve", ("m", 1), pixels, features, probs, answers)  # 5 waiting
    log.scored("serve", ("m", 1), pixels, features, probs, answers)  # 10 > 8: dropped
    assert counts == {"dropped": 5}
    blocked.set()
    log.close()
    assert counts == {"dropped": 5, "written": 5}


def test_a_failed_write_is_counted_dropped_and_the_log_goes_on(tmp_path):
    counts, calls = _Counts(), []

    class Flaky(ParquetStore):
        def write(self, columns):
            calls.append(len(columns["id"]))
            if len(calls) == 1:
                raise OSError("disk full")
            super().write(columns)

    log = PredictionLog(Flaky(tmp_path), 1.0, 100, counts)
    log.scored("predict", ("m", 1), *_scored(3)[:3], _scored(3)[3])
    log.close()  # the first flush fails
    log = PredictionLog(Flaky(tmp_path), 1.0, 100, counts)
    log.scored("predict", ("m", 1), *_scored(4)[:3], _scored(4)[3], inputs=list("abcd"))
    log.close()
    assert counts == {"dropped": 3, "written": 4}
    assert [r["input"] for r in Flaky(tmp_path).read().to_pylist()] == list("abcd")


def test_parquet_reads_by_time_and_postgresql_gives_back_the_same_rows(tmp_path, new_database):
    parquet = ParquetStore(tmp_path)
    postgres = PostgresStore(f"postgresql://postgres@127.0.0.1:5432/{new_database('log')}")
    for store in (parquet, postgres):
        log = PredictionLog(store, 1.0, 100)
        log.scored("serve", ("m", 2), *_scored(4)[:3], _scored(4)[3])
        log.refused("serve", ("m", 2), "too_large")
        log.close()
    mine, theirs = parquet.read().to_pylist(), postgres.read().to_pylist()
    assert len(mine) == len(theirs) == 5
    key = "prediction"
    assert sorted(map(str, (r[key] for r in mine))) == sorted(map(str, (r[key] for r in theirs)))
    later = datetime.now(UTC) + timedelta(seconds=1)
    assert parquet.read(since=later).num_rows == 0 == postgres.read(since=later).num_rows
    assert parquet.read(until=later).num_rows == 5 == postgres.read(until=later).num_rows
    assert list((tmp_path).glob(f"day={datetime.now(UTC).date()}/*.parquet"))


def test_the_store_is_named_in_one_line_when_it_cannot_be_had(tmp_path):
    settings = Settings.from_env(tmp_path)
    assert isinstance(open_store(settings, MonitorConfig()), ParquetStore)
    with pytest.raises(ConfigError, match="give a postgresql:// URI"):
        open_store(settings, MonitorConfig(store="mysql://x"))
    with pytest.raises(ConfigError, match=r"monitor.store postgresql://\*\*\*@127.0.0.1:1/x"):
        open_store(settings, MonitorConfig(store="postgresql://u:secret@127.0.0.1:1/x"))


def test_features_are_the_input_of_the_last_linear_layer():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.ReLU())
    model = nn.Sequential(body, nn.Linear(6, 3))
    images = np.random.default_rng(0).uniform(0, 255, (5, 1, 4, 4)).astype(np.float32)
    logits, features = logits_and_features(model, images, batch_size=2)
    with torch.no_grad():
        want = body(torch.from_numpy(images)).numpy()
        assert np.allclose(features, want) and np.allclose(logits, model[1](torch.tensor(want)))
    assert logits_and_features(nn.Flatten(), images)[1] is None  # no linear layer: no features
