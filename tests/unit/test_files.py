"""Atomic writes under concurrency: commands sharing a workspace write the same hand-off files."""

import json
import multiprocessing as mp

from pipeline.files import write_json


def _writer(path, who: int, times: int, errors) -> None:
    payload = {"writer": who, "rows": [who] * 20_000}  # ~100 KB: a torn read would show
    for _ in range(times):
        try:
            write_json(path, payload)
        except OSError as exc:  # the fixed temp name of old: another writer renamed it away
            errors.put(f"writer {who}: {exc!r}")


def test_eight_writers_and_a_reader_never_see_a_torn_or_missing_file(tmp_path):
    path = tmp_path / "train.json"
    write_json(path, {"writer": -1, "rows": []})
    ctx = mp.get_context("fork")
    errors = ctx.Queue()
    writers = [ctx.Process(target=_writer, args=(path, k, 40, errors)) for k in range(8)]
    for w in writers:
        w.start()
    reads = 0
    while any(w.is_alive() for w in writers) or reads == 0:
        doc = json.loads(path.read_text())  # whole, or the JSON would not parse
        assert doc["rows"] == [doc["writer"]] * len(doc["rows"])
        reads += 1
    for w in writers:
        w.join()
        assert w.exitcode == 0
    failed = []
    while not errors.empty():
        failed.append(errors.get())
    assert failed == []
    assert json.loads(path.read_text())["writer"] in range(8)
    assert [p.name for p in tmp_path.iterdir()] == ["train.json"]  # no temporary file left
