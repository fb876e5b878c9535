"""Every decoder's every failure is a 4xx: image files of each format, .npy and .npz files, gzip/deflate bodies
and V2 JSON, truncated at every byte, with random bytes flipped and with random header fields. Seeded and
bounded (a few hundred cases per decoder); a failure names the case so it can be replayed.

What counts as right: a result of the right shape, or a ServiceError of 400, 413 or 415. Anything else (an
exception of another type: MemoryError, zlib.error, struct.error, ValueError from numpy, ...) would be a 500.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from PIL import Image

from service import arrays, imaging
from service.api import v2_codec
from service.errors import ServiceError
from service.memory import MemoryBudget
from tests.support import encoded, garment, npy_of, png_chunk, png_strip

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt files

CLIENT_ERRORS = {400, 413, 415}
# Small enough that the random header fields' sizes reach it (413 from the budget, not from Pillow).
BUDGET = MemoryBudget(64 * 1024 * 1024, wait_s=0)
LIMITS = imaging.ImageLimits()


def outcome(call: Callable[[], object], case: str) -> str:
    """ "ok", or the 4xx status of the ServiceError raised; any other exception fails the test naming `case`."""
    try:
        call()
    except ServiceError as exc:
        assert exc.status_code in CLIENT_ERRORS, f"{case}: {exc.status_code} {exc.message}"
        assert exc.message, case
        return str(exc.status_code)
    except Exception as exc:  # noqa: BLE001 (the point: none may escape as anything but a ServiceError)
        pytest.fail(f"{case}: {type(exc).__name__}: {exc}")
    return "ok"


def mutations(clean: bytes, rng: random.Random, flips: int) -> Iterator[tuple[str, bytes]]:
    """Every truncation, then `flips` copies with 1-4 random bytes changed (anywhere after the first 4)."""
    for length in range(len(clean)):
        yield f"cut at {length}", clean[:length]
    for trial in range(flips):
        data = bytearray(clean)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(min(4, len(data) - 1), len(data))] = rng.randrange(256)
        yield f"flip trial {trial}", bytes(data)


def check_image(data: bytes, case: str) -> str:
    def run() -> None:
        tensor = imaging.preprocess(data, LIMITS, BUDGET)
        assert tensor.shape == (28, 28, 1) and tensor.dtype == np.float32, case

    result = outcome(run, case)
    assert BUDGET.used == 0, f"{case}: {BUDGET.used} bytes left reserved"
    return result


SMALL_IMAGES: dict[str, Callable[[], bytes]] = {
    "png": lambda: encoded(garment((24, 20)), "PNG"),
    "png-rgba": lambda: encoded(garment((24, 20), "RGBA"), "PNG"),
    "png-16-bit": lambda: encoded(Image.fromarray(np.asarray(garment((20, 16))).astype(np.uint16) * 257), "PNG"),
    "jpeg": lambda: encoded(garment((24, 20), "RGB"), "JPEG", quality=80),
    "gif": lambda: encoded(garment((24, 20)), "GIF"),
    "bmp": lambda: encoded(garment((16, 12)), "BMP"),
    "tiff": lambda: encoded(garment((16, 12)), "TIFF"),
    "webp": lambda: encoded(garment((24, 20), "RGBA"), "WEBP", quality=80),
    "webp-lossless": lambda: encoded(garment((24, 20)), "WEBP", lossless=True),
}


@pytest.mark.parametrize("kind", list(SMALL_IMAGES))
def test_images_truncated_and_flipped(kind: str) -> None:
    rng = random.Random(f"images-{kind}")
    clean = SMALL_IMAGES[kind]()
    results = [check_image(data, f"{kind} {case}") for case, data in mutations(clean, rng, 150)]
    assert results[-1] in ("ok", "400")
    assert check_image(clean, kind) == "ok"


def png_with_header(width: int, height: int, depth: int, colour: int, interlace: int) -> bytes:
    row = b"\0" + bytes(8)
    return (
        imaging.PNG_SIGNATURE
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace))
        + png_chunk(b"IDAT", zlib.compress(row * 4))
        + png_chunk(b"IEND", b"")
    )


def test_random_image_header_fields() -> None:
    """Sizes of any aspect ratio and magnitude, odd depths and colour types, in PNG, GIF, BMP and WebP headers."""
    rng = random.Random("headers")
    sizes = [0, 1, 2, 27, 28, 448, 4097, 65535, 1 << 20, 12_500_000, (1 << 31) - 1, (1 << 32) - 1]
    seen = set()
    for trial in range(300):
        width, height = rng.choice(sizes), rng.choice(sizes)
        kind = trial % 4
        if kind == 0:
            data = png_with_header(
                width, height, rng.choice([1, 2, 4, 8, 16, 3]), rng.choice([0, 2, 3, 4, 6, 5]), rng.randint(0, 1)
            )
        elif kind == 1:
            data = b"GIF89a" + struct.pack("<HHBBB", width & 0xFFFF, height & 0xFFFF, 0, 0, 0)
            data += b"," + struct.pack("<HHHHB", 0, 0, width & 0xFFFF, height & 0xFFFF, 0) + b"\x08\x02\x4c\x01\x00;"
        elif kind == 2:
            info = struct.pack(
                "<IiiHHIIiiII",
                40,
                width & 0x7FFFFFFF,
                height & 0x7FFFFFFF,
                1,
                rng.choice([1, 8, 24, 32]),
                0,
                0,
                0,
                0,
                0,
                0,
            )
            data = b"BM" + struct.pack("<IHHI", 54 + len(info), 0, 0, 54) + info + bytes(64)
        else:
            bits = ((max(width, 1) - 1) & 0x3FFF) | (((max(height, 1) - 1) & 0x3FFF) << 14)
            payload = b"\x2f" + struct.pack("<I", bits) + bytes(32)
            data = (
                b"RIFF"
                + struct.pack("<I", 4 + 8 + len(payload))
                + b"WEBPVP8L"
                + struct.pack("<I", len(payload))
                + payload
            )
        seen.add(check_image(data, f"header trial {trial}: {width}x{height} kind {kind}"))
    assert "413" in seen and "400" in seen


def test_extreme_aspect_ratios_decode() -> None:
    """Valid images of any shape within the pixel limit give a tensor (no buffer sized from the aspect ratio)."""
    for width, height in [(12_500_000, 2), (2, 12_500_000), (25_000_000, 1), (100_000, 250), (250, 100_000)]:
        assert check_image(png_strip(width, height), f"{width}x{height}") == "ok"
    # to_model_input itself, handed a long thin image directly
    strip = Image.new("L", (200_000, 3), 0)
    strip.paste(255, (0, 1, 150_000, 2))
    assert imaging.to_model_input(strip).shape == (28, 28, 1)


# ------------------------------------------------------------------------------------------ arrays


def check_array(data: bytes, case: str) -> str:
    def run() -> None:
        batch = arrays.load_array_file(data, 16, BUDGET)
        assert batch.ndim == 4 and batch.shape[1:] == (28, 28, 1), case

    result = outcome(run, case)
    assert BUDGET.used == 0, f"{case}: {BUDGET.used} bytes left reserved"
    return result


def test_npy_truncated_and_flipped() -> None:
    rng = random.Random("npy")
    clean = npy_of(np.random.default_rng(0).integers(0, 256, (2, 28, 28), np.uint8))
    # every cut of the header, a few of the data (each cut there is the same "too short" case)
    cases = [
        (c, d) for c, d in mutations(clean, rng, 200) if not c.startswith("cut") or len(d) < 200 or len(d) % 97 == 0
    ]
    results = {check_array(data, f"npy {case}") for case, data in cases}
    assert results <= {"ok", "400", "413"} and "400" in results


def npz_bytes(compression: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        archive.writestr("images.npy", npy_of(np.zeros((2, 28, 28), np.uint8)))
    return buffer.getvalue()


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_npz_truncated_and_flipped(compression: int) -> None:
    rng = random.Random(f"npz-{compression}")
    clean = npz_bytes(compression)
    cases = [
        (c, d)
        for c, d in mutations(clean, rng, 250)
        if not c.startswith("cut") or len(d) % 7 == 0 or len(d) > len(clean) - 120
    ]
    results = {check_array(data, f"npz {case}") for case, data in cases}
    assert "400" in results


def test_npz_random_header_fields() -> None:
    """Random values in the zip headers' fields that matter: flags, method, sizes, CRC, name length, offsets."""
    rng = random.Random("zip-fields")
    clean = npz_bytes(zipfile.ZIP_DEFLATED)
    local, central, end = clean.find(b"PK\x03\x04"), clean.find(b"PK\x01\x02"), clean.find(b"PK\x05\x06")
    fields = [
        (local + 6, "<H"), (local + 8, "<H"), (local + 14, "<I"), (local + 18, "<I"), (local + 22, "<I"),
        (local + 26, "<H"), (local + 28, "<H"),
        (central + 8, "<H"), (central + 10, "<H"), (central + 16, "<I"), (central + 20, "<I"), (central + 24, "<I"),
        (central + 28, "<H"), (central + 30, "<H"), (central + 42, "<I"),
        (end + 8, "<H"), (end + 10, "<H"), (end + 12, "<I"), (end + 16, "<I"), (end + 20, "<H"),
    ]  # fmt: skip
    values = {"<H": [0, 1, 8, 9, 12, 14, 99, 0x0801, 0xFFFF], "<I": [0, 1, 100, 1 << 20, 1 << 31, 0xFFFFFFFF]}
    for trial in range(300):
        data = bytearray(clean)
        for _ in range(rng.randint(1, 3)):
            offset, fmt = rng.choice(fields)
            struct.pack_into(fmt, data, offset, rng.choice(values[fmt]))
        check_array(bytes(data), f"zip fields trial {trial}")


