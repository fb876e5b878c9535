"""The load: real Fashion-MNIST test images as PNG files, and HTTP/1.1 requests built once up front."""

from __future__ import annotations

import io
from functools import cache

import numpy as np
from PIL import Image

BOUNDARY = "benchboundary7MA4YWxkTrZu0gW"


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


def post(path: str, body: bytes, content_type: str = f"multipart/form-data; boundary={BOUNDARY}") -> bytes:
    """One complete keep-alive POST request, headers and body."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: fashion-bench\r\nAccept: */*\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
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
