"""A shadow model: another alias of the served model (`pipeline serve --shadow challenger`)
scores what the champion was asked, off the response path, and the server counts how often the
two agree, so a challenger is seen on real traffic before it answers anyone.

Requests are handed over after they are answered, through a bounded queue to a thread of its
own; a full queue drops them (counted), so the shadow never slows or fails an answer. It follows
its alias as the served version does (`model.Follower`), and an alias that points nowhere yet
leaves it idle until it does.
"""

from __future__ import annotations

import logging
import queue
import threading

import numpy as np

from pipeline.serving.metrics import Metrics
from pipeline.serving.model import Served

log = logging.getLogger("pipeline.serve")
QUEUE_REQUESTS = 256  # requests waiting for the shadow; more are dropped


class Shadow(threading.Thread):
    """Scores (pixels, the answering version, its logits) handed to `offer` with `self.served`
    and counts each image in `metrics.shadow`: agree / disagree (the two argmax classes, by
    name), unscored (no shadow version loaded, or one of another input shape), dropped (the
    queue was full)."""

    def __init__(self, alias: str, metrics: Metrics):
        super().__init__(name=f"shadow-{alias}", daemon=True)
        self.alias, self.metrics = alias, metrics
        self.served: Served | None = None
        self.waiting: queue.Queue = queue.Queue(QUEUE_REQUESTS)

    def switch(self, served: Served) -> None:
        self.served = served
        self.metrics.shadow_version.set(served.version)
        log.info("shadow: %s version %s (@%s)", served.name, served.version, served.alias)

    def offer(self, pixels: np.ndarray, answering: Served, logits: np.ndarray) -> None:
        """Hand an answered request over; never blocks."""
        try:
            self.waiting.put_nowait((pixels, answering, logits))
        except queue.Full:
            self.metrics.shadow.labels("dropped").inc(len(pixels))

    def run(self) -> None:
        while True:
            pixels, answering, logits = self.waiting.get()
            try:
                self._compare(pixels, answering, logits)
            except Exception:  # noqa: BLE001  (a shadow never stops the server)
                log.exception("shadow scoring failed")
                self.metrics.shadow.labels("unscored").inc(len(pixels))

    def _compare(self, pixels: np.ndarray, answering: Served, logits: np.ndarray) -> None:
        shadow = self.served
        if shadow is None or shadow.contract.shape != answering.contract.shape:
            self.metrics.shadow.labels("unscored").inc(len(pixels))
            return
        theirs = np.asarray(shadow.contract.classes)[shadow.score(pixels)[0].argmax(1)]
        ours = np.asarray(answering.contract.classes)[np.asarray(logits).argmax(1)]
        agree = int((theirs == ours).sum())
        self.metrics.shadow.labels("agree").inc(agree)
        self.metrics.shadow.labels("disagree").inc(len(pixels) - agree)
