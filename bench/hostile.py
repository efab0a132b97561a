"""What hostile image files cost the code that decodes files sent to a model (`pipeline predict`,
the batch DAG, the MLflow model): peak RSS and time per file, each in a fresh process.

The set: a 16-bit PNG of 4096 x 4096 (the serving limit, 0.04 MB on disk), 16- and 8-bit PNG
bombs of 9000 x 9000 (0.2 and 0.08 MB), and a header claiming 60000 x 60000. Each file is decoded
once by `InputContract.decode` under a 28 x 28 `squash` contract with ingest's default limit
(89,478,485 pixels), as a served file; the peak is the child's max RSS over its RSS after the
imports. Runs against any checkout (`--code DIR`, default this one), so the figures before a
change come from its parent commit in a `git worktree`:
`.venv/bin/python bench/hostile.py [--code DIR]` writes bench/out/hostile.json.
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "hostile.json"

# Run with -S (no site: the editable install's import hook would pick this checkout) and the
# code's folder ahead of the virtual environment's packages.
_CHILD = """
import sys
sys.path[:0] = sys.argv[2:4]
import inspect, json, resource, time
from pipeline.data.contract import InputContract
from pipeline.data.images import BadImage
contract = InputContract((1, 28, 28), ("a", "b"), "squash", 16, (255, 255, 255), True, 89_478_485)
raw = open(sys.argv[1], "rb").read()
served = {"served": True} if "served" in inspect.signature(contract.decode).parameters else {}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    contract.decode(raw, **served)
    outcome = "decoded"
except BadImage as exc:
    outcome = "refused: " + str(exc)[:90]
seconds = time.perf_counter() - start
peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"outcome": outcome, "seconds": round(seconds, 3), "peak_mib": round(peak)}))
"""


def _header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _files(folder: Path) -> dict[str, Path]:
    import numpy as np
    from PIL import Image

    made = {}
    for name, side, dtype in (("16-bit 4096x4096", 4096, np.uint16),
                              ("16-bit bomb 9000x9000", 9000, np.uint16),
                              ("8-bit bomb 9000x9000", 9000, np.uint8)):  # fmt: skip
        pixels = np.zeros((side, side), dtype)
        pixels[: side // 2] = np.iinfo(dtype).max
        made[name] = folder / f"{side}-{dtype.__name__}.png"
        Image.fromarray(pixels).save(made[name])
    made["header claims 60000x60000"] = folder / "claims.png"
    made["header claims 60000x60000"].write_bytes(_header_only(60000, 60000))
    return made


def main(code: Path) -> dict:
    import sysconfig

    paths = [str(code), sysconfig.get_paths()["purelib"]]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in _files(Path(tmp)).items():
            out = subprocess.run([sys.executable, "-S", "-c", _CHILD, str(path), *paths],
                                 capture_output=True, text=True, check=True).stdout  # fmt: skip
            results[name] = {"file_kb": round(path.stat().st_size / 1024), **json.loads(out)}
            print(f"{name:28} {results[name]}", file=sys.stderr)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose code decodes")
    args = parser.parse_args()
    results = main(args.code.resolve())
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"code": str(args.code), "files": results}, indent=2) + "\n")
