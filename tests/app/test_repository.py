"""The model repository in-process: every model and the versions its policy chooses, served side by side by
name and version; the default model for the short routes; versions named by their folders; versions that
fail to load, reported and served around; the repository API (load, unload, index, statistics) and its
switch; polling that tries again only what changed, and never stops."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.errors import ModelLoadError
from service.model import Model
from service.repository import Repository
from tests.support import MODEL_NAME, model_folder, model_version, png_bytes, reference_of, repository_settings

OTHER = "fashion-mnist-b"
PNG = {"content-type": "image/png"}


@pytest.fixture(scope="module")
def images(test_split) -> np.ndarray:  # type: ignore[no-untyped-def]
    return test_split.images[200:204]


def serve(root: Path, **settings: Any) -> TestClient:
    return TestClient(create_app(repository_settings(root, **settings)), raise_server_exceptions=False)


def predict(client: TestClient, path: str, pixels: np.ndarray) -> dict[str, Any]:
    response = client.post(path, content=png_bytes(pixels), headers=PNG)
    assert response.status_code == 200, response.text
    return response.json()


def wait_until(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def index(client: TestClient) -> dict[tuple[str, str], dict[str, str]]:
    response = client.post("/v2/repository/index")
    assert response.status_code == 200, response.text
    return {(e["name"], e.get("version", "")): e for e in response.json()}


def corrupt(folder: Path) -> None:
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model.onnx").write_bytes(bytes(data))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two models, three versions: the committed model as version 1, a different one as version 2 (its
    config.json serves the two latest), and another model."""
    root = tmp_path_factory.mktemp("repo")
    model_version(root / MODEL_NAME / "1")
    model_version(root / MODEL_NAME / "2", scale=1.5)
    (root / MODEL_NAME / "config.json").write_text(json.dumps({"version_policy": {"latest": 2}}))
    model_version(root / OTHER / "1", scale=0.5)
    return root


def test_every_model_and_version_answers_by_name_and_version(repo: Path, images: np.ndarray) -> None:
    want = {
        key: reference_of(repo / key[0] / key[1], images)
        for key in [(MODEL_NAME, "1"), (MODEL_NAME, "2"), (OTHER, "1")]
    }
    assert not np.array_equal(want[MODEL_NAME, "1"], want[MODEL_NAME, "2"])  # genuinely different models
    with serve(repo) as client:
        for (name, version), probabilities in want.items():
            for pixels, expected in zip(images, probabilities, strict=True):
                body = predict(client, f"/v1/models/{name}/versions/{version}/predict", pixels)
                assert (body["model"], body["model_version"]) == (name, version)
                assert body["probabilities"] == expected.tolist()
            files = [("files", (f"{i}.png", png_bytes(p), "image/png")) for i, p in enumerate(images)]
            batch = client.post(f"/v1/models/{name}/versions/{version}/predict/batch", files=files).json()
            assert batch["model_version"] == version
            assert [r["probabilities"] for r in batch["results"]] == probabilities.tolist()
            maps = client.post(
                f"/v1/models/{name}/versions/{version}/feature-maps", content=png_bytes(images[0]), headers=PNG
            )
            assert maps.status_code == 200 and maps.headers["content-type"] == "image/png"
            tensor = {
                "name": "image",
                "datatype": "UINT8",
                "shape": [len(images), 28, 28],
                "data": images.ravel().tolist(),
            }
            v2 = client.post(f"/v2/models/{name}/versions/{version}/infer", json={"inputs": [tensor]}).json()
            assert (v2["model_name"], v2["model_version"]) == (name, version)
            assert np.array_equal(np.array(v2["outputs"][0]["data"], np.float32).reshape(-1, 10), probabilities)
        # No version: the highest loaded; the short routes: the default model (fashion-mnist-cnn is present).
        assert predict(client, f"/v1/models/{MODEL_NAME}/predict", images[0])["model_version"] == "2"
        short = predict(client, "/v1/predict", images[0])
        assert (short["model"], short["model_version"]) == (MODEL_NAME, "2")
        assert predict(client, f"/v1/models/{OTHER}/predict", images[0])["model"] == OTHER

        meta = client.get(f"/v2/models/{MODEL_NAME}").json()
        assert meta["versions"] == ["2", "1"]
        assert client.get(f"/v2/models/{MODEL_NAME}/versions/1").json()["versions"] == ["2", "1"]
        for path, status in [
            (f"/v2/models/{MODEL_NAME}/versions/1/ready", 200),
            (f"/v2/models/{MODEL_NAME}/versions/2/ready", 200),
            (f"/v2/models/{OTHER}/ready", 200),
            (f"/v2/models/{MODEL_NAME}/versions/10/ready", 404),
            (f"/v1/models/{MODEL_NAME}/versions/10/predict", 404),
        ]:
            assert client.request("POST" if "predict" in path else "GET", path).status_code == status, path
        listing = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
        assert set(listing) == {MODEL_NAME, OTHER}
        assert (listing[MODEL_NAME]["version"], listing[MODEL_NAME]["versions"]) == ("2", ["2", "1"])
        assert client.get(f"/v1/models/{MODEL_NAME}/versions/1").json()["version"] == "1"
        ready = client.get("/readyz").json()
        assert (ready["model"], ready["version"]) == (MODEL_NAME, "2")
        assert ready["models"] == {MODEL_NAME: ["2", "1"], OTHER: ["1"]}
        assert {k: e["state"] for k, e in index(client).items()} == {
            (MODEL_NAME, "2"): "READY",
            (MODEL_NAME, "1"): "READY",
            (OTHER, "1"): "READY",
        }
        metrics = client.get("/metrics").text
        for name, version in want:
            assert f'model_info{{model="{name}",providers="CPUExecutionProvider",version="{version}"}} 1.0' in metrics
            assert f'inference_images_total{{model="{name}",version="{version}"}}' in metrics


