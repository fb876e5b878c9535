"""Memory a process may spend on requests, and work that stops when its request does.

`MemoryBudget` is one per process (the data plane owns it): every decode reserves its worst-case working
memory before it starts, judged from the header (width × height × bytes per pixel of the decoder's storage;
an array's declared size; a body's bytes as they arrive), waits a bounded time for room, and releases it
when done. Pillow's pixel limit is per image; a process decodes many images at once, so without this,
sixteen 115 KiB PNGs of 25-megapixel RGBA canvases cost gigabytes.

Cancellation: CPU work runs in worker threads (asyncio.to_thread), which a cancelled coroutine cannot stop.
The data plane sets a `threading.Event` in a context variable before the hop (to_thread copies the context
into the thread) and sets it when the awaiting coroutine is cancelled; long work calls `check_cancelled()`
between items, and budget waits give up at once.

Framework-free: errors are service.errors classes; nothing here knows about HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar

from service.errors import Busy, TooLarge

log = logging.getLogger("service.memory")

MIB = 1024 * 1024
# Budget waits wake at least this often to see whether their request was cancelled.
_POLL_S = 0.05
# After the reservations of a burst are all released, give freed heap memory back to the system
# (malloc_trim) once the burst had reserved at least this much.
TRIM_AFTER_BYTES = 32 * MIB


class Cancelled(Exception):
    """The request this work belongs to was cancelled (timeout, client gone): stop, nobody is waiting."""


_cancel: ContextVar[threading.Event | None] = ContextVar("fashion_serve_cancel", default=None)


def cancel_token() -> threading.Event | None:
    """The current request's cancellation flag (None outside a cancellable hop)."""
    return _cancel.get()


def check_cancelled() -> None:
    """Raise Cancelled when the work's request was cancelled; call it between items of long work."""
    token = _cancel.get()
    if token is not None and token.is_set():
        raise Cancelled("request cancelled")


@contextlib.contextmanager
def cancellable() -> Iterator[threading.Event]:
    """A fresh cancellation flag, current in this context (and in threads started from it) until exit."""
    token = threading.Event()
    reset = _cancel.set(token)
    try:
        yield token
    finally:
        _cancel.reset(reset)


def mib(nbytes: float) -> str:
    return f"{nbytes / MIB:,.1f} MiB" if nbytes < 10 * MIB else f"{nbytes / MIB:,.0f} MiB"


class Reservation:
    """Bytes held from a budget until `release()` (or the end of a `with` block); may `grow`."""

    __slots__ = ("_budget", "nbytes")

    def __init__(self, budget: MemoryBudget | None, nbytes: int) -> None:
        self._budget = budget
        self.nbytes = nbytes

    def grow(self, nbytes: int, what: str, wait_s: float) -> None:
        """Hold `nbytes` more (a thread may wait, as MemoryBudget.reserve)."""
        if self._budget is not None and nbytes > 0:
            self._budget._acquire(nbytes, what, wait_s, total=self.nbytes + nbytes)
            self.nbytes += nbytes

    def try_grow(self, nbytes: int) -> bool:
        """Hold `nbytes` more if there is room now; never waits."""
        if self._budget is None or nbytes <= 0:
            return True
        if not self._budget._try(nbytes):
            return False
        self.nbytes += nbytes
        return True

    def release(self) -> None:
        budget, self._budget = self._budget, None
        if budget is not None:
            budget._release(self.nbytes)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


