"""service.memory: the per-process memory budget (threads and the event loop), cancellation of work in worker
threads, the allocator settings; and imaging.decode_cost against what decoding really takes (peak RSS)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import pytest

from service import memory
from service.errors import Busy, TooLarge
from service.memory import MIB, Cancelled, MemoryBudget
from tests.support import CANVAS_KINDS, ROOT, png_strip


def test_reserve_release_and_the_two_refusals() -> None:
    budget = MemoryBudget(100, wait_s=0.05)
    with budget.reserve(60, "a"):
        assert budget.used == 60
        with pytest.raises(Busy) as busy:
            budget.reserve(50, "b")  # would fit alone, not now: 503 after the wait
        assert busy.value.status_code == 503 and busy.value.headers == {"Retry-After": "1"}
        assert "no room for b" in busy.value.message
        small = budget.reserve(40, "c")  # fits now: granted at once
        small.release()
        small.release()  # idempotent
    assert budget.used == 0 and budget.peak == 100
    with pytest.raises(TooLarge) as large:
        budget.reserve(101, "a 101-byte thing")  # can never fit: 413 at once, no wait
    assert large.value.status_code == 413 and "a 101-byte thing needs" in large.value.message
    assert budget.refused == 1 and budget.too_large == 1


def test_a_waiting_thread_gets_room_when_it_is_released() -> None:
    budget = MemoryBudget(100, wait_s=5)
    first = budget.reserve(80, "first")
    got: list[float] = []

    def waiter() -> None:
        start = time.monotonic()
        with budget.reserve(50, "second"):
            got.append(time.monotonic() - start)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.2)
    assert not got
    first.release()
    thread.join(5)
    assert got and 0.15 < got[0] < 2


def test_small_requests_are_not_queued_behind_a_big_one() -> None:
    budget = MemoryBudget(100, wait_s=2)
    held = budget.reserve(60, "held")
    big_done = threading.Event()

    def big() -> None:
        with pytest.raises(Busy):
            budget.reserve(90, "big", wait_s=0.5)
        big_done.set()

    thread = threading.Thread(target=big)
    thread.start()
    time.sleep(0.05)
    start = time.monotonic()
    with budget.reserve(30, "small"):
        assert time.monotonic() - start < 0.05
    thread.join(5)
    held.release()
    assert big_done.is_set()


def test_grow_and_try_grow() -> None:
    budget = MemoryBudget(100, wait_s=0.05)
    with budget.hold() as reservation:
        assert reservation.try_grow(70) and budget.used == 70
        assert not reservation.try_grow(40) and budget.used == 70
        with pytest.raises(TooLarge):
            reservation.grow(31, "growing past the budget", 0.01)  # 101 in all: never
        with pytest.raises(Busy), budget.reserve(20, "other"):
            reservation.grow(20, "growing", 0.05)
        reservation.grow(10, "growing", 0.05)
        assert reservation.nbytes == 80
    assert budget.used == 0


def test_async_waiters_wake_when_a_thread_releases() -> None:
    budget = MemoryBudget(100, wait_s=5)

    async def main() -> tuple[float, int]:
        held = budget.reserve(90, "held")
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, lambda: threading.Thread(target=held.release).start())
        start = time.monotonic()
        reservation = await budget.reserve_async(50, "async")
        waited = time.monotonic() - start
        await budget.grow_async(reservation, 20, "async grow")
        size = reservation.nbytes
        reservation.release()
        with pytest.raises(Busy), budget.reserve(90, "again"):
            await budget.reserve_async(20, "no room", wait_s=0.1)
        return waited, size

    waited, size = asyncio.run(main())
    assert 0.15 < waited < 2 and size == 70 and budget.used == 0


def test_a_cancelled_request_stops_waiting_and_checking() -> None:
    budget = MemoryBudget(100, wait_s=10)
    held = budget.reserve(100, "held")
    outcome: list[BaseException] = []
    with memory.cancellable() as token:

        def work() -> None:
            try:
                budget.reserve(50, "waiting")
            except BaseException as exc:  # noqa: BLE001 (recorded for the assertion)
                outcome.append(exc)

        import contextvars

        thread = threading.Thread(target=contextvars.copy_context().run, args=(work,))
        start = time.monotonic()
        thread.start()
        time.sleep(0.1)
        token.set()
        thread.join(5)
        assert time.monotonic() - start < 1
        with pytest.raises(Cancelled):
            memory.check_cancelled()
    memory.check_cancelled()  # outside the block: no token, nothing to stop
    held.release()
    assert outcome and isinstance(outcome[0], Cancelled)


def test_cancelling_the_awaiting_coroutine_stops_the_threads_work() -> None:
    """DataPlane.off_loop's pattern: the token set on cancellation is seen by the thread between items."""
    from service.dataplane import DataPlane
    from tests.support import make_settings

    plane = DataPlane(make_settings())
    done: list[int] = []

    def long_work() -> None:
        for i in range(100):
            memory.check_cancelled()
            time.sleep(0.02)
            done.append(i)

    async def main() -> None:
        task = asyncio.ensure_future(plane.off_loop(long_work))
        await asyncio.sleep(0.15)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.2)

    asyncio.run(main())
    assert 3 <= len(done) <= 20, len(done)  # stopped within an item of the cancellation, not after 100


def test_allocator_is_tuned_on_glibc() -> None:
    if memory._LIBC is None:
        pytest.skip("not glibc: nothing to tune")  # the server runs on Debian's glibc in its image
    assert memory.tune_allocator()
    memory.release_free_memory()


# ----------------------------------------------------------------- decode_cost against the real peak

PEAK_PROBE = """
import json, sys
from service import imaging, memory
from tests import support

memory.tune_allocator()  # as the server does: freed memory leaves, so each decode starts from a trimmed heap

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0

out = {}
for kind in sys.argv[1:]:
    data = support.png_strip() if kind == "strip" else support.canvas(kind)
    limits = imaging.ImageLimits()
    image = imaging._open(data, limits)
    cost = imaging.decode_cost(*image.size, image.mode, image.format)
    image.close()
    del image
    if memory._LIBC is not None:
        memory._LIBC.malloc_trim(0)
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
    base = rss("VmRSS:")
    imaging.preprocess(data, limits)
    out[kind] = {"peak": rss("VmHWM:") - base, "cost": cost}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_decode_cost_covers_the_real_peak_of_every_kind() -> None:
    """Each 25-megapixel canvas decoded in a fresh process: the peak RSS it adds stays within what
    decode_cost reserved for it (and not wildly above: the budget would refuse what it could serve)."""
    kinds = [kind for kind, *_ in CANVAS_KINDS] + ["strip"]
    png_strip()
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_PROBE, *kinds], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout)
    lines = [f"{k}: peak {v['peak'] / MIB:.0f} MiB, reserved {v['cost'] / MIB:.0f} MiB" for k, v in measured.items()]
    print("\n" + "\n".join(lines))
    for kind, figures in measured.items():
        assert figures["peak"] <= figures["cost"] + 8 * MIB, (kind, figures)
        assert figures["cost"] <= 3 * figures["peak"] + 64 * MIB, (kind, figures)
