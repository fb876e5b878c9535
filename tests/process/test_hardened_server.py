"""Hardening against a REAL server process: a corpus of bad and odd inputs on every endpoint (REST and V2),
then the API key, request ids and JSON access logs on the same server, after the corpus (the log checks
cover every line the corpus made).

Every invalid request must get a 4xx with JSON {"error": str}; every odd-but-valid one a 200; none a 5xx;
and the server must still answer afterwards. The server's stdout (JSON access log) and stderr go to files,
never a pipe that nobody reads (a full pipe would stall the server).

Overload and timeouts are in test_overload.py, the middleware's unit tests in tests/unit/test_middleware.py.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import random
import re
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support import (
    BATCH,
    INFER,
    LIMITS,
    MAPS,
    MODEL,
    PREDICT,
    VERSION,
    Server,
    encoded,
    garment,
    good_png,
    png_chunk,
    raw_request,
    running_server,
    uint8_input,
    v2,
)

# ------------------------------------------------------------------------------------- the inputs


@cache
def noisy(fmt: str) -> bytes:
    """An incompressible 96x96 image, so that a prefix of it is surely truncated pixel data."""
    pixels = np.random.default_rng(0).integers(0, 256, (96, 96), np.uint8)
    return encoded(Image.fromarray(pixels), fmt)


def png_claiming(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose IHDR claims width x height (8-bit grey), with the IDAT given (default: none worth reading)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat or zlib.compress(b"\0"))
        + (png_chunk(b"IEND", b""))
    )


@cache
def png_bomb(side: int = 8000) -> bytes:
    """A real, valid side x side black PNG: ~60 kB on the wire, side² bytes once decoded."""
    row, packer = bytes(side + 1), zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return png_claiming(side, side, idat)


def gif_claiming(width: int, height: int) -> bytes:
    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
    descriptor = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return b"GIF89a" + screen + descriptor + b"\x08\x00;"


def bmp_claiming(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + len(info), 0, 0, 54) + info


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG whose SOF0 header is rewritten to claim width x height."""
    data = bytearray(encoded(garment((32, 32)), "JPEG"))
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def npy_claiming(shape: tuple[int, ...], descr: str = "|u1", payload: bytes = b"\0" * 64) -> bytes:
    """A .npy header claiming `shape`, followed by far fewer bytes."""
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape!r}, }}".encode()
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + payload


@cache
def npz_bomb(rows: int = 300_000) -> bytes:
    """~230 kB on the wire, rows x 784 bytes (235 MB) once decompressed."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=np.zeros((rows, 28, 28), np.uint8))
    return buffer.getvalue()


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def multipart_body(data: bytes, extra_header: bytes = b"", name: str = "file") -> bytes:
    """One part under boundary "zzz", written by hand; repeated parts are joined by the caller."""
    head = f'Content-Disposition: form-data; name="{name}"; filename="a.png"\r\n'.encode() + (
        extra_header + b"\r\n" if extra_header else b""
    )
    return b"--zzz\r\n" + head + b"\r\n" + data + b"\r\n--zzz--\r\n"


def many_parts(count: int) -> bytes:
    part = b'--zzz\r\nContent-Disposition: form-data; name="f"\r\n\r\n1\r\n'
    return part * count + b"--zzz--\r\n"


def zip_of_text() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme.txt", "not an array")
    return buffer.getvalue()


def animated(fmt: str) -> bytes:
    frames = [garment(), garment().rotate(90), garment().transpose(Image.Transpose.FLIP_TOP_BOTTOM)]
    return encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def sixteen_bit(fmt: str) -> bytes:
    pixels = np.zeros((40, 40), np.uint16)
    pixels[8:32, 12:28] = 60000
    return encoded(Image.fromarray(pixels), fmt)


def exif_rotated_jpeg() -> bytes:
    image = garment((40, 28))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to view
    return encoded(image, "JPEG", exif=exif.tobytes())


def palette_with_transparency() -> bytes:
    image = garment().convert("P")
    return encoded(image, "PNG", transparency=0)


def cmyk_jpeg() -> bytes:
    return encoded(garment((40, 40), "CMYK"), "JPEG")


def float_tiff() -> bytes:
    pixels = np.zeros((28, 28), np.float32)
    pixels[5:23, 9:19] = 0.9
    return encoded(Image.fromarray(pixels, mode="F"), "TIFF")


def gzipped(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9)


@cache
def gzip_bomb() -> bytes:
    """~100 kB of gzip that inflates to 100 MB of zeros."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    return b"".join(packer.compress(block) for _ in range(100)) + packer.flush()


