"""The version a server answers with, and the thread that follows its alias in the registry."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import ServeConfig
from pipeline.settings import Settings

log = logging.getLogger("pipeline.serve")


@dataclass(frozen=True)
class Served:
    """One registered version, loaded and warmed up: what `/version` reports and every answer
    names. `model` takes float32 N x C x H x W and returns logits (a torch module or ONNX)."""

    name: str
    version: int
    alias: str
    run_id: str
    data_md5: str | None
    weights_sha256: str | None
    temperature: float  # evaluate's calibration (1: the plain softmax)
    model: object = field(repr=False)
    contract: object = field(repr=False)
    abstainer: object = field(repr=False)  # training.conformal.Abstainer, or None: never abstains

    def describe(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "alias": self.alias,
            "run_id": self.run_id,
            "data_md5": self.data_md5,
            "weights_sha256": self.weights_sha256,
            "temperature": self.temperature,
            "abstain": None
            if self.abstainer is None
            else {
                "alpha": self.abstainer.alpha,
                "ood_rate": self.abstainer.ood_rate,
                "held_out_images": len(self.abstainer.scores["energy"]),
            },
            "classes": list(self.contract.classes),
            "input": list(self.contract.shape),
        }

    def score(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits (N x classes, float32) of float32 N x C x H x W pixels on 0..255, and the
        penultimate features the prediction log profiles (N x D; None for ONNX)."""
        from pipeline.training.inference import logits_and_features

        return logits_and_features(self.model, pixels)


def where(settings: Settings, name: str, alias: str) -> int:
    """The version `name@alias` points at now (LookupError when it points nowhere)."""
    from pipeline.registry import versions
    from pipeline.tracking import server, store

    with server.reachable(settings):
        return int(versions.resolve(store.client(settings), f"{name}@{alias}").version)


def load(
    settings: Settings, name: str, alias: str, cfg: ServeConfig, pinned: int | None = None
) -> Served:
    """`name@alias` as it is now (or version `pinned`, serving for the alias): its weights
    checked against the digest registered with the version (CheckpointError on a mismatch),
    loaded, and scored once on a blank image so the first request pays no first-call cost; with
    `cfg.abstain`, its held-out scores too (LookupError for a version evaluated without them,
    ValueError for too few)."""
    from pipeline.registry import versions
    from pipeline.tracking import server, store, weights

    with server.reachable(settings):
        client = store.client(settings)
        ref = f"{name}/{pinned}" if pinned is not None else f"{name}@{alias}"
        version = versions.resolve(client, ref)
        sha256 = version.tags.get(versions.WEIGHTS_TAG)
        model, spec = weights.load_weights(version.run_id, sha256=sha256)
        temperature = weights.temperature(version.run_id)
        abstainer = _abstainer(version, weights.held_out_scores(version.run_id), cfg)
        data_md5 = client.get_run(version.run_id).data.tags.get("data.md5")
    contract = spec.input_contract()
    served = Served(
        name=name,
        version=int(version.version),
        alias=alias,
        run_id=version.run_id,
        data_md5=data_md5,
        weights_sha256=sha256,
        temperature=temperature,
        model=model,
        contract=contract,
        abstainer=abstainer,
    )
    served.score(np.zeros((1, *contract.shape), np.float32))
    return served


def _abstainer(version, scores: dict | None, cfg: ServeConfig):
    from pipeline.training.conformal import Abstainer

    if not cfg.abstain:
        return None
    if scores is None:
        raise LookupError(
            f"{version.name} version {version.version} has no held-out scores to abstain by: "
            f"run {version.run_id} held out no validation split, trained under DP-SGD, or was "
            "evaluated before they existed (its tag calibration.fitted_on says which; only the "
            "last is mended, by `pipeline evaluate --run-id`). Serve another version, or "
            "without serve.abstain"
        )
    return Abstainer(scores, cfg.alpha, cfg.ood_rate)


class Follower(threading.Thread):
    """Asks the registry every `cfg.poll_s` seconds where `name@alias` points; when it moved
    from `current()` (None: nothing loaded yet), loads the new version off the request path and
    hands it to `switch` once it answered its warm-up.
    A registry that cannot be reached, or a version that fails to load, keeps the one serving:
    each failed check is counted by `failed` and each new failure logged once, `failure` says
    what is wrong until a check succeeds, and a version that failed to load is tried again
    only after `RETRY_S` (not downloaded and hashed at every poll).
    With `nudges` (a file the worker processes of one server share), a nudge is passed on to
    the other workers' followers of the alias, which look at the file every `NUDGE_S`."""

    RETRY_S = 60.0
    NUDGE_S = 0.25

    def __init__(
        self,
        settings: Settings,
        cfg: ServeConfig,
        target: tuple[str, str],
        current: Callable[[], Served | None],
        switch: Callable[[Served], None],
        failed: Callable[[str], None],
        nudges: Path | None = None,
    ):
        super().__init__(name=f"follow-{target[1]}", daemon=True)
        self.nudges, self._nudged = nudges, _mtime(nudges)
        self.settings, self.current, self.switch, self.failed = settings, current, switch, failed
        self.cfg, (self.name, self.alias) = cfg, target
        self.stopped = False
        self.wake = threading.Event()  # set by `nudge` or `stop`
        self.failure: str | None = None  # why the served version may not be the alias's
        self._refused: tuple[int, float] | None = None  # (version, when it failed to load)

    def run(self) -> None:
        due = time.monotonic() + self.cfg.poll_s
        while True:
            wait = due - time.monotonic()
            self.wake.wait(max(0.0, min(wait, self.NUDGE_S) if self.nudges else wait))
            if self.stopped:
                return
            if self.wake.is_set() or time.monotonic() >= due or self._passed_on():
                self.wake.clear()
                self.check()
                due = time.monotonic() + self.cfg.poll_s

    def nudge(self) -> None:
        """Check now (a registry webhook said the alias moved), not at the next poll; tell the
        other workers' followers too."""
        if self.nudges is not None:
            self.nudges.touch()
            self._nudged = _mtime(self.nudges)
        self.wake.set()

    def _passed_on(self) -> bool:
        """Whether another worker was nudged since this follower last looked."""
        if self.nudges is None or (now := _mtime(self.nudges)) == self._nudged:
            return False
        self._nudged = now
        return True

    def stop(self) -> None:
        self.stopped = True
        self.wake.set()

    def check(self) -> None:
        served = self.current()
        had = served.version if served is not None else None
        try:
            version = where(self.settings, self.name, self.alias)
            if version == had:
                self.failure = None
                return
            if self._refused and self._refused[0] == version:
                if time.monotonic() - self._refused[1] < self.RETRY_S:
                    return
            try:
                new = load(self.settings, self.name, self.alias, self.cfg)
            except Exception:
                self._refused = (version, time.monotonic())
                raise
        except Exception as exc:  # noqa: BLE001  (the server keeps answering with what it has)
            from pipeline.serving.payload import one_line

            reason = one_line(f"{type(exc).__name__}: {exc}", 300)
            if reason != self.failure:
                log.warning("@%s: still on version %s: %s", self.alias, had, reason)
            self.failed(type(exc).__name__)
            self.failure = reason
            return
        log.info("@%s moved: version %s -> %s", self.alias, had, new.version)
        self.failure, self._refused = None, None
        self.switch(new)


def _mtime(path: Path | None) -> int | None:
    try:
        return path.stat().st_mtime_ns if path is not None else None
    except FileNotFoundError:
        return None
