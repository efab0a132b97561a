"""The prediction log: a row per scored image (sampled at `monitor.sample_rate`) and per refused
request, from `pipeline serve`, `pipeline predict` and the batch-prediction DAG, written by a
thread of its own off the request path. A full buffer drops rows and counts them: the log never
slows or fails an answer. Stored as Parquet files by day in the project (the default) or in a
PostgreSQL table (`monitor.store`), where it outgrows one machine."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline.config import MonitorConfig
from pipeline.settings import Settings

log = logging.getLogger("pipeline.monitor")
FLUSH_S = 5.0  # a row waits at most this long to be written
FLUSH_ROWS = 5_000  # or until this many wait
TABLE = "pipeline_predictions"

# column -> (pyarrow type name, PostgreSQL type)
COLUMNS = {
    "id": ("string", "text PRIMARY KEY"),
    "time": ("timestamp", "timestamptz NOT NULL"),
    "source": ("string", "text NOT NULL"),  # serve, predict
    "model": ("string", "text NOT NULL"),
    "version": ("int64", "bigint NOT NULL"),
    "input": ("string", "text"),  # predict: the file's name
    "mean": ("floats", "real[]"),  # per channel, of the pixels as the contract made them
    "contrast": ("floats", "real[]"),  # standard deviation per channel
    "embedding": ("floats", "real[]"),  # profile.EMBED_DIMS; null for an ONNX model
    "prediction": ("string", "text"),  # the answer: a class, or "unknown"
    "probability": ("float32", "real"),  # calibrated, of the most probable class
    "probabilities": ("floats", "real[]"),  # calibrated, in the model's class order
    "abstained": ("string", "text"),  # why "unknown" (serve.abstain), else null
    "refused": ("string", "text"),  # a refused request's reason (a row without an image)
}


class PredictionLog:
    """Rows in, written in batches by a daemon thread every `FLUSH_S` (sooner past
    `FLUSH_ROWS`); `counted(outcome, n)` hears of rows `written` and `dropped`. Handing rows
    over takes a lock and a list append, so the request path never waits on the writer. `close`
    writes what waits."""

    def __init__(
        self,
        store,
        sample_rate: float,
        capacity: int,
        counted: Callable[[str, int], None] = lambda outcome, n: None,
    ):
        self.store, self.sample_rate, self.capacity = store, sample_rate, capacity
        self.counted = counted
        self.pending: list[tuple[int, tuple]] = []  # (rows, item), not yet taken by the writer
        self.waiting = 0  # rows pending or being written
        self.closing = False
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.rng = np.random.default_rng()
        _warm_up()
        self.thread = threading.Thread(target=self._write, name="prediction-log", daemon=True)
        self.thread.start()

    def scored(self, source: str, model: tuple[str, int], images: Scored) -> None:
        """Log a sample of `images` (see `sample`) that `model` (name, version) scored."""
        taken = sample(self.rng, self.sample_rate, source, model, images)
        if taken is not None:
            self._put(len(taken[4]), taken)

    def refused(self, source: str, model: tuple[str, int], reason: str) -> None:
        """Log a refused request (not sampled: refusals are few and each one matters)."""
        self._put(1, (datetime.now(UTC), source, model, reason))

    def close(self, timeout_s: float = 60) -> None:
        """Write what waits and stop the thread."""
        with self.lock:
            self.closing = True
        self.wake.set()
        self.thread.join(timeout_s)

    def _put(self, rows: int, item: tuple) -> None:
        with self.lock:
            before = self.waiting
            full = before + rows > self.capacity
            if not full:
                self.pending.append((rows, item))
                self.waiting += rows
        if full:
            self.counted("dropped", rows)
        elif before < FLUSH_ROWS <= before + rows:
            self.wake.set()

    def _write(self) -> None:
        while True:
            self.wake.wait(FLUSH_S)
            self.wake.clear()
            with self.lock:
                taken, self.pending, closing = self.pending, [], self.closing
            if taken:
                self._flush(taken)
            if closing:
                return

    def _flush(self, taken: list[tuple[int, tuple]]) -> None:
        size = sum(rows for rows, _ in taken)
        try:
            self.store.write(table_of([item for _, item in taken]))
            self.counted("written", size)
        except Exception as exc:  # noqa: BLE001  (the log must never stop serving)
            log.warning("prediction log: %d rows not written: %s", size, exc)
            self.counted("dropped", size)
        finally:
            with self.lock:
                self.waiting -= size


class Scored(NamedTuple):
    """N scored images as the log takes them."""

    pixels: np.ndarray  # float32 N x C x H x W, as the model's input contract made them
    features: np.ndarray | None  # N x D penultimate features; None for an ONNX model
    probs: np.ndarray  # N x classes, calibrated
    predictions: list[str]  # the answers
    abstained: list[str | None] | None = None  # why each is "unknown" (serve.abstain)
    inputs: list[str] | None = None  # the inputs' names (pipeline predict)


def sample(
    rng: np.random.Generator, rate: float, source: str, model: tuple[str, int], images: Scored
) -> tuple | None:
    """An item for `table_of`: about `rate` of `images`, or None when none is drawn. It keeps
    the images' profiles (`profile.profile`: a few numbers each), not their pixels."""
    from pipeline.monitoring.profile import profile

    pixels, features, probs, predictions, abstained, inputs = images
    if rate < 1:
        keep = np.flatnonzero(rng.random(len(pixels)) < rate)
        if len(keep) == 0:
            return None
        pixels, probs = pixels[keep], probs[keep]
        features = None if features is None else features[keep]
        predictions, abstained, inputs = (
            None if values is None else [values[k] for k in keep]
            for values in (predictions, abstained, inputs)
        )
    made = profile(pixels, features)
    return (datetime.now(UTC), source, model, made, probs, predictions, abstained, inputs)