def test_the_default_model_of_several(tmp_path: Path, images: np.ndarray) -> None:
    model_version(tmp_path / "a" / "1")
    model_version(tmp_path / "b" / "1", scale=0.5)
    with serve(tmp_path) as client:  # several models, none named fashion-mnist-cnn, no setting: no default
        response = client.post("/v1/predict", content=png_bytes(images[0]), headers=PNG)
        assert response.status_code == 404
        assert "several are served (a, b)" in response.json()["error"]
        assert client.get("/readyz").status_code == 200  # and the server is ready: every model is
        assert client.get("/v2/health/ready").status_code == 200
        assert client.get("/readyz").json() == {"status": "ready", "models": {"a": ["1"], "b": ["1"]}}
        assert predict(client, "/v1/models/b/predict", images[0])["model"] == "b"
    with serve(tmp_path, default_model="b") as client:
        assert predict(client, "/v1/predict", images[0])["model"] == "b"
        assert len(client.get("/v1/models").json()["models"]) == 2
    with serve(tmp_path, model="a") as client:  # restricts serving to it, and makes it the default
        assert predict(client, "/v1/predict", images[0])["model"] == "a"
        assert [m["name"] for m in client.get("/v1/models").json()["models"]] == ["a"]
        assert client.post("/v1/models/b/predict", content=png_bytes(images[0]), headers=PNG).status_code == 404
        assert client.post("/v2/repository/models/b/load").status_code == 409
    for settings, message in [
        ({"model": "a", "default_model": "b"}, "model restricts serving to 'a'"),
        ({"default_model": "zzz"}, "model 'zzz' not found"),
        ({"model_version": "1"}, "model_version needs a model"),
        ({"model": "a", "model_version": "7"}, "model 'a' has no version '7'"),
    ]:
        with pytest.raises(ModelLoadError, match=message):
            Repository(repository_settings(tmp_path, **settings)).preload()


def test_a_version_is_named_by_its_folder(tmp_path: Path, images: np.ndarray, caplog: pytest.LogCaptureFixture) -> None:
    source = model_folder().name  # the version every copy's card names
    for version in ("1", "2", "10"):
        model_version(tmp_path / MODEL_NAME / version)  # copies of the served default
    with caplog.at_level(logging.WARNING, "service.repository"), serve(tmp_path) as client:
        assert predict(client, "/v1/predict", images[0])["model_version"] == "10"
        assert client.get(f"/v2/models/{MODEL_NAME}/versions/10/ready").status_code == 200
        assert client.get(f"/v2/models/{MODEL_NAME}/versions/1/ready").status_code == 404  # latest:1
        assert client.get(f"/v2/models/{MODEL_NAME}").json()["versions"] == ["10"]
        assert client.get("/v1/models").json()["models"][0]["versions"] == ["10"]
    assert f"its card's version is '{source}'; it is '10'" in caplog.text
    with serve(tmp_path, version_policy="all") as client:
        assert client.get(f"/v2/models/{MODEL_NAME}").json()["versions"] == ["10", "2", "1"]
    with serve(tmp_path, model_version="2") as client:
        assert predict(client, "/v1/predict", images[0])["model_version"] == "2"
    with serve(tmp_path, version_policy="specific:1,3") as client:
        assert client.get(f"/v2/models/{MODEL_NAME}").json()["versions"] == ["1"]
        entry = index(client)[MODEL_NAME, "3"]
        assert entry["state"] == "UNAVAILABLE" and f"{MODEL_NAME}/3 is not in the repository" in entry["reason"]


