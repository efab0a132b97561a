"""Adaptive batching: requests that arrive while the model is busy are scored together.

One task takes what is queued when the model is free, up to `max_batch` images; it waits up to
`max_wait_s` more only while requests are still being decoded (so a lone request never waits).
Each request carries the version it was decoded for, and a batch holds one version only, so an
alias switch never scores pixels through a model of another input contract (the version that
decoded a request answers it, and names itself)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np


@dataclass
class _Request:
    served: object  # serving.model.Served
    pixels: np.ndarray  # float32 N x C x H x W
    answer: asyncio.Future


class Batcher:
    def __init__(self, max_batch: int, max_wait_s: float, observe: Callable[[int], None]):
        self.max_batch, self.max_wait_s, self.observe = max_batch, max_wait_s, observe
        self.queue: asyncio.Queue[_Request] = asyncio.Queue()
        self.decoding = 0  # requests accepted whose pixels are not queued yet
        self.held: _Request | None = None  # of another version than the batch being filled
        self.arrived = asyncio.Event()
        # Scoring has a thread of its own: decoding requests fill the default pool meanwhile.
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="score")

    def start_decoding(self) -> None:
        self.decoding += 1

    def stop_decoding(self) -> None:
        self.decoding -= 1
        self.arrived.set()

    async def score(self, served, pixels: np.ndarray):
        """What `served.score` gives for `pixels` (an array of N rows, or a tuple of them and
        None), scored in a batch with other requests'."""
        answer = asyncio.get_running_loop().create_future()
        await self.queue.put(_Request(served, pixels, answer))
        self.arrived.set()
        return await answer

    async def run(self) -> None:
        """The batching loop (one task for the life of the server)."""
        while True:
            first = self.held or await self.queue.get()
            self.held = None
            batch = await self._fill([first])
            pixels = np.concatenate([r.pixels for r in batch]) if len(batch) > 1 else first.pixels
            self.observe(len(pixels))
            try:
                loop = asyncio.get_running_loop()
                scored = await loop.run_in_executor(self.pool, first.served.score, pixels)
            except Exception as exc:  # noqa: BLE001  (each waiting request gets the failure)
                for request in batch:
                    if not request.answer.done():
                        request.answer.set_exception(exc)
                continue
            start = 0
            for request in batch:
                end = start + len(request.pixels)
                if not request.answer.done():  # a client that left cancelled its future
                    request.answer.set_result(_rows(scored, start, end))
                start = end

    async def _fill(self, batch: list[_Request]) -> list[_Request]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        size = len(batch[0].pixels)
        while size < self.max_batch:
            if self.queue.empty():
                wait = deadline - loop.time()
                if self.decoding <= 0 or wait <= 0:
                    break
                self.arrived.clear()
                try:
                    await asyncio.wait_for(self.arrived.wait(), wait)
                except TimeoutError:
                    break
                continue
            request = self.queue.get_nowait()
            if request.served is not batch[0].served or size + len(request.pixels) > self.max_batch:
                self.held = request  # the next batch starts with it
                break
            batch.append(request)
            size += len(request.pixels)
        return batch


def _rows(scored, start: int, end: int):
    if isinstance(scored, tuple):
        return tuple(None if part is None else part[start:end] for part in scored)
    return scored[start:end]
