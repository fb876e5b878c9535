"""The load: real Fashion-MNIST test images as PNG files, and HTTP/1.1 requests built once up front.

/v1 requests upload PNGs as multipart/form-data. V2 (Open Inference Protocol) requests carry one image
each as Triton's binary tensor data: a JSON header, then the tensor's raw bytes, with the header's
length in `Inference-Header-Content-Length`; either the model's FP32 tensor [1, 28, 28, 1]
(`v2_fp32_bodies`) or the PNG file as one BYTES element (`v2_png_bodies`).
"""

from __future__ import annotations

import io
import json
import struct
from functools import cache

import numpy as np
from PIL import Image

BOUNDARY = "benchboundary7MA4YWxkTrZu0gW"
MODEL = "fashion-mnist-cnn"  # the committed model: the default V2 model name
V2_INPUT, V2_OUTPUT = "image", "probabilities"  # the model card's input and class probabilities
V2_HEADER = "Inference-Header-Content-Length"


@cache
def test_images(count: int = 200) -> np.ndarray:
    """The first `count` real test images, uint8 [count, 28, 28]."""
    from training.data import load_test

    return load_test().images[:count]


@cache
def pngs(count: int = 200) -> tuple[bytes, ...]:
    out = []
    for pixels in test_images(count):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return tuple(out)


def multipart(field: str, files: list[tuple[str, bytes]]) -> bytes:
    """A multipart/form-data body with `files` (name, data) all under `field`."""
    parts = []
    for name, data in files:
        head = (
            f"--{BOUNDARY}\r\n"
            f'Content-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
            "Content-Type: image/png\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def post(
    path: str,
    body: bytes,
    content_type: str = f"multipart/form-data; boundary={BOUNDARY}",
    headers: dict[str, str] | None = None,
) -> bytes:
    """One complete keep-alive POST request, headers and body."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: fashion-bench\r\nAccept: */*\r\n"
        f"Content-Type: {content_type}\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def single_bodies(count: int = 200) -> list[bytes]:
    """One multipart body per image (field `file`), without the HTTP head."""
    return [multipart("file", [(f"{i}.png", data)]) for i, data in enumerate(pngs(count))]


def single_requests(path: str = "/v1/predict", count: int = 200) -> list[bytes]:
    """One request per image, one image each (multipart field `file`)."""
    return [post(path, body) for body in single_bodies(count)]


def batch_requests(path: str = "/v1/predict/batch", size: int = 256, count: int = 200) -> list[bytes]:
    """Requests of `size` images each (multipart field `files`), cycling through the test images."""
    images = pngs(count)
    requests = []
    for start in range(0, count, max(1, count // 4)):  # a few different bodies, so no two are identical
        files = [(f"{k}.png", images[(start + k) % count]) for k in range(size)]
        requests.append(post(path, multipart("files", files)))
    return requests


# ------------------------------------------------------------------------------------------------- V2


def v2_path(model: str = MODEL) -> str:
    return f"/v2/models/{model}/infer"


def v2_body(datatype: str, shape: list[int], raw: bytes) -> tuple[bytes, int]:
    """A binary-data V2 request body for one input (`raw`: its bytes) asking for the probabilities as
    binary data; and the length of its JSON header."""
    header = {
        "inputs": [
            {"name": V2_INPUT, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": len(raw)}}
        ],
        "outputs": [{"name": V2_OUTPUT, "parameters": {"binary_data": True}}],
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + raw, len(text)


def v2_fp32_bodies(count: int = 200) -> list[tuple[bytes, int]]:
    """One body per image: FP32 [1, 28, 28, 1], pixels / 255 as the service computes them from the PNG,
    3,136 little-endian bytes."""
    pixels = test_images(count).astype(np.float32) / np.float32(255.0)
    return [v2_body("FP32", [1, 28, 28, 1], image.astype("<f4").tobytes()) for image in pixels]


def v2_png_bodies(count: int = 200) -> list[tuple[bytes, int]]:
    """One body per image: BYTES [1], the PNG file as one element (4-byte little-endian length, bytes)."""
    return [v2_body("BYTES", [1], struct.pack("<I", len(png)) + png) for png in pngs(count)]


def v2_bodies(kind: str, count: int = 200) -> list[tuple[bytes, int]]:
    if kind == "v2-fp32":
        return v2_fp32_bodies(count)
    if kind == "v2-png":
        return v2_png_bodies(count)
    raise ValueError(f"unknown V2 kind {kind!r}")


def v2_requests(kind: str, path: str, count: int = 200) -> list[bytes]:
    """One request per image (`kind` v2-fp32 or v2-png)."""
    bodies = v2_bodies(kind, count)
    return [post(path, body, "application/octet-stream", {V2_HEADER: str(length)}) for body, length in bodies]


def v2_probabilities(body: bytes, header_length: int) -> np.ndarray:
    """The probabilities out of a binary-data V2 response: its JSON header (`header_length` bytes, from
    the response's Inference-Header-Content-Length), then each binary output's bytes in order."""
    header = json.loads(body[:header_length])
    offset = header_length
    for output in header["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if output["name"] == V2_OUTPUT:
            if size is None or output.get("datatype") != "FP32":
                raise ValueError(f"output {V2_OUTPUT!r} is not FP32 binary data: {header}")
            return np.frombuffer(body[offset : offset + size], "<f4").reshape(output["shape"])
        offset += size or 0
    raise ValueError(f"no output {V2_OUTPUT!r} in {header}")
