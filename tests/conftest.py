"""Shared fixtures: the real committed model, the real test set, the app in-process and as a real
uvicorn process on a free port."""

from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings
from training.data import Split, load_test

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("TEST_MODELS", ROOT / "models"))
MODEL_NAME = "fashion-mnist-cnn"


def model_folder() -> Path:
    from service.model import locate

    return locate(MODELS, None if "TEST_MODELS" in os.environ else MODEL_NAME, None)


@pytest.fixture(scope="session")
def test_split() -> Split:
    return load_test()


@pytest.fixture(scope="session")
def reference_session() -> ort.InferenceSession:
    """onnxruntime run directly on the committed model: what every answer must equal."""
    return ort.InferenceSession(str(model_folder() / "model.onnx"), providers=["CPUExecutionProvider"])


def reference_probabilities(session: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    x = (images.astype(np.float32) / 255.0)[..., None]
    return session.run(["probabilities"], {"image": x})[0]


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, body, CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_settings(**overrides: object) -> Settings:
    values: dict[str, object] = {"models": MODELS, "providers": ["cpu"]}
    if "TEST_MODELS" not in os.environ:
        values["model"] = MODEL_NAME
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def client() -> Iterator[TestClient]:
    """The app in-process, model loaded through its real lifespan; shared by read-only tests."""
    with TestClient(create_app(make_settings()), raise_server_exceptions=False) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen[bytes] | None = None, timeout: float = 30.0) -> float:
    """Poll /readyz until 200; returns the seconds it took."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=1.0).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def start_server(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """`python -m service` on a free port; its output goes to a temporary file (a pipe nobody reads
    would fill up and stall the server after a few hundred access-log lines)."""
    port = free_port()
    # One worker unless a test asks for more: tests count requests, in-flight slots and log lines per process.
    full_env = {**os.environ, "FASHION_SERVE_WORKERS": "1", **(env or {})}
    command = [sys.executable, "-m", "service", "--port", str(port), "--models", str(MODELS), *args]
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop_server
    process = subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    process.log = log  # type: ignore[attr-defined]
    return process, f"http://127.0.0.1:{port}"


def stop_server(process: subprocess.Popen[bytes]) -> str:
    """Stop it and return what it printed."""
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    log = getattr(process, "log", None)
    if log is None:
        return process.stdout.read().decode(errors="replace") if process.stdout else ""
    log.seek(0)
    text = log.read().decode(errors="replace")
    log.close()
    return text


@pytest.fixture(scope="session")
def live_server() -> Iterator[str]:
    """A real `python -m service` process on a free port, polled until ready."""
    extra = [] if "TEST_MODELS" in os.environ else ["--model", MODEL_NAME]
    process, url = start_server(*extra)
    try:
        wait_ready(url, process)
        yield url
    finally:
        stop_server(process)