def chunks(data: bytes, size: int = 1000) -> Iterator[bytes]:
    """A generator body: httpx sends it with Transfer-Encoding: chunked and no Content-Length."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


def binary_v2(header: dict[str, Any], blob: bytes, declared_length: int | None = None) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    length = len(head) if declared_length is None else declared_length
    return head + blob, {"Inference-Header-Content-Length": str(length), "Content-Type": "application/octet-stream"}


def nested(depth: int) -> bytes:
    return (
        b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": '
        + b"[" * depth
        + b"]" * depth
        + (b"}]}")
    )


# -------------------------------------------------------------------------------------- the corpus

# The server's limits are lowered (LIMITS) so that the oversize cases stay small on the wire.
API_KEYS = ("corpus-key-0123456789", "second-key-abcdef")


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str
    expect: int | str  # an exact status, "4xx", or "no-5xx" (200 or a 4xx)
    body: Callable[[], bytes | Iterator[bytes]] | None = None
    content_type: str | None = None
    files: Callable[[], list[tuple[str, Any]]] | None = None
    data: dict[str, str] | None = None
    params: dict[str, str] | None = None
    headers: dict[str, str] = field(default_factory=dict)


Make = Callable[[], bytes | Iterator[bytes]]


def raw(id: str, make: Make, expect: int | str, ct: str | None = "application/octet-stream", **kw: Any) -> Case:
    """The body as it is, to /v1/predict unless `path` says otherwise."""
    return Case(id, "POST", kw.pop("path", PREDICT), expect, body=make, content_type=ct, **kw)


def form(id: str, files: Callable[[], list[tuple[str, Any]]], expect: int | str, **kw: Any) -> Case:
    """A multipart body, to /v1/predict unless `path` says otherwise."""
    return Case(id, "POST", kw.pop("path", PREDICT), expect, files=files, **kw)


def upload(name: str, data: bytes, content_type: str = "image/png", field_name: str = "file") -> list[tuple[str, Any]]:
    return [(field_name, (name, data, content_type))]


def array(id: str, make: Callable[[], np.ndarray], expect: int | str) -> Case:
    """One .npy array as the body of /v1/predict/batch."""
    return raw(id, lambda: npy(make()), expect, "application/x-npy", path=BATCH)


def infer(id: str, make: Make, expect: int | str = 400, **kw: Any) -> Case:
    """A V2 inference request with a JSON body."""
    return raw(id, make, expect, "application/json", path=kw.pop("path", INFER), **kw)


def infer_binary(id: str, make: Callable[[], tuple[bytes, dict[str, str]]], expect: int | str = 400) -> Case:
    """A V2 inference request with binary tensor data after the JSON header."""
    body, headers = make()
    return Case(id, "POST", INFER, expect, body=lambda: body, headers=headers)


def get(id: str, path: str, expect: int | str, method: str = "GET", **kw: Any) -> Case:
    return Case(id, method, path, expect, **kw)


def png_with(**params: str) -> dict[str, Any]:
    """Case fields for a good PNG sent raw with these query parameters."""
    return {"make": good_png, "ct": "image/png", "params": params}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def bytes_input(*files: bytes, shape: list[int] | None = None) -> dict[str, Any]:
    return {"name": "image", "datatype": "BYTES", "shape": shape or [len(files)], "data": [b64(f) for f in files]}


def classification(count: object) -> Make:
    return lambda: v2([uint8_input()], outputs=[{"name": "probabilities", "parameters": {"classification": count}}])


def binary_input(rows: int) -> dict[str, Any]:
    return uint8_input(rows, data=None, parameters={"binary_data_size": 784 * rows})


MULTIPART = "multipart/form-data; boundary=zzz"
MULTIPART_START = b'--zzz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
BIG_IMAGE = LIMITS["max_image_bytes"] + 1
JSON_INF = b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1e400]}]}'
BYTES_LIES = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 8}}]}

# fmt: off
CORPUS: list[Case] = [
    # --- bytes that are not a usable image, on /v1/predict ---------------------------------------------------
    raw("empty-raw-body", lambda: b"", "4xx"),
    form("empty-multipart-file", lambda: upload("x.png", b""), "4xx"),
    raw("truncated-png", lambda: noisy("PNG")[: len(noisy("PNG")) // 2], "4xx"),
    raw("truncated-jpeg", lambda: noisy("JPEG")[: len(noisy("JPEG")) // 2], "4xx"),
    raw("png-signature-only", lambda: b"\x89PNG\r\n\x1a\n", "4xx"),
    raw("random-bytes", lambda: random.Random(0).randbytes(4096), "4xx"),
    raw("html", lambda: b"<!doctype html><html><body>hi</body></html>", "4xx"),
    raw("svg", lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', 415),
    raw("pdf", lambda: b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", 415),
    raw("postscript", lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\n", 415),
    raw("heic-header", lambda: b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(64), 415),
    raw("ico-not-accepted", lambda: encoded(garment((32, 32)), "ICO"), 415),
    raw("gzipped-png-as-image", lambda: gzipped(good_png()), "4xx"),
    raw("npy-to-single-predict", lambda: npy(np.zeros((1, 28, 28), np.uint8)), "4xx"),
    # --- headers that claim absurd sizes, and real decompression bombs -----------------------------------
    raw("png-ihdr-0x0", lambda: png_claiming(0, 0), "4xx"),
    raw("png-ihdr-100000x100000", lambda: png_claiming(100_000, 100_000), 413),
    raw("png-ihdr-1x100000000", lambda: png_claiming(1, 100_000_000), "4xx"),
    raw("gif-0x0", lambda: gif_claiming(0, 0), "4xx"),
    raw("gif-65535x65535", lambda: gif_claiming(65535, 65535), 413),
    raw("bmp-0x0", lambda: bmp_claiming(0, 0), "4xx"),
    raw("bmp-100000x100000", lambda: bmp_claiming(100_000, 100_000), 413),
    raw("bmp-negative-width", lambda: bmp_claiming(-5, 5), "4xx"),
    raw("jpeg-sof-65000x65000", lambda: jpeg_claiming(65000, 65000), 413),
    raw("jpeg-sof-0x0", lambda: jpeg_claiming(0, 0), "4xx"),
    raw("png-bomb-8000x8000", png_bomb, 413),
    # --- odd but valid images: 200 -----------------------------------------------------------------------
    raw("png-16-bit-grey", lambda: sixteen_bit("PNG"), 200),
    raw("tiff-16-bit-grey", lambda: sixteen_bit("TIFF"), 200),
    raw("tiff-float", float_tiff, 200),
    raw("jpeg-cmyk", cmyk_jpeg, 200),
    raw("jpeg-progressive", lambda: encoded(garment((64, 64), "RGB"), "JPEG", progressive=True), 200),
    raw("jpeg-exif-rotated", exif_rotated_jpeg, 200),
    raw("gif-animated", lambda: animated("GIF"), 200),
    raw("png-animated", lambda: animated("PNG"), 200),
    raw("webp-animated", lambda: animated("WEBP"), 200),
    raw("png-palette-transparent", palette_with_transparency, 200),
    raw("png-grey-alpha", lambda: encoded(garment(mode="LA"), "PNG"), 200),
    raw("bmp-1-bit", lambda: encoded(garment(mode="1"), "BMP"), 200),
    raw("png-1x1", lambda: encoded(Image.new("L", (1, 1), 255), "PNG"), 200),
    raw("png-2000x1", lambda: encoded(garment((2000, 1)), "PNG"), 200),
    raw("type-says-gif-body-is-png", good_png, 200, "image/gif"),
    raw("chunked-no-content-length", lambda: chunks(good_png(), 100), 200, "image/png"),
    raw(**png_with(feature_maps="yes"), expect=200, id="feature-maps-yes"),
    form("filename-3kB", lambda: upload("a" * 3_000 + ".png", good_png()), 200),
    form("filename-10kB", lambda: upload("a" * 10_000 + ".png", good_png()), "no-5xx"),
    form("filename-unicode", lambda: upload("платье 👗 ドレス.png", good_png()), 200),
    form("filename-traversal", lambda: upload("../../../etc/passwd", good_png()), 200),
    # --- framing, sizes and fields on /v1 ----------------------------------------------------------------
    # A body whose bytes are an image is that image, whatever its declared type (curl's default included).
    raw("no-content-type", good_png, 200, None),
    raw("text-plain", good_png, 200, "text/plain"),
    raw("form-urlencoded-png", good_png, 200, "application/x-www-form-urlencoded"),
    raw("text-plain-not-an-image", lambda: b"hello, not an image", 415, "text/plain"),
    raw("json-body", lambda: b'{"file": "x"}', 415, "application/json"),
    Case("form-urlencoded", "POST", PREDICT, 415, data={"file": "abc"}),
    form("multipart-missing-field", lambda: upload("x.png", good_png(), field_name="image"), 400),
    form("multipart-text-field", lambda: upload("x", b"1", field_name="x"), 400, data={"file": "hello"}),
    form("multipart-two-files", lambda: upload("a.png", good_png()) * 2, "4xx"),
    raw("multipart-no-boundary", lambda: b"--x\r\n\r\n--x--", "4xx", "multipart/form-data"),
    raw("multipart-garbage", lambda: random.Random(1).randbytes(2000), "4xx", MULTIPART),
    raw("multipart-unterminated", lambda: MULTIPART_START + good_png(), "4xx", MULTIPART),
    raw("multipart-quoted-boundary", lambda: multipart_body(good_png()), 200, 'multipart/form-data; boundary="zzz"'),
    raw("multipart-boundary-star", lambda: multipart_body(good_png()), "4xx", "multipart/form-data; boundary*=zzz"),
    raw("multipart-no-disposition", lambda: b"--zzz\r\nContent-Type: image/png\r\n\r\nx\r\n--zzz--", 400, MULTIPART),
    raw("multipart-part-header-20kB", lambda: multipart_body(good_png(), b"X-Pad: " + b"p" * 20_000), 400, MULTIPART),
    raw("multipart-10000-parts", lambda: many_parts(10_000), 413, MULTIPART),
    raw("multipart-ct-2000-params", lambda: multipart_body(good_png()), 400, "multipart/form-data" + "; a=b" * 2000),
    raw("oversize-raw", lambda: bytes(BIG_IMAGE), 413),
    form("oversize-multipart", lambda: upload("big.png", bytes(BIG_IMAGE)), 413),
    raw("oversize-chunked", lambda: chunks(bytes(BIG_IMAGE + 10), 65536), 413, "image/png"),
    raw(**png_with(top_k="0"), expect=422, id="top-k-zero"),
    raw(**png_with(top_k="11"), expect=422, id="top-k-eleven"),
    raw(**png_with(top_k="three"), expect=422, id="top-k-text"),
    raw(**png_with(top_k="1" + "0" * 400), expect=422, id="top-k-400-digits"),
    raw(**png_with(top_k=""), expect=422, id="top-k-empty"),
    raw(**png_with(feature_maps="maybe"), expect=422, id="feature-maps-maybe"),
    get("get-on-post-route", PREDICT, 405),
    get("delete-on-post-route", BATCH, 405, method="DELETE"),
    get("unknown-route", "/v1/nothing-here", 404),
    get("unknown-model", "/v1/models/no-such-model", 404),
    get("model-traversal-encoded", "/v1/models/..%2F..%2Fetc%2Fpasswd", 404),
    get("model-name-10kB", "/v1/models/" + "m" * 10_000, 404),
    get("header-value-60kB", "/v1/models", 200, headers={"X-Padding": "p" * 60_000}),
    get("header-value-100kB", "/v1/models", 431, headers={"X-Padding": "p" * 100_000}),
    # --- /v1/predict/batch -------------------------------------------------------------------------------
    form("batch-no-files", lambda: upload("a", b"1", field_name="other"), 400, path=BATCH),
    raw("batch-text-plain", lambda: b"x", 415, "text/plain", path=BATCH),
    form("batch-17-files", lambda: upload("a.png", good_png(), field_name="files") * 17, 413, path=BATCH),
    form("batch-bad-and-good", lambda: upload("a.png", good_png(), field_name="files") + upload("b.png", b"junk", field_name="files"), 200, path=BATCH),  # noqa: E501
    form("batch-array-among-images", lambda: upload("a.png", good_png(), field_name="files") + upload("b.npy", npy(np.zeros((1, 28, 28), np.uint8)), field_name="files"), 200, path=BATCH),  # noqa: E501
    array("npy-valid", lambda: np.zeros((3, 28, 28), np.uint8), 200),
    array("npy-pickled-objects", lambda: np.array([{"a": 1}], dtype=object), 400),
    array("npy-wrong-shape", lambda: np.zeros((2, 10, 10), np.uint8), 400),
    array("npy-zero-rows", lambda: np.zeros((0, 28, 28), np.uint8), 400),
    array("npy-out-of-range", lambda: np.full((1, 28, 28), 2.0, np.float32), 400),
    array("npy-nan", lambda: np.full((1, 28, 28), np.nan, np.float32), 400),
    array("npy-bool", lambda: np.zeros((1, 28, 28), bool), 400),
    array("npy-17-rows", lambda: np.zeros((17, 28, 28), np.uint8), 413),
    raw("npy-truncated", lambda: npy(np.zeros((4, 28, 28), np.uint8))[:-100], 400, "application/x-npy", path=BATCH),
    raw("npy-claims-1e6-rows", lambda: npy_claiming((1_000_000, 28, 28)), 413, "application/x-npy", path=BATCH),
    raw("npy-claims-73-TiB", lambda: npy_claiming((10**13,), "<f8"), 400, "application/x-npy", path=BATCH),
    raw("npz-two-arrays", lambda: npz(a=np.zeros((1, 28, 28), np.uint8), b=np.zeros(3)), 400, "application/x-npz", path=BATCH),  # noqa: E501
    raw("zip-of-text", zip_of_text, 400, "application/x-npz", path=BATCH),
    raw("npz-bomb-300k-rows", npz_bomb, 413, "application/x-npz", path=BATCH),
    # --- /v1/feature-maps --------------------------------------------------------------------------------
    raw(**png_with(layer="../../etc"), expect=404, id="maps-unknown-layer", path=MAPS),
    raw(**png_with(format="jpeg"), expect=422, id="maps-bad-format", path=MAPS),
    raw(**png_with(), expect=200, id="maps-png", path=MAPS),
    raw(**png_with(format="npz"), expect=200, id="maps-npz", path=MAPS),
    raw("maps-empty", lambda: b"", 400, "image/png", path=MAPS),
    # --- V2: JSON ----------------------------------------------------------------------------------------
    infer("v2-malformed-json", lambda: b'{"inputs": ['),
    infer("v2-empty-body", lambda: b""),
    infer("v2-json-array", lambda: b"[]"),
    infer("v2-no-inputs", lambda: b"{}"),
    infer("v2-inputs-empty", lambda: v2([])),
    infer("v2-two-inputs", lambda: v2([uint8_input(), uint8_input()])),
    infer("v2-wrong-input-name", lambda: v2([uint8_input(name="pixels")])),
    infer("v2-length-mismatch", lambda: v2([uint8_input(data=[0] * 10)])),
    infer("v2-shape-mismatch", lambda: v2([uint8_input(shape=[1, 27, 29])])),
    infer("v2-datatype-int64", lambda: v2([uint8_input(datatype="INT64")])),
    infer("v2-datatype-unknown", lambda: v2([uint8_input(datatype="FP128")])),
    infer("v2-negative-dim", lambda: v2([uint8_input(shape=[-1, 28, 28])])),
    infer("v2-zero-rows", lambda: v2([uint8_input(shape=[0, 28, 28], data=[])])),
    infer("v2-17-rows", lambda: v2([uint8_input(shape=[17, 28, 28], data=[0])]), 413),
    infer("v2-shape-2-to-the-62", lambda: v2([uint8_input(shape=[2**62, 28, 28])]), 413),
    infer("v2-shape-of-strings", lambda: v2([uint8_input(shape=["1", "28", "28"])])),
    infer("v2-id-not-a-string", lambda: v2([uint8_input()], id=42)),
    infer("v2-uint8-out-of-range", lambda: v2([uint8_input(data=[300] * 784)])),
    infer("v2-fp32-out-of-range", lambda: v2([uint8_input(datatype="FP32", data=[2.0] * 784)])),
    infer("v2-fp32-strings", lambda: v2([uint8_input(datatype="FP32", data=["a"] * 784)])),
    infer("v2-fp32-infinite", lambda: JSON_INF),
    infer("v2-ragged-data", lambda: v2([uint8_input(data=[[0] * 28] * 27 + [[0] * 3])])),
    infer("v2-nested-10000-deep", lambda: nested(10_000)),
    infer("v2-bytes-bad-base64", lambda: v2([{**bytes_input(b""), "data": ["%%%"]}])),
    infer("v2-bytes-not-an-image", lambda: v2([bytes_input(b"hello")])),
    infer("v2-bytes-svg", lambda: v2([bytes_input(b"<svg/>")]), 415),
    infer("v2-unknown-output", lambda: v2([uint8_input()], outputs=[{"name": "secrets"}])),
    infer("v2-classification-string", classification("3")),
    infer("v2-classification-negative", classification(-1)),
    infer("v2-shared-memory", lambda: v2([uint8_input(parameters={"shared_memory_region": "x"})])),
    infer("v2-binary-size-no-header-length", lambda: v2([binary_input(1)])),
    infer("v2-uint8-valid", lambda: v2([uint8_input()]), 200),
    infer("v2-classification-1e30", classification(10**30), 200),
    infer("v2-bytes-png", lambda: v2([bytes_input(good_png())]), 200),
    infer("v2-bytes-cmyk-jpeg", lambda: v2([bytes_input(cmyk_jpeg(), shape=[1, 1])]), 200),
    # --- V2: binary data and content encodings ----------------------------------------------------------
    infer_binary("v2-binary-beyond-body", lambda: binary_v2({"inputs": [binary_input(1)]}, bytes(100))),
    infer_binary("v2-header-length-beyond-body", lambda: binary_v2({"inputs": [uint8_input()]}, b"", 10**9)),
    infer_binary("v2-header-length-negative", lambda: binary_v2({"inputs": [uint8_input()]}, b"", -1)),
    infer_binary("v2-binary-leftover-bytes", lambda: binary_v2({"inputs": [uint8_input()]}, bytes(10))),
    infer_binary("v2-bytes-element-length-lies", lambda: binary_v2(BYTES_LIES, struct.pack("<I", 10**9) + b"abcd")),
    infer_binary("v2-binary-valid", lambda: binary_v2({"inputs": [binary_input(2)]}, bytes(2 * 784)), 200),
    infer("v2-header-length-not-int", lambda: v2([uint8_input()]), headers={"Inference-Header-Content-Length": "x"}),
    infer("v2-content-encoding-br", lambda: v2([uint8_input()]), 415, headers={"Content-Encoding": "br"}),
    infer("v2-gzip-corrupt", lambda: gzipped(v2([uint8_input()]))[:-20], headers={"Content-Encoding": "gzip"}),
    infer("v2-gzip-bomb-100MB", gzip_bomb, 413, headers={"Content-Encoding": "gzip"}),
    infer("v2-gzip-valid", lambda: gzipped(v2([uint8_input()])), 200, headers={"Content-Encoding": "gzip"}),
    infer("v2-oversize", lambda: bytes(LIMITS["max_request_bytes"] + 1), 413),
    # --- V2: names -------------------------------------------------------------------------------------
    infer("v2-unknown-model", lambda: v2([uint8_input()]), 404, path="/v2/models/no-such-model/infer"),
    infer("v2-unknown-version", lambda: v2([uint8_input()]), 404, path=f"/v2/models/{MODEL}/versions/999/infer"),
    get("v2-unknown-version-ready", f"/v2/models/{MODEL}/versions/999/ready", 404),
    get("v2-unknown-model-metadata", "/v2/models/no-such-model", 404),
    get("v2-model-traversal-encoded", "/v2/models/..%2F..%2Fetc", "4xx"),
    get("v2-get-on-infer", INFER, 405),
    get("v2-version-metadata", f"/v2/models/{MODEL}/versions/{VERSION}", 200),
]
# fmt: on


def corpus_params() -> list[Any]:
    return [pytest.param(case, id=case.id) for case in CORPUS]


@pytest.fixture(scope="module")
def hardened(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the corpus, the key and the log tests: API key on, lowered limits."""
    with running_server(tmp_path_factory.mktemp("hardened"), api_key=",".join(API_KEYS), **LIMITS) as server:
        yield server


