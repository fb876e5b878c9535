"""Adaptive batching: concurrent requests gathered into one session call.

One drain task takes the first waiting request, then whatever else is already queued, and
optionally waits up to `max_delay` for more, up to `max_batch_size` images. While one batch
runs in the inference thread the next one gathers, so under load batches grow by themselves and
an idle server adds no delay. A caller that goes away only cancels its own future: results
are handed out with done-checks so the rest of its batch is neither stranded nor broken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

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
        self._carry: _Pending | None = None  # did not fit into the last batch: it leads the next one
        self._running: list[_Pending] = []  # taken from the queue, results not yet handed out
        self._task: asyncio.Task[None] | None = None
        # Inference gets its own threads rather than the shared pool that decoding and sync endpoints
        # use: a burst of uploads must not queue session runs behind it. One for the drain task's
        # batches, one for requests big enough to bypass the queue.
        self._executor = self._new_executor()
        # Called after each session run with (batch size, each caller's queue time, run time).
        self.observers: list[Callable[[int, list[float], float], None]] = []

    @staticmethod
    def _new_executor() -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=2, thread_name_prefix="inference")

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._drain(), name="batcher")

    async def stop(self) -> None:
        """Stop the drain task; every caller still waiting gets an error rather than waiting forever."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        stranded = list(self._running)
        if self._carry is not None:
            stranded.append(self._carry)
        while not self._queue.empty():
            stranded.append(self._queue.get_nowait())
        self._running, self._carry = [], None
        for pending in stranded:
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("server shutting down"))
        # Its idle threads go; a fresh executor starts threads only if it is ever used again.
        self._executor.shutdown(wait=False)
        self._executor = self._new_executor()

    async def run(self, batch: np.ndarray, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Results for `batch` (float32 [N, 28, 28, 1]); batches of max_batch_size or more go straight
        to the model, in chunks of max_batch_size (which bounds the memory a run takes)."""
        names = tuple(outputs or self.model.output_names)
        self.model.check_outputs(names)
        if self._task is None or len(batch) >= self.max_batch_size:
            loop = asyncio.get_running_loop()
            result, runs = await loop.run_in_executor(self._executor, self._run_chunked, batch, list(names))
            for size, seconds in runs:
                self._observe(size, [0.0], seconds)
            return result
        future: asyncio.Future[dict[str, np.ndarray]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(batch, names, future))
        return await future

    def _run_chunked(
        self, batch: np.ndarray, names: list[str]
    ) -> tuple[dict[str, np.ndarray], list[tuple[int, float]]]:
        """Results, and (images, seconds) of each session run."""
        parts, runs = [], []
        for i in range(0, max(len(batch), 1), self.max_batch_size):  # an empty batch still gets its one run
            chunk = batch[i : i + self.max_batch_size]
            start = time.perf_counter()
            parts.append(self.model.run(chunk, names))
            runs.append((len(chunk), time.perf_counter() - start))
        if len(parts) == 1:
            return parts[0], runs
        return {name: np.concatenate([p[name] for p in parts]) for name in names}, runs

    def _observe(self, size: int, queue_seconds: list[float], run_seconds: float) -> None:
        self.stats.batches += 1
        self.stats.images += size
        for observer in self.observers:
            try:
                observer(size, queue_seconds, run_seconds)
            except Exception:  # a broken observer (metrics) must not stop inference
                log.exception("batch observer failed")

    async def _next(self) -> _Pending:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        return await self._queue.get()

    async def _gather(self) -> None:
        """Fill self._running: the first waiting request, then whatever fits (see the module doc)."""
        first = await self._next()
        self._running.append(first)
        size = len(first.batch)
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
                self._carry = item  # too big to join: it leads the next batch, ahead of later arrivals
                break
            self._running.append(item)
            size += len(item.batch)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._gather()
            live = [p for p in self._running if not p.future.done()]  # callers that left are skipped
            if live:
                await self._run_batch(loop, live)
            self._running = []

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, live: list[_Pending]) -> None:
        order = self.model.output_names  # the graph's outputs; those computed from them (ood_score) after them
        names = sorted({n for p in live for n in p.outputs}, key=lambda n: order.index(n) if n in order else len(order))
        start = time.perf_counter()
        try:
            batch = live[0].batch if len(live) == 1 else np.concatenate([p.batch for p in live])
            result = await loop.run_in_executor(self._executor, self.model.run, batch, names)
        except Exception as exc:  # one failed run fails its own callers, never the drain task
            if len(live) > 1:
                # Whatever broke it (a malformed input) should fail only its own caller: run them one by one.
                log.warning("batch of %d callers failed (%s); running them one at a time", len(live), exc)
                for p in live:
                    if not p.future.done():
                        await self._run_batch(loop, [p])
                return
            log.exception("inference failed")
            if not live[0].future.done():
                live[0].future.set_exception(exc)
            return
        self._observe(len(batch), [start - p.queued_at for p in live], time.perf_counter() - start)
        offset = 0
        for p in live:
            n = len(p.batch)
            if not p.future.done():
                p.future.set_result({k: result[k][offset : offset + n] for k in p.outputs})
            offset += n
