"""The model repository against a real `python -m service`: two models and three versions side by side; new
versions rolled in under a closed-loop load, by polling and by the repository API, with no failed request
and every answer from one whole version; a corrupt version that changes nothing until it is fixed;
unloading under load; tritonclient's repository and statistics calls; two workers following the API; and
the memory three loaded versions take beside one.

Every loop is bounded in time and in count, on loopback only. LOAD_SECONDS (default 20) is how long each
closed loop runs."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.support import MODEL_NAME, Server, model_version, png_bytes, reference_of, running_server

OTHER = "fashion-mnist-b"
LOAD_SECONDS = float(os.environ.get("LOAD_SECONDS", "20"))
CONCURRENCY = 16
MAX_REQUESTS = 200_000  # a bound on every loop besides its time
PNG = {"content-type": "image/png"}
NPY = {"content-type": "application/x-npy"}


@pytest.fixture(scope="module")
def images(test_split) -> np.ndarray:  # type: ignore[no-untyped-def]
    return test_split.images[300:316]


@pytest.fixture(scope="module")
def pngs(images: np.ndarray) -> list[bytes]:
    return [png_bytes(p) for p in images]


def serve(folder: Path, repository: Path, **settings: Any) -> Any:
    """A real server on `repository`, every model in it (no `model` setting), one worker unless told."""
    return running_server(folder, models=repository, model=None, **settings)


# ------------------------------------------------------------------------------ the closed loop


@dataclass(frozen=True)
class Answer:
    index: int  # which image (or, for batches, the first of which)
    started: float
    ended: float
    status: int  # 0: no HTTP answer at all
    version: str | None
    probabilities: list[Any] | None  # one image's, or a batch's rows
    error: str | None


class ClosedLoop:
    """`concurrency` clients, each sending its next request when its last is answered, for `seconds` (and at
    most MAX_REQUESTS), in a thread of its own, so that the test can change the repository meanwhile.
    `batch`: each request is a .npy array of `batch` images to the batch route."""

    def __init__(
        self,
        url: str,
        path: str,
        pngs: list[bytes],
        images: np.ndarray,
        seconds: float,
        concurrency: int,
        batch: int = 0,
    ) -> None:
        self.url, self.path, self.pngs, self.images = url, path, pngs, images
        self.seconds, self.concurrency, self.batch = seconds, concurrency, batch
        self.answers: list[Answer] = []
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> ClosedLoop:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._thread.join(self.seconds + 120)
        assert not self._thread.is_alive(), "the load generator did not stop"

    def _body(self, index: int) -> tuple[bytes, dict[str, str]]:
        if not self.batch:
            return self.pngs[index], PNG
        buffer = io.BytesIO()
        np.save(buffer, np.roll(self.images, -index, axis=0)[: self.batch])
        return buffer.getvalue(), NPY

    async def _run(self) -> None:
        deadline = self.started + self.seconds
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(base_url=self.url, timeout=60, limits=limits) as client:

            async def one_client(k: int) -> None:
                n = k
                while time.monotonic() < deadline and len(self.answers) < MAX_REQUESTS:
                    index, n = n % len(self.pngs), n + self.concurrency
                    content, headers = self._body(index)
                    started = time.monotonic()
                    try:
                        response = await client.post(self.path, content=content, headers=headers)
                    except httpx.HTTPError as exc:
                        self.answers.append(Answer(index, started, time.monotonic(), 0, None, None, repr(exc)))
                        continue
                    ended = time.monotonic()
                    body = response.json() if response.headers.get("content-type") == "application/json" else {}
                    rows = (
                        [r.get("probabilities") for r in body.get("results", [])]
                        if self.batch
                        else body.get("probabilities")
                    )
                    version = body.get("model_version")
                    answer = Answer(index, started, ended, response.status_code, version, rows, body.get("error"))
                    self.answers.append(answer)

            await asyncio.gather(*(one_client(k) for k in range(self.concurrency)))


def load(
    server: Server, pngs: list[bytes], images: np.ndarray, path: str = "/v1/predict", **options: Any
) -> ClosedLoop:
    options.setdefault("seconds", LOAD_SECONDS)
    options.setdefault("concurrency", CONCURRENCY)
    return ClosedLoop(server.url, path, pngs, images, **options)


def whole_versions(answers: list[Answer], references: dict[str, np.ndarray], batch: int = 0) -> Counter[str]:
    """No failed request, and every answer from one whole version: its probabilities, bit for bit, are those
    of the version it names (onnxruntime run directly on that version's file)."""
    failed = [a for a in answers if a.status != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed, e.g. {failed[:3]}"
    expected = {v: r.tolist() for v, r in references.items()}
    for answer in answers:
        assert answer.version in expected, answer
        want = expected[answer.version]
        rows = np.roll(np.arange(len(want)), -answer.index)[:batch] if batch else [answer.index]
        got = answer.probabilities if batch else [answer.probabilities]
        assert got == [want[i] for i in rows], f"an answer says version {answer.version} but is not that version's"
    return Counter(a.version for a in answers if a.version is not None)


def switched(answers: list[Answer], old: str, new: str) -> float:
    """When the first answer from `new` came back; no request sent after that was answered by `old`."""
    first = min((a.ended for a in answers if a.version == new), default=None)
    assert first is not None, f"no answer from version {new}"
    late = [a for a in answers if a.version == old and a.started > first]
    assert not late, f"{len(late)} requests sent after the switch were answered by version {old}"
    return first


def metric(server: Server, name: str, **labels: str) -> float | None:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    found = re.search(rf"^{name}\{{{re.escape(wanted)}\}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else None


def index(server: Server) -> dict[tuple[str, str], dict[str, str]]:
    response = httpx.post(server.url + "/v2/repository/index", timeout=10)
    assert response.status_code == 200, response.text
    return {(e["name"], e.get("version", "")): e for e in response.json()}


def wait_for(check: Any, timeout: float = 20.0, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every)


def report(what: str, answers: list[Answer], versions: Counter[str]) -> None:
    span = max(a.ended for a in answers) - min(a.started for a in answers)
    print(f"{what}: {len(answers)} requests in {span:.1f} s, 0 failed, answers by version {dict(versions)}")


# ------------------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """Two models and three versions: the committed model as version 1, a different model as version 2 (its
    config.json keeps the two latest), and another model."""
    root = tmp_path_factory.mktemp("side-by-side")
    repository = root / "repository"
    model_version(repository / MODEL_NAME / "1")
    model_version(repository / MODEL_NAME / "2", scale=1.5)
    (repository / MODEL_NAME / "config.json").write_text(json.dumps({"version_policy": {"latest": 2}}))
    model_version(repository / OTHER / "1", scale=0.5)
    with serve(root / "server", repository) as server:
        yield server, repository


def test_two_models_three_versions_side_by_side(side_by_side: tuple[Server, Path], images: np.ndarray) -> None:
    server, repository = side_by_side
    served = [(MODEL_NAME, "1"), (MODEL_NAME, "2"), (OTHER, "1")]
    references = {key: reference_of(repository / key[0] / key[1], images) for key in served}
    assert len({r.tobytes() for r in references.values()}) == 3  # three genuinely different models
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for (name, version), want in references.items():
            for pixels, expected in zip(images[:4], want, strict=False):
                body = http.post(
                    f"/v1/models/{name}/versions/{version}/predict", content=png_bytes(pixels), headers=PNG
                )
                assert (body.json()["model"], body.json()["model_version"]) == (name, version)
                assert body.json()["probabilities"] == expected.tolist()
            tensor = {
                "name": "image",
                "datatype": "UINT8",
                "shape": [len(images), 28, 28],
                "data": images.ravel().tolist(),
            }
            v2 = http.post(f"/v2/models/{name}/versions/{version}/infer", json={"inputs": [tensor]}).json()
            assert (v2["model_name"], v2["model_version"]) == (name, version)
            assert np.array_equal(np.array(v2["outputs"][0]["data"], np.float32).reshape(-1, 10), want)
            assert http.get(f"/v2/models/{name}/versions/{version}/ready").status_code == 200
        short = http.post("/v1/predict", content=png_bytes(images[0]), headers=PNG).json()
        assert (short["model"], short["model_version"]) == (MODEL_NAME, "2")  # the default model, highest version
        assert http.get(f"/v2/models/{MODEL_NAME}").json()["versions"] == ["2", "1"]
        assert http.get(f"/v2/models/{MODEL_NAME}/versions/10/ready").status_code == 404


def test_three_versions_take_little_more_memory_than_one(
    side_by_side: tuple[Server, Path], tmp_path: Path, pngs: list[bytes]
) -> None:
    """VmRSS after warm-up and a few requests to each loaded version: three versions (two models) within
    1.5 times one version's."""
    three, _ = side_by_side
    repository = tmp_path / "repository"
    model_version(repository / MODEL_NAME / "1")

    def settled_rss(server: Server, paths: list[str]) -> int:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            for path in paths:
                for body in pngs[:8]:
                    assert http.post(path, content=body, headers=PNG).status_code == 200
        time.sleep(0.5)
        return server.rss_kib()

    by_version = [
        f"/v1/models/{name}/versions/{version}/predict"
        for name, version in [(MODEL_NAME, "1"), (MODEL_NAME, "2"), (OTHER, "1")]
    ]
    rss_three = settled_rss(three, by_version)
    with serve(tmp_path / "server", repository) as one:
        rss_one = settled_rss(one, [f"/v1/models/{MODEL_NAME}/versions/1/predict"])
    print(
        f"VmRSS: one version {rss_one / 1024:.1f} MiB, three versions (two models) {rss_three / 1024:.1f} MiB, "
        f"{rss_three / rss_one:.2f}x"
    )
    assert rss_three <= 1.5 * rss_one


def test_polling_rolls_in_a_new_version_under_load(tmp_path: Path, images: np.ndarray, pngs: list[bytes]) -> None:
    repository = tmp_path / "repository"
    model_version(repository / MODEL_NAME / "1")
    staged = model_version(tmp_path / "staging" / "2", scale=1.5)  # built outside, then renamed in at once
    references = {"1": reference_of(repository / MODEL_NAME / "1", images), "2": reference_of(staged, images)}
    with serve(tmp_path / "server", repository, poll_interval_s=0.5) as server:
        with load(server, pngs, images) as loop:
            time.sleep(LOAD_SECONDS / 4)
            dropped = time.monotonic()
            staged.rename(repository / MODEL_NAME / "2")
        log = server.output()
    versions = whole_versions(loop.answers, references)
    first = switched(loop.answers, "1", "2")
    assert versions["1"] > 0 and versions["2"] > 0 and first - dropped < 10
    assert not [a for a in loop.answers if a.version == "2" and a.ended < dropped]  # (sent is not yet read)
    assert re.search(rf"model {MODEL_NAME} version 1 drained, released", log), log[-2000:]
    report("polling", loop.answers, versions)


def test_the_load_api_rolls_in_a_new_version_under_load(tmp_path: Path, images: np.ndarray, pngs: list[bytes]) -> None:
    repository = tmp_path / "repository"
    model_version(repository / MODEL_NAME / "1")
    staged = model_version(tmp_path / "staging" / "2", scale=1.5)
    references = {"1": reference_of(repository / MODEL_NAME / "1", images), "2": reference_of(staged, images)}
    # No polling: only the API changes what is served.
    with serve(tmp_path / "server", repository) as server, load(server, pngs, images) as loop:
        time.sleep(LOAD_SECONDS / 5)
        staged.rename(repository / MODEL_NAME / "2")
        time.sleep(LOAD_SECONDS / 5)
        asked = time.monotonic()
        response = httpx.post(f"{server.url}/v2/repository/models/{MODEL_NAME}/load", json={}, timeout=60)
        loaded = time.monotonic()
        assert response.status_code == 200, response.text
    versions = whole_versions(loop.answers, references)
    switched(loop.answers, "1", "2")
    assert not [a for a in loop.answers if a.version == "2" and a.ended < asked]  # nothing before it was asked
    assert not [a for a in loop.answers if a.version == "1" and a.started > loaded]  # all of it after
    assert versions["1"] > 0 and versions["2"] > 0
    report("load API", loop.answers, versions)


def test_a_corrupt_version_changes_nothing_until_it_is_fixed(
    tmp_path: Path, images: np.ndarray, pngs: list[bytes]
) -> None:
    repository = tmp_path / "repository"
    model_version(repository / MODEL_NAME / "1")
    staged = model_version(tmp_path / "staging" / "2", scale=1.5)
    references = {"1": reference_of(repository / MODEL_NAME / "1", images), "2": reference_of(staged, images)}
    good = (staged / "model.onnx").read_bytes()
    broken = bytearray(good)
    broken[len(broken) // 2] ^= 0xFF
    (staged / "model.onnx").write_bytes(bytes(broken))
    target = repository / MODEL_NAME / "2"
    with serve(tmp_path / "server", repository, poll_interval_s=0.5) as server:
        with load(server, pngs, images) as loop:
            time.sleep(LOAD_SECONDS / 6)
            staged.rename(target)
            entry = wait_for(
                lambda: index(server).get((MODEL_NAME, "2"), {}).get("state") == "UNAVAILABLE" and index(server)
            )
            assert "does not match the card" in entry[MODEL_NAME, "2"]["reason"]
            assert entry[MODEL_NAME, "1"]["state"] == "READY"
            assert metric(server, "model_load_failures_total", model=MODEL_NAME, version="2") == 1.0
            time.sleep(LOAD_SECONDS / 4)  # many polls: the same files are not tried again, version 1 serves on
            assert metric(server, "model_load_failures_total", model=MODEL_NAME, version="2") == 1.0
            fixed = time.monotonic()
            (target / "model.onnx").write_bytes(good)  # in place: a poll may see it half written, and retry
            wait_for(lambda: any(a.version == "2" for a in loop.answers[-50:]))
        log = server.errors()
    versions = whole_versions(loop.answers, references)
    switched(loop.answers, "1", "2")
    assert not [a for a in loop.answers if a.version == "2" and a.ended < fixed]
    assert "failed to load" in log and "does not match the card" in log
    report("corrupt, then fixed", loop.answers, versions)


def test_unloading_under_load_finishes_the_requests_in_flight(
    tmp_path: Path, images: np.ndarray, pngs: list[bytes]
) -> None:
    repository = tmp_path / "repository"
    model_version(repository / MODEL_NAME / "1")
    model_version(repository / MODEL_NAME / "2", scale=1.5)
    (repository / MODEL_NAME / "config.json").write_text(json.dumps({"version_policy": "all"}))
    model_version(repository / OTHER / "1", scale=0.5)
    references = {"1": reference_of(repository / OTHER / "1", images)}
    seconds = min(LOAD_SECONDS, 8.0)
    with serve(tmp_path / "server", repository) as server:
        singles = load(server, pngs, images, f"/v1/models/{OTHER}/predict", seconds=seconds, concurrency=12)
        batches = load(
            server, pngs, images, f"/v1/models/{OTHER}/predict/batch", seconds=seconds, concurrency=4, batch=256
        )
        with singles, batches:
            time.sleep(seconds / 3)
            asked = time.monotonic()
            response = httpx.post(f"{server.url}/v2/repository/models/{OTHER}/unload", json={}, timeout=60)
            unloaded = time.monotonic()
            assert response.status_code == 200, response.text
            assert httpx.get(f"{server.url}/v2/models/{OTHER}/versions/1/ready").status_code == 404
        entries = index(server)
        # One version of a model, through the load API's version policy (Triton's way): version 1 goes.
        config = json.dumps({"version_policy": {"specific": {"versions": [2]}}})
        answer = httpx.post(
            f"{server.url}/v2/repository/models/{MODEL_NAME}/load", json={"parameters": {"config": config}}
        )
        assert answer.status_code == 200, answer.text
        one = httpx.post(f"{server.url}/v1/models/{MODEL_NAME}/versions/1/predict", content=pngs[0], headers=PNG)
        two = httpx.post(f"{server.url}/v1/models/{MODEL_NAME}/versions/2/predict", content=pngs[0], headers=PNG)
        assert (one.status_code, two.status_code) == (404, 200)
        log = server.errors()
    answers = singles.answers + batches.answers
    assert {a.status for a in answers} <= {200, 404}, Counter(a.status for a in answers)
    served = [a for a in singles.answers if a.status == 200]
    whole_versions(served, references)
    whole_versions([a for a in batches.answers if a.status == 200], references, batch=256)
    after = [a for a in answers if a.started > unloaded]
    assert after and all(a.status == 404 and "not loaded" in (a.error or "") for a in after)
    in_flight = [a for a in batches.answers if a.started < asked < a.ended and a.status == 200]
    assert in_flight, "no batch request was in flight during the unload"
    assert entries[OTHER, "1"] == {"name": OTHER, "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}
    assert f"model {OTHER} version 1 drained, released" in log
    print(f"unload: {len(served)} answered before, {len(in_flight)} batches in flight finished, {len(after)} 404 after")


def test_tritonclient_repository_and_statistics(tmp_path: Path, images: np.ndarray) -> None:
    repository = tmp_path / "repository"
    model_version(repository / MODEL_NAME / "1")
    model_version(repository / OTHER / "1", scale=0.5)
    want = reference_of(repository / OTHER / "1", images)
    x = (images.astype(np.float32) / 255.0)[..., None]
    with serve(tmp_path / "server", repository) as server:
        client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
        try:
            listed = client.get_model_repository_index()
            assert sorted((e["name"], e["version"], e["state"]) for e in listed) == sorted(
                [(MODEL_NAME, "1", "READY"), (OTHER, "1", "READY")]
            )
            for _ in range(3):
                tensor = triton.InferInput("image", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                result = client.infer(OTHER, [tensor], outputs=[triton.InferRequestedOutput("probabilities")])
                assert np.array_equal(result.as_numpy("probabilities"), want)
            stats = client.get_inference_statistics(OTHER)["model_stats"]
            assert [(s["name"], s["version"]) for s in stats] == [(OTHER, "1")]
            assert stats[0]["inference_count"] == 3 * len(images)
            assert stats[0]["inference_stats"]["success"]["count"] == 3
            assert stats[0]["inference_stats"]["compute_infer"]["ns"] > 0
            assert client.get_inference_statistics(OTHER, "1")["model_stats"] == stats
            everything = client.get_inference_statistics()["model_stats"]
            assert {s["name"] for s in everything} == {MODEL_NAME, OTHER}

            client.unload_model(OTHER)
            assert not client.is_model_ready(OTHER)
            entries = {(e["name"], e.get("version")): e for e in client.get_model_repository_index()}
            assert entries[OTHER, "1"]["state"] == "UNAVAILABLE" and entries[OTHER, "1"]["reason"] == "unloaded"
            with pytest.raises(InferenceServerException) as caught:
                client.infer(OTHER, [tensor])
            assert caught.value.status() == "404"
            client.load_model(OTHER)
            assert client.is_model_ready(OTHER) and client.is_model_ready(OTHER, "1")
            client.load_model(OTHER, config=json.dumps({"version_policy": {"all": {}}}))
            assert client.get_model_metadata(OTHER)["versions"] == ["1"]
            with pytest.raises(InferenceServerException) as caught:
                client.load_model("no-such-model")
            assert caught.value.status() == "404" and "no-such-model" in caught.value.message()
        finally:
            client.close()


def test_two_workers_follow_the_api(tmp_path: Path, pngs: list[bytes]) -> None:
    """Each worker has its own repository; what the API asks one of them reaches the other through the
    state file the workers share: both serve the new version, both unload, both load again."""
    repository = tmp_path / "repository"
    model_version(repository / MODEL_NAME / "1")
    staged = model_version(tmp_path / "staging" / "2", scale=1.5)
    with serve(tmp_path / "server", repository, workers=2) as server:
        staged.rename(repository / MODEL_NAME / "2")

        def fresh_connections(path: str, count: int = 24) -> list[httpx.Response]:
            responses = []
            for _ in range(count):  # a new connection each, so that the kernel hands them to both workers
                with httpx.Client(base_url=server.url, timeout=10) as http:
                    responses.append(
                        http.post(path, content=pngs[0], headers=PNG) if "predict" in path else http.get(path)
                    )
            return responses

        load_url = f"{server.url}/v2/repository/models/{MODEL_NAME}/load"
        assert httpx.post(load_url, json={}, timeout=60).status_code == 200
        wait_for(lambda: all(r.json()["model_version"] == "2" for r in fresh_connections("/v1/predict")), every=0.2)
        wait_for(lambda: server.errors().count(f"serving model {MODEL_NAME} version 2") == 2)  # once per worker
        assert (
            httpx.post(f"{server.url}/v2/repository/models/{MODEL_NAME}/unload", json={}, timeout=60).status_code == 200
        )
        wait_for(lambda: all(r.status_code == 503 for r in fresh_connections("/readyz")), every=0.2)
        assert httpx.post(load_url, json={}, timeout=60).status_code == 200
        wait_for(lambda: all(r.status_code == 200 for r in fresh_connections("/readyz")), every=0.2)
        assert server.errors().count(f"serving model {MODEL_NAME} version 2") == 4