@pytest.fixture(scope="module")
def http(hardened: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hardened.url, timeout=30, headers={"X-API-Key": API_KEYS[0]}) as client:
        yield client


def send(http: httpx.Client, case: Case) -> httpx.Response:
    headers = {"X-Request-ID": f"corpus-{case.id}", **case.headers}
    if case.content_type:
        headers["Content-Type"] = case.content_type
    return http.request(
        case.method,
        case.path,
        content=case.body() if case.body else None,
        files=case.files() if case.files else None,
        data=case.data,
        params=case.params,
        headers=headers,
    )


def assert_error_shape(response: httpx.Response) -> None:
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body


def test_npz_bomb_is_refused_before_it_is_inflated(hardened: Server, http: httpx.Client) -> None:
    """First in the module, so that the peak RSS (VmHWM) is not already high from other cases."""
    before = hardened.rss_kib("VmHWM")
    response = http.post(BATCH, content=npz_bomb(), headers={"Content-Type": "application/x-npz"})
    grown = (hardened.rss_kib("VmHWM") - before) / 1024
    print(f"npz bomb: {len(npz_bomb())} bytes sent, peak RSS grew by {grown:.0f} MiB")
    assert response.status_code == 413
    assert grown < 50, f"the .npz member was inflated ({grown:.0f} MiB) before its row count was checked"