def test_versions_that_fail_to_load_are_reported_and_served_around(
    tmp_path: Path, images: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_version(tmp_path / MODEL_NAME / "1")
    card = model_version(tmp_path / "bad-card" / "1") / "card.json"
    raw = json.loads(card.read_text())
    del raw["classes"]
    card.write_text(json.dumps(raw))
    shape = model_version(tmp_path / "bad-shape" / "1") / "card.json"
    raw = json.loads(shape.read_text())
    raw["input"]["shape"] = [-1, 32, 32, 1]
    shape.write_text(json.dumps(raw))
    corrupt(model_version(tmp_path / "bad-bytes" / "1"))
    model_version(tmp_path / "bad-config" / "1")
    (tmp_path / "bad-config" / "config.json").write_text("{ not json")
    with serve(tmp_path) as client:
        assert predict(client, "/v1/predict", images[0])["model"] == MODEL_NAME
        entries = index(client)
        assert entries[MODEL_NAME, "1"]["state"] == "READY"
        assert entries["bad-card", "1"]["state"] == "UNAVAILABLE"
        assert "unreadable model card" in entries["bad-card", "1"]["reason"]
        assert "this service feeds float32 [-1, 28, 28, 1]" in entries["bad-shape", "1"]["reason"]
        assert "does not match the card" in entries["bad-bytes", "1"]["reason"]
        assert "not JSON" in entries["bad-config", ""]["reason"]
        response = client.post("/v1/models/bad-bytes/predict", content=png_bytes(images[0]), headers=PNG)
        assert response.status_code == 404 and "not loaded" in response.json()["error"]
        metrics = client.get("/metrics").text
        for name, version in [("bad-card", "1"), ("bad-shape", "1"), ("bad-bytes", "1"), ("bad-config", "")]:
            assert f'model_load_failures_total{{model="{name}",version="{version}"}} 1.0' in metrics
    # Only the default model failing (or every model) stops the start, with its reason, before any other
    # model is loaded (a start that fails says one thing); and a model the settings name must be there.
    model_version(tmp_path / "good" / "1")
    attempts: list[str] = []
    real = Repository._load_version

    def counted(self: Repository, folder: Path) -> Model:
        attempts.append(folder.parent.name)
        return real(self, folder)

    monkeypatch.setattr(Repository, "_load_version", counted)
    with pytest.raises(ModelLoadError, match="unreadable model card"):
        Repository(repository_settings(tmp_path, default_model="bad-card")).preload()
    assert attempts == ["bad-card"]
    with pytest.raises(ModelLoadError, match=r"model 'fashion-mnist-cnn' has no version '99' \(found: 1\)"):
        Repository(repository_settings(tmp_path, model_version="99")).preload()
    assert attempts == ["bad-card"]  # checked before anything is loaded
    shutil.rmtree(tmp_path / MODEL_NAME)
    Repository(repository_settings(tmp_path)).preload()  # no default model: what loads is served


def test_the_repository_api(tmp_path: Path, images: np.ndarray) -> None:
    model_version(tmp_path / MODEL_NAME / "1")
    with serve(tmp_path) as client:
        load = f"/v2/repository/models/{MODEL_NAME}/load"
        # A new version is not served until it is loaded (no polling).
        model_version(tmp_path / MODEL_NAME / "2", scale=1.5)
        assert predict(client, "/v1/predict", images[0])["model_version"] == "1"
        assert client.post(load).status_code == 200
        body = predict(client, "/v1/predict", images[0])
        assert body["model_version"] == "2"
        assert body["probabilities"] == reference_of(tmp_path / MODEL_NAME / "2", images[:1])[0].tolist()
        entries = index(client)
        assert entries[MODEL_NAME, "2"]["state"] == "READY"
        assert entries[MODEL_NAME, "1"] == {
            "name": MODEL_NAME,
            "version": "1",
            "state": "UNAVAILABLE",
            "reason": "not chosen by the version policy",
        }
        # A corrupt version: 400 with the reason, and version 2 goes on serving.
        staging = tmp_path / "staging" / MODEL_NAME / "3"
        model_version(staging, scale=0.75)
        good = (staging / "model.onnx").read_bytes()
        corrupt(staging)
        staging.rename(tmp_path / MODEL_NAME / "3")
        response = client.post(load)
        assert response.status_code == 400 and "version 3" in response.json()["error"]
        assert "does not match the card" in response.json()["error"]
        assert predict(client, "/v1/predict", images[0])["model_version"] == "2"
        assert index(client)[MODEL_NAME, "3"]["state"] == "UNAVAILABLE"
        # Fixed: it loads.
        (tmp_path / MODEL_NAME / "3" / "model.onnx").write_bytes(good)
        assert client.post(load).status_code == 200
        assert predict(client, "/v1/predict", images[0])["model_version"] == "3"
        # A version policy given with the load, in Triton's model configuration: until the next load.
        config = json.dumps({"version_policy": {"specific": {"versions": [2, 3]}}})
        assert client.post(load, json={"parameters": {"config": config}}).status_code == 200
        assert client.get(f"/v2/models/{MODEL_NAME}").json()["versions"] == ["3", "2"]
        # Unloaded: gone, readiness follows the default model; loaded again (its own policy again).
        assert client.post(f"/v2/repository/models/{MODEL_NAME}/unload", json={}).status_code == 200
        response = client.post("/v1/predict", content=png_bytes(images[0]), headers=PNG)
        assert response.status_code == 503 and "not loaded" in response.json()["error"]
        assert client.get("/readyz").status_code == 503
        assert client.get(f"/v2/models/{MODEL_NAME}/ready").status_code == 404
        assert {e["state"] for e in index(client).values()} == {"UNAVAILABLE"}
        assert index(client)[MODEL_NAME, "3"]["reason"] == "unloaded"
        assert client.post(load, json={}).status_code == 200
        assert client.get(f"/v2/models/{MODEL_NAME}").json()["versions"] == ["3"]
        assert client.get("/readyz").status_code == 200
        ready_only = client.post("/v2/repository/index", json={"ready": True}).json()
        assert ready_only == [{"name": MODEL_NAME, "version": "3", "state": "READY", "reason": ""}]
        # Mistakes.
        for path, kwargs, status, message in [
            ("/v2/repository/models/nope/load", {}, 404, "no model 'nope'"),
            ("/v2/repository/models/nope/unload", {}, 404, "unknown model 'nope'"),
            (load, {"content": b"["}, 400, "not JSON"),
            (load, {"json": [1]}, 400, "JSON object"),
            (load, {"json": {"parameters": {"file:1/model.onnx": "eA=="}}}, 400, "not supported"),
            (load, {"json": {"parameters": {"config": {"version_policy": "all"}}}}, 400, "string of JSON"),
            (load, {"json": {"parameters": {"config": '{"version_policy": {"newest": 1}}'}}}, 400, "newest"),
            ("/v2/repository/index", {"json": {"ready": "yes"}}, 400, "true or false"),
        ]:
            response = client.post(path, **kwargs)
            assert response.status_code == status and message in response.json()["error"], (path, response.text)
        # Statistics, Triton's shape.
        stats = client.get("/v2/models/stats").json()["model_stats"]
        assert [(s["name"], s["version"]) for s in stats] == [(MODEL_NAME, "3")]
        predict(client, f"/v1/models/{MODEL_NAME}/versions/3/predict", images[0])
        one = client.get(f"/v2/models/{MODEL_NAME}/versions/3/stats").json()["model_stats"][0]
        assert one["inference_stats"]["success"]["count"] >= 1 and one["execution_count"] >= 1
        assert client.get(f"/v2/models/{MODEL_NAME}/stats").json()["model_stats"][0]["version"] == "3"
        assert client.get(f"/v2/models/{MODEL_NAME}/versions/9/stats").status_code == 404
        assert client.get("/v2/models/nope/stats").status_code == 404
        assert {"model_repository", "statistics"} <= set(client.get("/v2").json()["extensions"])


def test_the_api_can_be_turned_off_and_needs_the_key(tmp_path: Path) -> None:
    model_version(tmp_path / MODEL_NAME / "1")
    load, unload = f"/v2/repository/models/{MODEL_NAME}/load", f"/v2/repository/models/{MODEL_NAME}/unload"
    with serve(tmp_path, repository_api=False) as client:
        for path in (load, unload):
            response = client.post(path)
            assert response.status_code == 403 and "repository_api" in response.json()["error"]
        assert client.post("/v2/repository/index").status_code == 200  # reading what is served still works
    with serve(tmp_path, api_key="sesame") as client:
        assert client.post(load).status_code == 401
        assert client.post("/v2/repository/index").status_code == 401
        assert client.post(load, headers={"X-API-Key": "sesame"}).status_code == 200
    # An app given its one model has no repository to load from.
    with TestClient(create_app(repository_settings(tmp_path), model=Model(model_folder()))) as client:
        assert client.post(load).status_code == 409
        assert client.post("/v2/repository/index").json()[0]["state"] == "READY"


def test_polling_tries_again_only_what_changed_and_never_stops(
    tmp_path: Path, images: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "repo"
    model_version(root / MODEL_NAME / "1")
    attempts: list[str] = []
    real = Repository._load_version

    def counted(self: Repository, folder: Path) -> Model:
        attempts.append(folder.name)
        return real(self, folder)

    monkeypatch.setattr(Repository, "_load_version", counted)
    with serve(root, poll_interval_s=0.05) as client:
        staging = tmp_path / "staging" / "2"
        model_version(staging, scale=1.5)
        good = (staging / "model.onnx").read_bytes()
        corrupt(staging)
        staging.rename(root / MODEL_NAME / "2")
        wait_until(lambda: index(client).get((MODEL_NAME, "2"), {}).get("state") == "UNAVAILABLE")
        time.sleep(0.5)  # about ten polls
        assert attempts.count("2") == 1  # the same files are not tried again
        assert predict(client, "/v1/predict", images[0])["model_version"] == "1"
        (root / MODEL_NAME / "2" / "model.onnx").write_bytes(good)  # fixed: the next poll loads it
        wait_until(lambda: predict(client, "/v1/predict", images[0])["model_version"] == "2")
        assert attempts.count("2") >= 2
        assert index(client)[MODEL_NAME, "2"] == {"name": MODEL_NAME, "version": "2", "state": "READY", "reason": ""}
        # The repository unreadable for a while: every poll fails, nothing is unloaded, polling goes on.
        os.rename(root, tmp_path / "away")
        time.sleep(0.3)
        assert predict(client, "/v1/predict", images[0])["model_version"] == "2"
        os.rename(tmp_path / "away", root)
        shutil.rmtree(root / MODEL_NAME / "2")  # the newest version removed: version 1 is served again
        wait_until(lambda: predict(client, "/v1/predict", images[0])["model_version"] == "1")


def test_a_retired_version_drains_exactly_and_answers_its_stragglers(
    tmp_path: Path, images: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A swap waits for the requests inside the old version (the load API answers only then); a request that
    looked the old version up before the swap and reaches inference only after its release is answered by
    that same version, never by another and never with an error."""
    import asyncio

    from tests.support import run_bounded

    model_version(tmp_path / MODEL_NAME / "1")
    staged = model_version(tmp_path / "staging" / "2", scale=1.5)
    tensor = (images.astype(np.float32) / 255.0)[..., None]
    want_1 = reference_of(tmp_path / MODEL_NAME / "1", images)
    app = create_app(repository_settings(tmp_path))
    events: list[str] = []

    async def main() -> None:
        async with app.router.lifespan_context(app):
            plane = app.state.dataplane
            old = plane.model()
            straggler = plane.model()  # looked up now, run after the release
            real_run = old.run

            def slow_run(*args: Any, **kwargs: Any) -> Any:
                time.sleep(0.5)
                return real_run(*args, **kwargs)

            monkeypatch.setattr(old, "run", slow_run)

            async def in_flight() -> dict[str, np.ndarray]:
                result = await plane.infer(old, tensor, ["probabilities"])
                events.append("in-flight request answered")
                return result

            running = asyncio.create_task(in_flight())
            await asyncio.sleep(0.1)  # inside the old version's batcher now
            staged.rename(tmp_path / MODEL_NAME / "2")
            await plane.load_model(MODEL_NAME)
            events.append("load answered")
            assert plane.model().version == "2" and plane.model() is not old
            assert id(old) not in plane.repository.live  # drained and released
            np.testing.assert_array_equal((await running)["probabilities"], want_1)
            late = await plane.infer(straggler, tensor, ["probabilities"])
            np.testing.assert_array_equal(late["probabilities"], want_1)

    run_bounded(main)
    assert events == ["in-flight request answered", "load answered"]
