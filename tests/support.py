"""Helpers shared by the test tiers; not fixtures (those are in the conftest.py files) and no tests.

Test files import from here, never from each other or from a conftest.py: the committed model and its
reference answers, PNGs and other request bodies, and a real `python -m service` on a free port.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image, ImageDraw

from service.errors import ModelLoadError
from service.settings import Settings

T = TypeVar("T")

# ------------------------------------------------------------------------------------- the model

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("TEST_MODELS", ROOT / "models"))
MODEL_NAME = "fashion-mnist-cnn"


def model_folder() -> Path:
    from service.model import locate

    return locate(MODELS, None if "TEST_MODELS" in os.environ else MODEL_NAME, None)


def served_model() -> tuple[str, str]:
    """The name and version a server on MODELS serves, for the paths below (known at collection time)."""
    try:
        folder = model_folder()
    except ModelLoadError:  # no model: collection goes on, and the server tests fail with the reason
        return MODEL_NAME, "1"
    return folder.parent.name, folder.name


MODEL, VERSION = served_model()


def reference_probabilities(session: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    x = (images.astype(np.float32) / 255.0)[..., None]
    return session.run(["probabilities"], {"image": x})[0]


def make_settings(**overrides: object) -> Settings:
    values: dict[str, object] = {"models": MODELS, "providers": ["cpu"]}
    if "TEST_MODELS" not in os.environ:
        values["model"] = MODEL_NAME
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ the bodies


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, body, CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def garment(size: tuple[int, int] = (28, 28), mode: str = "L") -> Image.Image:
    """A light shape on black, in the data set's form (any size and mode)."""
    image = Image.new("L", size, 0)
    w, h = size
    ImageDraw.Draw(image).rectangle((w // 4, h // 6, 3 * w // 4, 5 * h // 6), fill=220)
    return image.convert(mode) if mode != "L" else image


@cache
def good_png() -> bytes:
    return encoded(garment(), "PNG")


PREDICT, BATCH, MAPS = "/v1/predict", "/v1/predict/batch", "/v1/feature-maps"
INFER = f"/v2/models/{MODEL}/infer"
# A server's limits lowered so that oversize requests stay small on the wire (the corpus and the fuzzer).
LIMITS = {"max_image_bytes": 1_000_000, "max_request_bytes": 3_000_000, "max_batch_images": 16}


def v2(inputs: list[dict[str, Any]], **extra: Any) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def uint8_input(rows: int = 1, **overrides: Any) -> dict[str, Any]:
    tensor: dict[str, Any] = {"name": "image", "datatype": "UINT8", "shape": [rows, 28, 28], "data": [0] * (784 * rows)}
    return tensor | overrides


# ------------------------------------------------------------------------------------ the server


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


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    stdout: Path
    stderr: Path

    def access_log(self) -> list[dict[str, Any]]:
        """The JSON access log lines written so far (stdout may also hold other output)."""
        records = []
        for line in self.stdout.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "request_id" in record:
                records.append(record)
        return records

    def wait_for_log(self, request_ids: set[str], timeout: float = 5.0) -> dict[str, dict[str, Any]]:
        """The access log lines of these ids; the line is written just after the response is sent."""
        deadline = time.monotonic() + timeout
        while True:
            found = {r["request_id"]: r for r in self.access_log() if r["request_id"] in request_ids}
            if len(found) == len(request_ids) or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def errors(self) -> str:
        return self.stderr.read_text(errors="replace")

    def output(self) -> str:
        """Everything it printed: stdout, then stderr."""
        return self.stdout.read_text(errors="replace") + self.errors()

    def rss_kib(self, field_name: str = "VmRSS") -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(rf"^{field_name}:\s+(\d+) kB", status, re.M)
        assert match, status
        return int(match.group(1))

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(
    folder: Path, *args: str, env: dict[str, str] | None = None, launcher: str | None = None, **settings: object
) -> Server:
    """`python -m service` on a free 127.0.0.1 port, serving MODELS on the CPU with one worker (tests count
    requests, in-flight slots and log lines per process). `args` are its command-line flags (they win over
    the environment), `settings` become FASHION_SERVE_* variables, `env` is added to the environment as it is;
    `launcher`, Python source run with -c instead of `-m service`, gets the same flags and environment.
    stdout and stderr go to files in `folder`, never a pipe that nobody reads (a full pipe would stall the
    server after a few hundred access-log lines)."""
    port = free_port()
    full_env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "FASHION_SERVE_HOST": "127.0.0.1",
        "FASHION_SERVE_PORT": str(port),
        "FASHION_SERVE_MODELS": str(MODELS),
        "FASHION_SERVE_PROVIDERS": "cpu",
        "FASHION_SERVE_LOG_LEVEL": "info",
        "FASHION_SERVE_WORKERS": "1",
    }
    if "TEST_MODELS" not in os.environ:
        full_env["FASHION_SERVE_MODEL"] = MODEL_NAME
    full_env |= {f"FASHION_SERVE_{k.upper()}": str(v) for k, v in settings.items()}
    full_env |= env or {}
    command = [sys.executable, *(["-c", launcher] if launcher else ["-m", "service"]), *args]
    folder.mkdir(parents=True, exist_ok=True)
    stdout, stderr = folder / "stdout.log", folder / "stderr.log"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    return Server(process, f"http://127.0.0.1:{port}", stdout, stderr)


@contextmanager
def running_server(folder: Path, *args: str, **options: Any) -> Iterator[Server]:
    """start_server, polled until ready (its stderr in the error if it never is), stopped afterwards."""
    server = start_server(folder, *args, **options)
    try:
        try:
            wait_ready(server.url, server.process, timeout=60)
        except (RuntimeError, TimeoutError):
            raise RuntimeError(f"server did not start:\n{server.errors()[-3000:]}") from None
        yield server
    finally:
        server.stop()


def raw_request(url: str, data: bytes, timeout: float = 10.0, pause_after: float = 0.0) -> tuple[int, bytes, bytes]:
    """Bytes straight onto a socket, for what httpx will not send (dot segments, broken framing).
    Returns (status, head, body); status 0 when the server closed without answering."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        if pause_after:
            time.sleep(pause_after)
        received = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            received += chunk
            head, sep, body = received.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if sep and length and len(body) >= int(length.group(1)):
                break
    head, _, body = received.partition(b"\r\n\r\n")
    status = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    return (int(status.group(1)) if status else 0), head, body


# ------------------------------------------------------------------------------- the batcher's tests

LIMIT = 10.0  # seconds: every wait in the batcher's tests is bounded by this


def run_bounded(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """asyncio.run(main()), failing after LIMIT seconds."""

    async def bounded() -> T:
        return await asyncio.wait_for(main(), LIMIT)

    return asyncio.run(bounded())


# ------------------------------------------------------------------------------- python -m scoring

# Folder names as people write them: odd case, separators, plurals, a class id, an id prefix.
FOLDER_NAMES = [
    "T-shirt_top", "trousers", "PULLOVER", "3", "coat", "Sandals", "shirt", "sneaker", "bag", "9_ankle-boot",
]  # fmt: skip


def model_args() -> list[str]:
    name = [] if "TEST_MODELS" in os.environ else ["--model", MODEL_NAME]
    return ["--models", str(MODELS), "--providers", "cpu", *name]


def run_score(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """scoring.__main__.main in this process with the test model; (exit code, stdout, stderr)."""
    from scoring.__main__ import main

    code = main([*map(str, args), *model_args(), "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def accuracy_line(err: str) -> float:
    match = re.search(r"^accuracy (\d\.\d+) ", err, re.M)
    assert match, err
    return float(match.group(1))


def write_class_folders(root: Path, images: np.ndarray, labels: np.ndarray) -> list[Path]:
    paths = []
    for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        # Some in a nested folder: only the image's own folder names its class.
        folder = root / ("batch-b" if i % 3 == 0 else "batch-a") / FOLDER_NAMES[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:04d}.png"
        path.write_bytes(png_bytes(pixels))
        paths.append(path)
    (root / "README.txt").write_text("not an image: skipped when found in a folder")
    return paths