def test_npy_random_header_fields() -> None:
    rng = random.Random("npy-fields")
    descrs = ["|u1", "<f4", "<f8", "|b1", "<i8", "<U100000", "|V16", "|O", "<c16", "[('a', '<f4')]", "<f2", "'garbage"]
    shapes = [
        "(2, 28, 28)",
        "(0, 28, 28)",
        "(10**9, 28, 28)",
        "(-1, 28, 28)",
        "(2, 28, 28, 1)",
        "(2, 28)",
        "()",
        "(2, 28, 28, 3)",
        "'x'",
        "(2**62, 28, 28)",
    ]  # noqa: E501
    for trial in range(200):
        order = rng.choice(["False", "True", "1", "None"])
        header = f"{{'descr': {rng.choice(descrs)!r}, 'fortran_order': {order}, 'shape': {rng.choice(shapes)}, }}"
        if rng.random() < 0.1:
            header = header[: rng.randrange(len(header))]
        raw = header.encode()
        raw += b" " * (63 - (10 + len(raw)) % 64) + b"\n"
        data = (
            b"\x93NUMPY"
            + bytes([rng.choice([1, 2, 3, 9]), 0])
            + struct.pack("<H", len(raw))
            + raw
            + bytes(rng.choice([0, 784, 1568, 6272]))
        )
        check_array(data, f"npy fields trial {trial}: {header}")


