"""The adaptive batcher: gathering under concurrency, limits, cancellation, failures, shutdown, and
exact equality with unbatched inference on the real model. Behind the app: tests/app/test_batching_http.py."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, cast

import numpy as np
import pytest

from service.batching import Batcher
from service.errors import NotFound
from service.model import Model
from tests.support import LIMIT, model_folder
from tests.support import run_bounded as run


class GatedModel:
    """Stands in for Model: records each run, can hold each run until the test lets it go, fails on
    NaN input or a wrong shape.

    "probabilities" is each image's first ten pixels, so every caller can check it got its own rows."""

    output_names = ["probabilities", "doubled"]

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.values: list[list[float]] = []  # each run's images, by their (constant) value
        self.held = False  # while True, each run waits for a ticket from release()
        self.tickets = threading.Semaphore(0)
        self.entered = threading.Semaphore(0)  # released once per run that has started

    def check_outputs(self, names: Any) -> None:
        unknown = [n for n in names if n not in self.output_names]
        if unknown:
            raise NotFound(f"unknown output {unknown[0]!r}")

    def run(self, batch: np.ndarray, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        self.sizes.append(len(batch))
        self.values.append([round(float(image.flat[0]), 6) for image in batch])
        self.entered.release()
        if self.held:
            assert self.tickets.acquire(timeout=LIMIT), "the test never released this run"
        if batch.shape[1:] != (28, 28, 1):
            raise ValueError(f"wrong input shape {batch.shape}")
        if np.isnan(batch).any():
            raise ValueError("poisoned input")
        result = {"probabilities": batch.reshape(len(batch), -1)[:, :10].copy(), "doubled": batch * 2}
        return {k: result[k] for k in outputs or self.output_names}

    def release(self, hold_next: bool = False) -> None:
        """Let the run that is waiting go on; later runs wait too only if `hold_next`."""
        self.held = hold_next
        self.tickets.release()


def images(value: float, n: int = 1) -> np.ndarray:
    return np.full((n, 28, 28, 1), value, np.float32)


def batcher_for(model: GatedModel | Model, **kwargs: Any) -> tuple[Batcher, list[int]]:
    batcher = Batcher(cast(Model, model), **kwargs)
    sizes: list[int] = []
    batcher.observers.append(lambda size, queued, seconds: sizes.append(size))
    return batcher, sizes


async def until_running(model: GatedModel) -> None:
    """Wait (bounded) until a session run has started in the inference thread."""
    assert await asyncio.to_thread(model.entered.acquire, True, LIMIT), "no run started"


async def settle() -> None:
    for _ in range(5):  # a few loop turns: queued callers reach the queue
        await asyncio.sleep(0)


def test_concurrent_callers_are_gathered_into_one_run() -> None:
    model = GatedModel()
    batcher, sizes = batcher_for(model, max_batch_size=64)

    async def main() -> None:
        await batcher.start()
        model.held = True
        first = asyncio.create_task(batcher.run(images(0.5)))
        await until_running(model)  # the first runs alone and holds the inference thread...
        rest = [asyncio.create_task(batcher.run(images(i / 100))) for i in range(10)]
        await settle()
        model.release()  # ...while ten more queue up and are gathered into one run
        results = await asyncio.gather(first, *rest)
        for i, result in enumerate(results[1:]):
            assert np.all(result["probabilities"] == np.float32(i / 100))
        await batcher.stop()

    run(main)
    assert sizes == [1, 10] and model.sizes == [1, 10]
    assert batcher.stats.batches == 2 and batcher.stats.images == 11


def test_batches_never_exceed_max_size_and_a_caller_that_does_not_fit_goes_next() -> None:
    model = GatedModel()
    batcher, sizes = batcher_for(model, max_batch_size=8)

    async def main() -> list[float]:
        await batcher.start()
        model.held = True
        blocker = asyncio.create_task(batcher.run(images(0.0)))
        await until_running(model)
        # 3 images each: 3 + 3 fit in 8, the third caller does not and must lead the next batch.
        callers = [asyncio.create_task(batcher.run(images(k / 10, 3))) for k in range(1, 6)]
        await settle()
        model.release()
        await blocker
        results = await asyncio.gather(*callers)
        await batcher.stop()
        return [float(r["probabilities"][0, 0]) for r in results]

    firsts = run(main)
    assert firsts == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert sizes == [1, 6, 6, 3] and max(model.sizes) <= 8
    # Served in arrival order: the caller that did not fit was not pushed behind later ones.
    assert [sorted(set(run)) for run in model.values] == [[0.0], [0.1, 0.2], [0.3, 0.4], [0.5]]


def test_max_delay_waits_for_late_callers_and_no_longer() -> None:
    model = GatedModel()
    batcher, sizes = batcher_for(model, max_batch_size=64, max_delay_ms=300)

    async def main() -> float:
        await batcher.start()
        loop = asyncio.get_running_loop()
        start = loop.time()
        first = asyncio.create_task(batcher.run(images(0.1)))
        await asyncio.sleep(0.02)  # well inside the delay: joins the first caller's batch
        second = asyncio.create_task(batcher.run(images(0.2)))
        await asyncio.gather(first, second)
        elapsed = loop.time() - start
        await batcher.stop()
        return elapsed

    elapsed = run(main)
    assert sizes == [2]
    assert 0.25 <= elapsed < 5.0  # it waited for the deadline (nothing else came), then ran


def test_zero_delay_takes_only_what_is_queued() -> None:
    model = GatedModel()
    batcher, sizes = batcher_for(model, max_batch_size=64, max_delay_ms=0)

    async def main() -> None:
        await batcher.start()
        await batcher.run(images(0.1))
        await batcher.run(images(0.2))
        await batcher.stop()

    run(main)
    assert sizes == [1, 1]


def test_a_cancelled_caller_leaves_the_rest_of_its_batch_intact() -> None:
    model = GatedModel()
    batcher, sizes = batcher_for(model, max_batch_size=64)

    async def main() -> None:
        await batcher.start()
        model.held = True
        blocker = asyncio.create_task(batcher.run(images(0.0)))
        await until_running(model)
        # Five callers gathered into the next batch; one leaves before it runs, one while it runs.
        callers = [asyncio.create_task(batcher.run(images((k + 1) / 10))) for k in range(5)]
        await settle()
        callers[1].cancel()  # still queued: it must not even be run
        model.release(hold_next=True)
        await blocker
        await until_running(model)  # the second batch is in the inference thread now...
        callers[3].cancel()  # ...and this caller goes away mid-batch
        await settle()
        model.release()
        done = await asyncio.gather(*callers, return_exceptions=True)
        assert isinstance(done[1], asyncio.CancelledError) and isinstance(done[3], asyncio.CancelledError)
        for k in (0, 2, 4):
            result = done[k]
            assert isinstance(result, dict)
            assert result["probabilities"].shape == (1, 10)
            assert np.all(result["probabilities"] == np.float32((k + 1) / 10))  # its own row, not a neighbour's
            assert set(result) == {"probabilities", "doubled"}
        # The batcher still serves afterwards.
        after = await batcher.run(images(0.9), ["doubled"])
        assert set(after) == {"doubled"} and np.all(after["doubled"] == np.float32(1.8))
        await batcher.stop()

    run(main)
    assert sizes[:2] == [1, 4]  # the caller that left while queued was skipped


def test_a_caller_that_times_out_does_not_break_its_batch() -> None:
    model = GatedModel()
    batcher, _ = batcher_for(model)

    async def main() -> None:
        await batcher.start()
        model.held = True
        impatient = asyncio.create_task(asyncio.wait_for(batcher.run(images(0.1)), 0.05))
        patient = asyncio.create_task(batcher.run(images(0.2)))
        await until_running(model)  # both in one run, held
        with pytest.raises(TimeoutError):
            await impatient
        model.release()
        result = await patient
        assert np.all(result["probabilities"] == np.float32(0.2))
        await batcher.stop()

    run(main)


def test_a_failing_input_fails_only_its_caller_and_the_drain_task_survives() -> None:
    model = GatedModel()
    batcher, _ = batcher_for(model, max_batch_size=64)

    async def main() -> None:
        await batcher.start()
        model.held = True
        blocker = asyncio.create_task(batcher.run(images(0.0)))
        await until_running(model)
        good = [asyncio.create_task(batcher.run(images(v))) for v in (0.1, 0.2)]
        bad = asyncio.create_task(batcher.run(images(np.nan)))
        wrong_shape = asyncio.create_task(batcher.run(np.zeros((1, 14, 14, 1), np.float32)))
        await settle()
        model.release()
        await blocker
        with pytest.raises(ValueError, match="poisoned"):
            await bad
        with pytest.raises(ValueError, match="shape"):  # could not even be concatenated with the others
            await wrong_shape
        for task, value in zip(good, (0.1, 0.2), strict=True):
            assert np.all((await task)["probabilities"] == np.float32(value))
        assert batcher._task is not None and not batcher._task.done()
        assert np.all((await batcher.run(images(0.3)))["probabilities"] == np.float32(0.3))
        await batcher.stop()

    run(main)


def test_a_failing_observer_does_not_stop_inference() -> None:
    model = GatedModel()
    batcher, sizes = batcher_for(model)

    def broken(size: int, queued: list[float], seconds: float) -> None:
        raise RuntimeError("metrics backend down")

    batcher.observers.insert(0, broken)

    async def main() -> None:
        await batcher.start()
        for value in (0.1, 0.2):
            assert np.all((await batcher.run(images(value)))["probabilities"] == np.float32(value))
        await batcher.stop()

    run(main)
    assert sizes == [1, 1]


def test_stop_fails_waiting_callers_instead_of_stranding_them() -> None:
    model = GatedModel()
    batcher, _ = batcher_for(model, max_batch_size=4)

    async def main() -> list[BaseException | dict[str, np.ndarray]]:
        await batcher.start()
        model.held = True
        running = asyncio.create_task(batcher.run(images(0.1)))
        await until_running(model)
        queued = [asyncio.create_task(batcher.run(images(0.2, 3))) for _ in range(3)]  # one batch each
        await settle()
        await batcher.stop()
        results = await asyncio.gather(running, *queued, return_exceptions=True)
        model.release()  # let the abandoned run in the inference thread finish
        return results

    results = run(main)
    for result in results:
        assert isinstance(result, RuntimeError) and "shutting down" in str(result)


def test_unknown_outputs_are_refused_before_queueing() -> None:
    batcher, sizes = batcher_for(GatedModel())

    async def main() -> None:
        await batcher.start()
        with pytest.raises(NotFound):
            await batcher.run(images(0.1), ["nope"])
        await batcher.stop()

    run(main)
    assert sizes == []


def test_large_batches_bypass_the_queue_in_chunks_of_max_size() -> None:
    model = GatedModel()
    batcher, sizes = batcher_for(model, max_batch_size=8)
    batch = np.random.default_rng(0).random((20, 28, 28, 1), dtype=np.float32)

    async def main() -> dict[str, np.ndarray]:
        await batcher.start()
        result = await batcher.run(batch)
        await batcher.stop()
        return result

    result = run(main)
    assert sizes == [8, 8, 4]
    np.testing.assert_array_equal(result["doubled"], batch * 2)
    np.testing.assert_array_equal(result["probabilities"], batch.reshape(20, -1)[:, :10])


# ---- the real model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> Model:
    loaded = Model(model_folder(), providers=["cpu"])
    loaded.load()
    return loaded


def test_batched_results_equal_unbatched_exactly(model: Model, test_split) -> None:  # type: ignore[no-untyped-def]
    x = (test_split.images[:96].astype(np.float32) / 255.0)[..., None]
    single = [model.run(x[i : i + 1]) for i in range(len(x))]
    batcher, sizes = batcher_for(model, max_batch_size=32)

    async def main() -> list[dict[str, np.ndarray]]:
        await batcher.start()
        # Mixed outputs in one batch: some callers want every feature map, most only probabilities.
        wanted = [None if i % 7 == 0 else ["probabilities"] for i in range(len(x))]
        results = await asyncio.gather(*(batcher.run(x[i : i + 1], wanted[i]) for i in range(len(x))))
        await batcher.stop()
        return results

    results = run(main)
    assert max(sizes) > 1, f"nothing was gathered: {sizes}"
    assert max(sizes) <= 32 and sum(sizes) == len(x)
    for i, (got, want) in enumerate(zip(results, single, strict=True)):
        assert set(got) == ({"probabilities"} if i % 7 else set(model.output_names))
        for name, values in got.items():
            np.testing.assert_array_equal(values, want[name], err_msg=f"image {i}, output {name}")
