"""Adaptive batching: concurrent requests gathered into one session call.

One drain task takes the first waiting request, then whatever else is already queued, and
optionally waits up to `max_delay` for more, up to `max_batch_size` images. While one batch
runs in a worker thread the next one gathers, so under load batches grow by themselves and
an idle server adds no delay. A caller that goes away only cancels its own future: results
are handed out with done-checks so the rest of its batch is neither stranded nor broken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from starlette.concurrency import run_in_threadpool

from service.model import Model

log = logging.getLogger("service.batching")


@dataclass
class _Pending:
    batch: np.ndarray
    outputs: tuple[str, ...]
    future: asyncio.Future[dict[str, np.ndarray]]
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    """What the last batches looked like, read by the metrics module."""

    batches: int = 0
    images: int = 0


class Batcher:
    def __init__(self, model: Model, max_batch_size: int = 64, max_delay_ms: float = 0.0) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay_ms / 1000
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        # Called after each session run with (batch size, each caller's queue time, run time).
        self.observers: list[Callable[[int, list[float], float], None]] = []

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._drain(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("server shutting down"))

    async def run(self, batch: np.ndarray, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Results for `batch` (float32 [N, 28, 28, 1]); large batches go straight to the model."""
        names = tuple(outputs or self.model.output_names)
        self.model.check_outputs(names)
        if self._task is None or len(batch) >= self.max_batch_size:
            start = time.perf_counter()
            result = await run_in_threadpool(self.model.run, batch, list(names))
            self._observe(len(batch), [0.0], time.perf_counter() - start)
            return result
        future: asyncio.Future[dict[str, np.ndarray]] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(batch, names, future))
        return await future

    def _observe(self, size: int, queue_seconds: list[float], run_seconds: float) -> None:
        self.stats.batches += 1
        self.stats.images += size
        for observer in self.observers:
            observer(size, queue_seconds, run_seconds)

    async def _gather(self) -> list[_Pending]:
        first = await self._queue.get()
        taken, size = [first], len(first.batch)
        deadline = time.perf_counter() + self.max_delay
        while size < self.max_batch_size:
            if self._queue.empty():
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                item = self._queue.get_nowait()
            if size + len(item.batch) > self.max_batch_size:
                # Too big to join: it leads the next batch instead of waiting behind others.
                self._queue.put_nowait(item)
                break
            taken.append(item)
            size += len(item.batch)
        return taken

    async def _drain(self) -> None:
        while True:
            taken = await self._gather()
            live = [p for p in taken if not p.future.done()]  # callers that left are skipped
            if not live:
                continue
            names = sorted({n for p in live for n in p.outputs}, key=self.model.output_names.index)
            start = time.perf_counter()
            try:
                batch = live[0].batch if len(live) == 1 else np.concatenate([p.batch for p in live])
                result = await run_in_threadpool(self.model.run, batch, names)
            except Exception as exc:  # one failed run fails its own callers, never the drain task
                log.exception("batch inference failed")
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            done = time.perf_counter()
            self._observe(len(batch), [start - p.queued_at for p in live], done - start)
            offset = 0
            for p in live:
                n = len(p.batch)
                if not p.future.done():
                    p.future.set_result({k: result[k][offset : offset + n] for k in p.outputs})
                offset += n
