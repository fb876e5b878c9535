"""`python -m service` as a user starts it: a real uvicorn process on a free port, its workers and supervisor,
and its one-line failures."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.support import (
    MODELS,
    ROOT,
    model_folder,
    png_bytes,
    reference_probabilities,
    start_server,
    wait_ready,
)

BLOCK_TENSORFLOW = """
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('tensorflow', 'keras', 'tf2onnx', 'tf_keras'):
            raise ImportError('tensorflow is blocked in this test')
sys.meta_path.insert(0, Block())
sys.argv = ['service'] + sys.argv[1:]
runpy.run_module('service', run_name='__main__')
"""


def test_live_server_answers_real_requests(live_server: str, test_split, reference_session) -> None:  # type: ignore[no-untyped-def]
    images = test_split.images[100:150]
    want = reference_probabilities(reference_session, images)
    with httpx.Client(base_url=live_server, timeout=10) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        for pixels, expected in zip(images, want, strict=True):
            body = http.post("/v1/predict", files={"file": ("x.png", png_bytes(pixels), "image/png")}).json()
            assert body["probabilities"] == expected.tolist()
        files = [("files", (f"{i}.png", png_bytes(p), "image/png")) for i, p in enumerate(images)]
        batch = http.post("/v1/predict/batch", files=files).json()
        got = np.array([r["probabilities"] for r in batch["results"]], np.float32)
        np.testing.assert_array_equal(got, want)
        bad = http.post("/v1/predict", files={"file": ("x.png", b"junk")})
        assert bad.status_code == 400 and "error" in bad.json()
        assert http.get("/readyz").status_code == 200


def test_serves_where_tensorflow_cannot_be_imported(tmp_path: Path, test_split) -> None:  # type: ignore[no-untyped-def]
    # One worker (start_server's default): spawned workers would not inherit the block.
    server = start_server(tmp_path, "--model", model_folder().parent.name, launcher=BLOCK_TENSORFLOW)
    process, url = server.process, server.url
    try:
        wait_ready(url, process)
        response = httpx.post(url + "/v1/predict", files={"file": ("x.png", png_bytes(test_split.images[0]))})
        assert response.status_code == 200 and response.json()["label"]
    finally:
        server.stop()
        log = server.output()
    assert "tensorflow is blocked" not in log


def test_flags_reach_the_running_server(tmp_path: Path) -> None:
    """Command-line flags reach the server. How fast it gets ready is a benchmark figure (`python -m bench`
    reports it beside the plain wrapper's), not an assertion: this machine's start time varies 1.2-2.7 s."""
    name = model_folder().parent.name
    server = start_server(tmp_path, "--model", name, "--providers", "cpu", "--intra-op-threads", "1")
    process, url = server.process, server.url
    try:
        seconds = wait_ready(url, process, timeout=30)
        print(f"ready after {seconds:.2f} s")
        ready = httpx.get(url + "/readyz").json()
        assert ready["model"] == name
        assert ready["providers"] == ["CPUExecutionProvider"] and ready["warnings"] == []
        providers = httpx.get(url + "/v1/models").json()["models"][0]["providers"]
        assert providers["requested"] == ["cpu"]
    finally:
        server.stop()


def _run_service(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    port = [] if env and "FASHION_SERVE_PORT" in env else ["--port", "0"]
    return subprocess.run(
        [sys.executable, "-m", "service", *port, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "FASHION_SERVE_WORKERS": "1", **(env or {})},
    )


def test_two_workers_serve_and_share_their_metrics(tmp_path: Path, test_split, reference_session) -> None:  # type: ignore[no-untyped-def]
    """The shipped default on two cores: a supervisor and two worker processes, each with its own session;
    /metrics adds up every worker's counts, whichever worker answers the scrape; SIGTERM stops all, exit 0."""
    server = start_server(tmp_path, "--workers", "2", "--providers", "cpu")
    process, url = server.process, server.url
    images = test_split.images[:40]
    want = reference_probabilities(reference_session, images)
    try:
        wait_ready(url, process, timeout=60)
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        workers = [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(workers) == 2, children  # (the other child is multiprocessing's resource tracker)
        for pixels, expected in zip(images, want, strict=True):
            # A new connection per request, so the kernel hands them to both workers.
            with httpx.Client(base_url=url, timeout=10) as http:
                body = http.post("/v1/predict", files={"file": ("x.png", png_bytes(pixels), "image/png")}).json()
            assert body["probabilities"] == expected.tolist()
        for _ in range(4):  # whichever worker answers, the totals are the same
            text = httpx.get(url + "/metrics", timeout=10).text
            counts = re.findall(r'http_requests_total\{method="POST",route="/v1/predict",status="200"\} (\S+)', text)
            assert [float(c) for c in counts] == [40.0], counts
    finally:
        server.stop()
    assert process.returncode == 0


SUPERVISOR_PROBE = """
import json, sys
from service.api import protocol
def record(app, workers, **options):  # instead of serving: what the supervisor would have started, and had imported
    print(json.dumps({"app": app, "workers": workers, "fastapi": "fastapi" in sys.modules}))
protocol.serve = record
from service.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_supervisor_checks_the_model_without_importing_the_web_app(tmp_path: Path) -> None:
    """With several workers the supervisor process loads the model once (to fail fast) but never imports
    FastAPI or the routes: each worker builds its own app, from the factory uvicorn is given."""
    from uvicorn.importer import import_from_string

    from service.__main__ import APP_FACTORY
    from service.app import app_from_env

    assert import_from_string(APP_FACTORY) is app_from_env
    run = [sys.executable, "-c", SUPERVISOR_PROBE, "--port", "0", "--workers", "2"]
    folder = model_folder()
    served = ["--models", str(folder.parent.parent), "--model", folder.parent.name]
    result = subprocess.run([*run, *served], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {"app": APP_FACTORY, "workers": 2, "fastapi": False}
    # And a model that does not load still stops it before any worker starts: exit 1, one line.
    broken = _broken_repository(tmp_path, "onnx_bytes")
    result = subprocess.run([*run, "--models", str(broken)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "does not match the card" in result.stderr, result.stderr
    assert result.stdout == "" and result.stderr.strip().count("\n") == 0


def _broken_repository(tmp_path: Path, damage: str) -> Path:
    target = tmp_path / "repo" / "broken" / "1"
    shutil.copytree(model_folder(), target)
    if damage == "onnx_bytes":
        data = bytearray((target / "model.onnx").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (target / "model.onnx").write_bytes(bytes(data))
    elif damage == "no_onnx":
        (target / "model.onnx").unlink()
    elif damage == "card_json":
        (target / "card.json").write_text("{ not json")
    elif damage == "card_fields":
        card = json.loads((target / "card.json").read_text())
        del card["classes"]
        (target / "card.json").write_text(json.dumps(card))
    elif damage == "garbage_onnx_matching_sha":
        import hashlib

        (target / "model.onnx").write_bytes(b"definitely not onnx")
        card = json.loads((target / "card.json").read_text())
        card["onnx"]["sha256"] = hashlib.sha256(b"definitely not onnx").hexdigest()
        (target / "card.json").write_text(json.dumps(card))
    return tmp_path / "repo"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("onnx_bytes", "does not match the card"),
        ("no_onnx", "cannot read model"),
        ("card_json", "unreadable model card"),
        ("card_fields", "unreadable model card"),
        ("garbage_onnx_matching_sha", "onnxruntime cannot load it"),
    ],
)
def test_corrupt_model_exits_nonzero_with_one_line(tmp_path: Path, damage: str, message: str) -> None:
    result = _run_service("--models", str(_broken_repository(tmp_path, damage)))
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--models", "/nonexistent"], {}, "no model found in /nonexistent"),
        (["--model", "nope"], {}, "model 'nope' not found"),
        (["--model-version", "99"], {}, "has no version '99'"),
        (
            ["--providers", "cuda", "--strict-providers"],
            {},
            "CUDAExecutionProvider requested but not available",
        ),
        (["--providers", "quantum"], {}, "unknown execution provider 'quantum'"),
        ([], {"FASHION_SERVE_PORT": "eighty"}, "invalid setting port"),
    ],
)
def test_bad_settings_exit_nonzero_with_one_line(args: list[str], env: dict[str, str], message: str) -> None:
    defaults = ["--models", str(MODELS)] if "--models" not in args else []
    result = _run_service(*defaults, *args, env=env)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