@pytest.mark.parametrize("case", corpus_params())
def test_corpus(http: httpx.Client, case: Case) -> None:
    response = send(http, case)
    status = response.status_code
    assert status < 500, f"{case.id}: {status} {response.text[:300]}"
    if case.expect == "4xx":
        assert 400 <= status < 500, f"{case.id}: {status} {response.text[:300]}"
    elif case.expect == "no-5xx":  # either answer is right: served, or refused with a clear 4xx
        assert status == 200 or 400 <= status < 500, f"{case.id}: {status} {response.text[:300]}"
    else:
        assert status == case.expect, f"{case.id}: {status} {response.text[:300]}"
    if status >= 400:
        assert_error_shape(response)
    assert response.headers.get("x-request-id") == f"corpus-{case.id}"


def test_corpus_is_broad_enough() -> None:
    invalid = [c for c in CORPUS if c.expect != 200]
    valid = [c for c in CORPUS if c.expect == 200]
    paths = {c.path for c in CORPUS}
    assert len(invalid) >= 40 and len(valid) >= 15
    assert {PREDICT, BATCH, MAPS, INFER} <= paths


RAW_CASES = {
    # What httpx will not send: dot segments, broken framing. Broken framing is answered by the connection's
    # protocol (service/api/protocol.py), before the app, in the same JSON shape: {"error": "invalid HTTP ..."}.
    "dot-segments-v2-infer": (b"POST /v2/models/../infer HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}", True),
    "dot-segments-v1-models": (b"GET /v1/models/../../../etc/passwd HTTP/1.1\r\nHost: t\r\n\r\n", True),
    "content-length-not-a-number": (b"POST /v1/predict HTTP/1.1\r\nHost: t\r\nContent-Length: ten\r\n\r\n", True),
    "content-length-and-chunked": (
        b"POST /v1/predict HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        True,
    ),
    "bad-chunk-size": (
        b"POST /v1/predict HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Type: image/png\r\n\r\n"
        b"zz\r\nabc\r\n0\r\n\r\n",
        True,
    ),
    "garbage-request-line": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 TLS hello\r\n\r\n", True),
    "header-5MB": (b"GET /v1/models HTTP/1.1\r\nHost: t\r\nX-Big: " + b"b" * 5_000_000 + b"\r\n\r\n", True),
}


