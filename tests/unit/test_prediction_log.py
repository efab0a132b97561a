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
from pipeline.monitoring.log import (
    ParquetStore,
    PostgresStore,
    PredictionLog,
    Scored,
    open_store,
)
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
    log.scored("serve", ("m", 3), Scored(pixels, features, probs, answers, abstained))
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
        log.scored("serve", ("m", 1), Scored(*_scored(200, seed)))
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
    log.scored("serve", ("m", 1), Scored(pixels, features, probs, answers))  # 5 waiting
    log.scored("serve", ("m", 1), Scored(pixels, features, probs, answers))  # 10 > 8: dropped
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
    log.scored("predict", ("m", 1), Scored(*_scored(3)))
    log.close()  # the first flush fails
    log = PredictionLog(Flaky(tmp_path), 1.0, 100, counts)
    log.scored("predict", ("m", 1), Scored(*_scored(4), inputs=list("abcd")))
    log.close()
    assert counts == {"dropped": 3, "written": 4}
    assert [r["input"] for r in Flaky(tmp_path).read().to_pylist()] == list("abcd")


def test_parquet_reads_by_time_and_postgresql_gives_back_the_same_rows(tmp_path, new_database):
    parquet = ParquetStore(tmp_path)
    postgres = PostgresStore(f"postgresql://postgres@127.0.0.1:5432/{new_database('log')}")
    for store in (parquet, postgres):
        log = PredictionLog(store, 1.0, 100)
        log.scored("serve", ("m", 2), Scored(*_scored(4)))
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


def test_each_row_lands_in_its_own_days_folder_across_midnight(tmp_path):
    from pipeline.monitoring.log import table_of

    _, _, probs, answers = _scored(1)
    made = profile(np.zeros((1, 1, 2, 2), np.float32), None)
    before, after = datetime(2026, 12, 7, 23, 59, 58, tzinfo=UTC), datetime(2026, 12, 8, tzinfo=UTC)
    items = [  # as a flush takes them: images first, then refusals
        (before, "serve", ("m", 1), made, probs, answers, None, None),
        (after, "serve", ("m", 1), made, probs, answers, None, None),
        (before + timedelta(seconds=1), "serve", ("m", 1), "contract"),
    ]
    store = ParquetStore(tmp_path)
    store.write(table_of(items))
    days = sorted(day.name for day in tmp_path.iterdir())
    assert days == ["day=2026-12-07", "day=2026-12-08"]
    by_day = {
        name: sorted(row["time"].date().isoformat() for row in _rows_in(tmp_path / name))
        for name in days
    }
    assert by_day == {"day=2026-12-07": ["2026-12-07"] * 2, "day=2026-12-08": ["2026-12-08"]}
    assert [r["time"] for r in store.read().to_pylist()] == sorted(t for t, *_ in items)


def _rows_in(folder):
    import pyarrow.parquet as pq

    return [row for path in folder.glob("*.parquet") for row in pq.read_table(path).to_pylist()]


def test_postgresql_tables_are_made_by_concurrent_servers_and_again_when_gone(new_database):
    import psycopg2

    uri = f"postgresql://postgres@127.0.0.1:5432/{new_database('race')}"
    failures = []

    def start() -> None:
        try:
            PostgresStore(uri)
        except Exception as exc:  # noqa: BLE001
            failures.append(exc)

    starting = [threading.Thread(target=start) for _ in range(6)]
    for thread in starting:
        thread.start()
    for thread in starting:
        thread.join()
    assert failures == []
    store = PostgresStore(uri)
    with psycopg2.connect(uri) as connection, connection.cursor() as cursor:
        cursor.execute("DROP TABLE pipeline_predictions")  # the database made anew, say
    connection.close()
    log = PredictionLog(store, 1.0, 100)
    log.scored("serve", ("m", 1), Scored(*_scored(3)))
    log.close()
    assert store.read().num_rows == 3


def test_a_stores_password_is_never_shown():
    from pipeline.monitoring.log import shown_uri

    assert shown_uri("mysql://u:hunter2@h/db") == "mysql://***@h/db"
    assert "hunter2" not in shown_uri("postgresql://h:5432/db?user=u&password=hunter2")
    with pytest.raises(ConfigError) as said:
        open_store(Settings.from_env("/tmp"), MonitorConfig(store="mysql://u:hunter2@h/db"))
    assert "hunter2" not in str(said.value)