# --------------------------------------------------------------------------------- gzip and V2 JSON


def test_compressed_bodies_truncated_and_flipped() -> None:
    rng = random.Random("gzip")
    body = json.dumps(
        {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 784}]}
    ).encode()
    for encoding, clean in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        for case, data in mutations(clean, rng, 200):
            outcome(lambda d=data, e=encoding: v2_codec.decode_content(d, e, 1 << 20), f"{encoding} {case}")


def test_v2_json_truncated_and_flipped() -> None:
    rng = random.Random("json")
    clean = json.dumps(
        {
            "id": "x",
            "inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 28, 28], "data": [[[0] * 28] * 28]}],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}],
        }
    ).encode()
    max_tokens = v2_codec.max_json_tokens(16, 784)

    def parse(data: bytes) -> None:
        parsed = v2_codec.parse_request(data, None, 1 << 20, max_tokens)
        for tensor, raw in zip(parsed.header.inputs, parsed.raw, strict=True):
            v2_codec.decode_input(tensor, raw)

    cases = [(c, d) for c, d in mutations(clean, rng, 300) if not c.startswith("cut") or len(d) % 13 == 0]
    results = {outcome(lambda data=data: parse(data), f"json {case}") for case, data in cases}
    assert "400" in results
    # Shapes no valid request has: more values and arrays than the largest batch, refused before parsing.
    flood = (
        b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [' + b"[]," * max_tokens + b"[]]}]}"
    )
    assert outcome(lambda: parse(flood), "flood of empty arrays") == "413"