@pytest.mark.parametrize("name", list(RAW_CASES))
def test_raw_protocol_abuse(hardened: Server, name: str) -> None:
    data, json_expected = RAW_CASES[name]
    if b"X-API-Key" not in data:
        data = data.replace(b"Host: t\r\n", f"Host: t\r\nX-API-Key: {API_KEYS[0]}\r\n".encode(), 1)
    status, head, body = raw_request(hardened.url, data)
    assert 400 <= status < 500, (status, head[:300])
    if json_expected:
        assert isinstance(json.loads(body)["error"], str)


def test_service_still_healthy_after_the_corpus(hardened: Server, http: httpx.Client) -> None:
    assert http.get("/readyz").status_code == 200
    response = http.post(PREDICT, content=good_png(), headers={"Content-Type": "image/png"})
    assert response.status_code == 200 and response.json()["label"]
    assert hardened.process.poll() is None
    # Every line the server logged for the corpus: no 5xx (the raw framing cases that the app saw only
    # half of are 499: the client's body was cut, nobody is waiting).
    server_errors = [r for r in hardened.access_log() if (r["status"] or 0) >= 500]
    assert not server_errors, server_errors[:5]


# --------------------------------------------------------------------------------------- API key


def test_api_key_required_with_the_error_shape(hardened: Server) -> None:
    with httpx.Client(base_url=hardened.url, timeout=10) as anonymous:
        missing = anonymous.get("/v1/models")
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert_error_shape(missing)
        wrong = anonymous.get("/v1/models", headers={"Authorization": "Bearer not-the-key"})
        assert wrong.status_code == 401 and "invalid_token" in wrong.headers["www-authenticate"]
        assert_error_shape(wrong)
        for headers in (
            {"Authorization": f"Bearer {API_KEYS[0]}"},
            {"Authorization": f"bearer {API_KEYS[1]}"},
            {"X-API-Key": API_KEYS[1]},
            {"Authorization": "Basic dXNlcjpwdw==", "X-API-Key": API_KEYS[0]},
        ):
            assert anonymous.get("/v1/models", headers=headers).status_code == 200, headers
        assert anonymous.get("/v1/models", headers={"X-API-Key": API_KEYS[0][:-1]}).status_code == 401
        assert anonymous.get("/v1/models", headers={"Authorization": API_KEYS[0]}).status_code == 401
        # Inference is refused before the body is read or any work is done.
        refused = anonymous.post(PREDICT, content=good_png(), headers={"Content-Type": "image/png"})
        assert refused.status_code == 401
        # Open: health, readiness and metrics (the last one may not exist: then 404, never 401).
        for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
            assert anonymous.get(path).status_code == 200, path
        assert anonymous.get("/metrics").status_code != 401
        # Open for GET and HEAD: the pages and their files, which ask for the key themselves.
        for path in ("/", "/web/app.js", "/docs", "/redoc", "/docs/assets/swagger-ui-bundle.js", "/openapi.json"):
            assert anonymous.get(path).status_code == 200, path
        # Protected: every API route, and any other method or path near the open ones.
        for path in (f"/v2/models/{MODEL}", "/v2", "/docs/", "/docs/assets/", "/web/app.js/"):
            assert anonymous.get(path).status_code == 401, path
        assert anonymous.post("/", content=b"x").status_code == 401
        assert anonymous.post("/openapi.json", content=b"x").status_code == 401