def table_of(items: list[tuple]):
    """The pyarrow Table of the rows of `items` (see `PredictionLog.scored` and `.refused`),
    built a column at a time from the items' arrays: a flush holds the GIL for a few
    milliseconds, not a Python loop per row."""
    import pyarrow as pa

    schema = _schema()
    images = [item for item in items if len(item) == 8]
    refusals = [item for item in items if len(item) == 4]
    tables = []
    if images:
        counts = [len(item[4]) for item in images]

        def each(values: list) -> list:  # one value per item, once per row of the item
            return np.repeat(np.array(values, dtype=object), counts).tolist()

        def listed(k: int) -> list:  # per-row values, None where an item gave none
            return [
                v for item, n in zip(images, counts, strict=True) for v in item[k] or [None] * n
            ]

        made = [item[3] for item in images]
        probs = np.concatenate([item[4] for item in images])
        columns = {
            "time": pa.array(each([item[0] for item in images]), pa.timestamp("us", "UTC")),
            "source": pa.array(each([item[1] for item in images]), pa.string()),
            "model": pa.array(each([item[2][0] for item in images]), pa.string()),
            "version": pa.array(each([int(item[2][1]) for item in images]), pa.int64()),
            "input": pa.array(listed(7), pa.string()),
            "mean": _lists([m["mean"] for m in made], counts),
            "contrast": _lists([m["contrast"] for m in made], counts),
            "embedding": _lists([m["embedding"] for m in made], counts),
            "prediction": pa.array(listed(5), pa.string()),
            "probability": pa.array(probs.max(1), pa.float32()),
            "probabilities": _lists([item[4] for item in images], counts),
            "abstained": pa.array(listed(6), pa.string()),
            "refused": pa.nulls(len(probs), pa.string()),
        }
        tables.append(pa.table({"id": _ids(len(probs)), **columns}, schema=schema))
    if refusals:
        rows = [
            dict.fromkeys(COLUMNS)
            | {"time": when, "source": source, "model": name, "version": version, "refused": why}
            for when, source, (name, version), why in refusals
        ]
        for row, id_ in zip(rows, _ids(len(rows)), strict=True):
            row["id"] = id_
        tables.append(pa.Table.from_pylist(rows, schema=schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _warm_up() -> None:
    """Build and write a table once (in memory), so pyarrow and what it loads on first use
    (pandas, the Parquet writer) load now, not in the writer's first flush, where they would
    hold the GIL for up to a second of serving."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    one = np.zeros((1, 1, 1, 1), np.float32)
    item = sample(np.random.default_rng(), 1.0, "", ("", 0), Scored(one, None, one[0, 0], [""]))
    table = table_of([item])
    pq.write_table(table, pa.BufferOutputStream())
    pc.min_max(table["time"])


def _ids(n: int) -> list[str]:
    """n random 128-bit ids in hex (as uuid4().hex, from one system call)."""
    hexed = os.urandom(16 * n).hex()
    return [hexed[k : k + 32] for k in range(0, 32 * n, 32)]


def _lists(blocks: list, counts: list[int]):
    """A list<float32> column: block k (a counts[k] x width array, or None) gives counts[k]
    rows, null rows for None."""
    import pyarrow as pa

    widths = [0 if block is None else block.shape[1] for block in blocks]
    offsets = np.concatenate([[0], np.cumsum(np.repeat(widths, counts))]).astype(np.int32)
    present = [block.reshape(-1) for block in blocks if block is not None]
    values = np.concatenate(present).astype(np.float32) if present else np.empty(0, np.float32)
    missing = np.repeat([block is None for block in blocks], counts)
    mask = pa.array(missing) if missing.any() else None
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), mask=mask)


class ParquetStore:
    """Parquet files under `root`, a folder per UTC day (`day=YYYY-MM-DD`, Hive-style), one file
    per flush, written whole then renamed: a reader never sees half a file."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def write(self, table) -> None:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        bounds = pc.min_max(table["time"]).as_py()
        first, last = bounds["min"].date(), bounds["max"].date()
        if first == last:  # a flush across midnight is split, each row to its own day
            parts = [(first.isoformat(), table)]
        else:
            dates = pc.strftime(table["time"], format="%Y-%m-%d")
            parts = [(d, table.filter(pc.equal(dates, d))) for d in pc.unique(dates).to_pylist()]
        for day, part in parts:
            folder = self.root / f"day={day}"
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{time.time_ns()}-{os.getpid()}"
            pq.write_table(part, folder / f".{name}.tmp")
            os.replace(folder / f".{name}.tmp", folder / f"{name}.parquet")

    def read(self, since: datetime | None = None, until: datetime | None = None):
        """A pyarrow Table of the rows logged in [since, until)."""
        import pyarrow as pa
        import pyarrow.dataset as pads

        if not self.root.exists():
            return _schema().empty_table()
        found = pads.dataset(self.root, format="parquet", partitioning="hive", schema=_schema())
        where = None
        for bound, op in ((since, "__ge__"), (until, "__lt__")):
            if bound is not None:
                test = getattr(pads.field("time"), op)(pa.scalar(bound, pa.timestamp("us", "UTC")))
                where = test if where is None else where & test
        return found.to_table(filter=where, columns=list(COLUMNS)).sort_by("time")


class PostgresStore:
    """The `pipeline_predictions` table of a PostgreSQL database (made when missing); a
    connection per write (a flush every few seconds at most)."""

    def __init__(self, uri: str):
        import re

        self.dsn = re.sub(r"^postgresql\+\w+://", "postgresql://", uri, flags=re.I)
        self._create()

    def _create(self) -> None:
        """The table and its index, when missing. Servers starting at once on an empty
        database would race in CREATE ... IF NOT EXISTS: a transaction lock takes them in turn."""
        fields = ", ".join(f'"{name}" {kind}' for name, (_, kind) in COLUMNS.items())
        with self._cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (TABLE,))
            cursor.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} ({fields})")
            cursor.execute(f"CREATE INDEX IF NOT EXISTS {TABLE}_time ON {TABLE} (time)")

    @contextlib.contextmanager
    def _cursor(self):

        import psycopg2

        try:
            connection = psycopg2.connect(self.dsn, connect_timeout=10)
        except psycopg2.OperationalError as exc:
            from pipeline.errors import ConfigError

            shown = shown_uri(self.dsn)
            first = str(exc).strip().splitlines()[0]
            raise ConfigError(
                f"monitor.store {shown}: cannot connect ({first}); start the database or "
                "fix the URI"
            ) from None
        try:
            with connection, connection.cursor() as cursor:  # one transaction
                yield cursor
        finally:
            connection.close()

    def write(self, table) -> None:
        import psycopg2.errors
        from psycopg2.extras import execute_values

        rows = [tuple(row.values()) for row in table.select(list(COLUMNS)).to_pylist()]
        quoted = ", ".join(f'"{name}"' for name in COLUMNS)
        for last_try in (False, True):
            try:
                with self._cursor() as cursor:
                    execute_values(cursor, f"INSERT INTO {TABLE} ({quoted}) VALUES %s", rows)
                return
            except psycopg2.errors.UndefinedTable:  # the database was made anew meanwhile
                if last_try:
                    raise
                self._create()

    def read(self, since: datetime | None = None, until: datetime | None = None):
        """A pyarrow Table of the rows logged in [since, until)."""
        import pyarrow as pa

        quoted = ", ".join(f'"{name}"' for name in COLUMNS)
        since = since or datetime(1970, 1, 1, tzinfo=UTC)
        until = until or datetime(9999, 1, 1, tzinfo=UTC)
        with self._cursor() as cursor:
            cursor.execute(
                f"SELECT {quoted} FROM {TABLE} WHERE time >= %s AND time < %s ORDER BY time",
                (since, until),
            )
            found = cursor.fetchall()
        columns = {name: [row[k] for row in found] for k, name in enumerate(COLUMNS)}
        return pa.table(columns, schema=_schema())