class MemoryBudget:
    """At most `limit` bytes reserved at once in this process. Thread-safe; usable from threads (blocking
    waits) and from the event loop (`reserve_async`). A reservation that fits is granted at once, whoever
    else is waiting: small requests are never queued behind a huge one."""

    def __init__(self, limit: int, wait_s: float = 5.0, retry_after_s: int = 1) -> None:
        if limit < 1:
            raise ValueError("the memory budget must be at least 1 byte")
        self.limit = limit
        self.wait_s = wait_s
        self.retry_after_s = retry_after_s
        self.used = 0
        self.peak = 0
        self.refused = 0  # 503s: no room within the wait
        self.too_large = 0  # 413s: could never fit
        self._burst = 0  # most reserved since the last trim
        self._lock = threading.Condition(threading.Lock())
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    # ------------------------------------------------------------------------------------------ public

    def reserve(self, nbytes: int, what: str, wait_s: float | None = None) -> Reservation:
        """Hold `nbytes`, waiting up to `wait_s` (default: the budget's) for room. TooLarge (413) when it
        can never fit, Busy (503, Retry-After) when no room came in time, Cancelled when the current
        request was cancelled meanwhile. Blocks: call it from a worker thread, never the event loop."""
        nbytes = max(0, int(nbytes))
        self._acquire(nbytes, what, self.wait_s if wait_s is None else wait_s, total=nbytes)
        return Reservation(self, nbytes)

    def hold(self) -> Reservation:
        """An empty reservation, to `try_grow`/`grow` as bytes arrive."""
        return Reservation(self, 0)

    def try_reserve(self, nbytes: int) -> Reservation | None:
        nbytes = max(0, int(nbytes))
        return Reservation(self, nbytes) if self._try(nbytes) else None

    async def reserve_async(self, nbytes: int, what: str, wait_s: float | None = None) -> Reservation:
        """`reserve` for the event loop: waits without blocking it."""
        nbytes = max(0, int(nbytes))
        self._check_fits(nbytes, what, nbytes)
        if self._try(nbytes):
            return Reservation(self, nbytes)
        wait = self.wait_s if wait_s is None else wait_s
        deadline = time.monotonic() + wait
        loop = asyncio.get_running_loop()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._busy(what, nbytes, wait)
            future: asyncio.Future[None] = loop.create_future()
            with self._lock:
                if self.used + nbytes <= self.limit:
                    self._take(nbytes)
                    return Reservation(self, nbytes)
                self._async_waiters.append((loop, future))
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await future
            finally:
                with self._lock, contextlib.suppress(ValueError):
                    self._async_waiters.remove((loop, future))

    async def grow_async(self, reservation: Reservation, nbytes: int, what: str, wait_s: float | None = None) -> None:
        """Hold `nbytes` more on `reservation`, waiting on the event loop."""
        if reservation._budget is None or nbytes <= 0:
            return
        self._check_fits(nbytes, what, reservation.nbytes + nbytes)
        if reservation.try_grow(nbytes):
            return
        extra = await self.reserve_async(nbytes, what, wait_s)
        extra._budget = None  # merged into `reservation`, released with it
        reservation.nbytes += nbytes

    @property
    def free(self) -> int:
        return self.limit - self.used

    # ------------------------------------------------------------------------------------------ inside

    def _check_fits(self, nbytes: int, what: str, total: int) -> None:
        if total > self.limit:
            self.too_large += 1
            raise TooLarge(
                f"{what} needs {mib(total)} of memory, more than this server's budget of {mib(self.limit)} per "
                "process: it can never be served here"
            )

    def _busy(self, what: str, nbytes: int, wait_s: float) -> Busy:
        self.refused += 1
        return Busy(
            f"server busy: no room for {what} ({mib(nbytes)} of memory) within {wait_s:g} s; retry later",
            retry_after_s=self.retry_after_s,
        )

    def _take(self, nbytes: int) -> None:  # with the lock held
        self.used += nbytes
        self.peak = max(self.peak, self.used)
        self._burst = max(self._burst, self.used)

    def _try(self, nbytes: int) -> bool:
        with self._lock:
            if self.used + nbytes > self.limit:
                return False
            self._take(nbytes)
            return True

    def _acquire(self, nbytes: int, what: str, wait_s: float, total: int) -> None:
        self._check_fits(nbytes, what, total)
        deadline = time.monotonic() + wait_s
        with self._lock:
            while self.used + nbytes > self.limit:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._busy(what, nbytes, wait_s)
                check_cancelled()
                self._lock.wait(min(remaining, _POLL_S))
            self._take(nbytes)

    def _release(self, nbytes: int) -> None:
        trim = False
        with self._lock:
            self.used -= nbytes
            if self.used == 0 and self._burst >= TRIM_AFTER_BYTES:
                self._burst, trim = 0, True
            self._lock.notify_all()
            waiters, self._async_waiters = self._async_waiters, []
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # a loop that has closed meanwhile
                loop.call_soon_threadsafe(_wake, future)
        if trim:
            release_free_memory()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# -------------------------------------------------------------------------------------- the allocator

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# Allocations from this size up get their own mapping, returned to the system when freed. glibc's default
# starts at 128 KiB but rises to the largest block freed (up to 32 MiB), after which Pillow's 16 MiB image
# blocks come from the heap, where freed memory mostly stays: RSS stayed gigabytes above idle after bursts.
MMAP_THRESHOLD = 1 * MIB
# Per-thread heaps (glibc makes up to 8 per core), each keeping its own free memory: a few are enough here.
ARENA_MAX = 2
TRIM_THRESHOLD = 8 * MIB


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None  # glibc only


_LIBC = _libc()
_trim_lock = threading.Lock()


def tune_allocator() -> bool:
    """Make freed memory go back to the system (see MMAP_THRESHOLD, ARENA_MAX). Process-wide and idempotent;
    False where the C library is not glibc (nothing to tune, or nothing this knows how to)."""
    if _LIBC is None:
        return False
    ok = all(
        _LIBC.mallopt(param, value)
        for param, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (_M_ARENA_MAX, ARENA_MAX),
        )
    )
    return bool(ok)


def release_free_memory() -> None:
    """malloc_trim(0): hand the heaps' free pages back to the system, in a background thread (it walks the
    heaps: milliseconds after a burst). One at a time; a trim already running covers the next."""
    if _LIBC is None or not _trim_lock.acquire(blocking=False):
        return

    def trim() -> None:
        try:
            _LIBC.malloc_trim(0)  # type: ignore[union-attr]
        finally:
            _trim_lock.release()

    threading.Thread(target=trim, name="malloc-trim", daemon=True).start()