# ---------------------------------------------------------------------------- request ids, logs


def test_request_id_echo_and_json_access_log(hardened: Server, http: httpx.Client) -> None:
    png = good_png()
    given = http.post(
        PREDICT, files=upload("shirt.png", png), headers={"X-Request-ID": "client-id-42"}, params={"top_k": "2"}
    )
    assert given.status_code == 200 and given.headers["x-request-id"] == "client-id-42"
    made = http.get("/v1/models", headers={"X-Request-ID": "x" * 129}, params={"q": "v" * 5000})
    generated = made.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated), generated
    fresh = http.get("/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", fresh) and fresh != generated
    failed = http.post(PREDICT, content=b"junk", headers={"Content-Type": "image/png", "X-Request-ID": "bad-1"})
    assert failed.status_code == 400 and failed.headers["x-request-id"] == "bad-1"

    lines = hardened.wait_for_log({"client-id-42", generated, fresh, "bad-1"})
    assert set(lines) == {"client-id-42", generated, fresh, "bad-1"}
    ok = lines["client-id-42"]
    assert ok["method"] == "POST" and ok["path"] == PREDICT and ok["status"] == 200 and ok["query"] == "top_k=2"
    assert ok["bytes_in"] > len(png) and ok["bytes_out"] == len(given.content) and ok["client"] == "127.0.0.1"
    assert isinstance(ok["duration_ms"], float) and 0 <= ok["duration_ms"] < 30_000
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", ok["ts"])
    assert lines["bad-1"]["status"] == 400
    long_query = lines[generated]["query"]
    assert long_query.startswith("q=vvvv") and len(long_query) < 100
    # Never image bytes or bodies, in the access log or anywhere in the server's output.
    everything = hardened.stdout.read_text(errors="replace") + hardened.errors()
    for marker in ("PNG\r\n", "IHDR", "IDAT", base64.b64encode(png[:30]).decode()[:20], "\\u0089PNG"):
        assert marker not in everything, marker
    assert all(len(line) < 4000 for line in hardened.stdout.read_text(errors="replace").splitlines())