def open_store(settings: Settings, cfg: MonitorConfig):
    """The store `cfg.store` names: "" the project's Parquet folder, or a PostgreSQL URI."""
    if cfg.store.lower().startswith(("postgresql://", "postgresql+", "postgres://")):
        return PostgresStore(cfg.store)
    if cfg.store:
        from pipeline.errors import ConfigError

        raise ConfigError(
            f"monitor.store {shown_uri(cfg.store)!r}: give a postgresql:// URI, or leave it "
            f"empty for Parquet files under {settings.prediction_log}"
        )
    return ParquetStore(settings.prediction_log)


def open_log(
    settings: Settings, cfg: MonitorConfig, counted: Callable[[str, int], None] | None = None
) -> PredictionLog | None:
    """The prediction log `cfg` asks for, or None when `monitor.log` is off."""
    if not cfg.log:
        return None
    store = open_store(settings, cfg)
    return PredictionLog(store, cfg.sample_rate, cfg.buffer, counted or (lambda o, n: None))


def shown_uri(uri: str) -> str:
    """`uri` with its password hidden, as `user:password@` or a `password=` parameter."""
    import re

    uri = re.sub(r"//[^@/]*@", "//***@", uri)
    return re.sub(r"(password=)[^&;\s]*", r"\1***", uri, flags=re.I)


def _schema():
    import pyarrow as pa

    kinds = {
        "string": pa.string(),
        "timestamp": pa.timestamp("us", "UTC"),
        "int64": pa.int64(),
        "float32": pa.float32(),
        "floats": pa.list_(pa.float32()),
    }
    return pa.schema([(name, kinds[kind]) for name, (kind, _) in COLUMNS.items()])
