"""Uploaded image bytes -> the model's input: float32 [28, 28, 1] in [0, 1], light garment on black.

Fashion-MNIST was made from shop photos (garment on a light background) by trimming the
background, scaling the longest edge to 28 px, centring on a square canvas, negating and
converting to grayscale; every image ends up with its brightest pixel at 254-255. `to_model_input`
repeats those steps so that a photo looks like the data the model was trained on, and leaves an
image that is already in the data set's form (28x28, dark background) exactly as it is.

Nothing here knows about HTTP or the model; failures are raised as the classes in service.errors.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from service import memory
from service.errors import BadInput, ServiceError, TooLarge, UnsupportedMedia
from service.memory import MemoryBudget

SIZE = 28  # Fashion-MNIST images are 28x28
# A garment pixel differs from the background by more than this fraction of the garment's peak
# contrast (the data set's trim used 5% of full scale), and by at least NOISE_FLOOR grey levels so
# that JPEG noise in a flat background is not taken for garment.
TRIM_FRACTION = 0.1
NOISE_FLOOR = 10
# Transparent images go on white unless their visible pixels average lighter than this (see _flatten).
LIGHT_CONTENT = 200
# Anti-aliased downscaling; the data set's originals fill the longest edge, as the fit here does.
RESAMPLE = Image.Resampling.LANCZOS
# JPEGs are decoded at 1/2, 1/4 or 1/8 scale (in the DCT, nearly free) as long as the longest edge
# stays at least this long: far more detail than 28 px needs, even for a garment a quarter of the frame.
# Other formats are decoded whole and then reduced (box-averaged by a whole factor, Image.reduce) to the
# same edge before anything else is done with them: every later step works on a small image.
JPEG_DRAFT_EDGE = 448
# Bytes per pixel of Pillow's storage, by mode: 1 for 1/L/P, 2 for I;16*, else 4 (RGB, LA, I, F, ... are
# stored in 32 bits). What a decode costs is judged from this and the header, before any pixel is decoded.
_ONE_BYTE_MODES = frozenset({"1", "L", "P"})
# Working memory beyond the decoded pixels, in bytes per pixel, by format: libtiff's strip or RGBA raster
# buffers; libwebp's two canvases and the frame's bytes. Measured (peak RSS of one decode,
# tests/unit/test_memory.py).
_DECODER_BYTES_PER_PIXEL = {"TIFF": 4, "WEBP": 12}
# Opening a file (its header read into Python objects) costs up to this much per byte of file: TIFF tags are
# read whole (a 4-byte value becomes a 36-byte int in a tuple); other formats keep about their metadata.
_OPEN_BYTES_PER_FILE_BYTE = {"TIFF": 20}
# PNG text chunks are read into memory up to this total (Pillow's default: 64 MiB); none is needed here.
PngImagePlugin.MAX_TEXT_MEMORY = 4 * 1024 * 1024
# The reduction works tile by tile (tiles of about REDUCE_TILE² pixels, each a whole number of boxes): the
# conversions it needs (a palette or bilevel image expanded, since averaging palette indices means nothing;
# 16-bit to 32-bit; alpha premultiplied, as Image.reduce does) then cost a few tiles, not a few full images.
REDUCE_TILE = 1024
# What the tiles, the reduced image and the conversions after it may cost at most, in bytes.
_REDUCED_BYTES = REDUCE_TILE**2 * 16 + (2 * JPEG_DRAFT_EDGE) ** 2 * 16
# Pillow names a phone's JPEG with extra pictures (a depth map, a preview) "MPO"; its first is a JPEG.
_ALIASES = {"MPO": "JPEG"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Signatures of the usual formats, to tell "a corrupt PNG" from "not an image at all".
_MAGIC = (
    ("PNG", PNG_SIGNATURE),
    ("JPEG", b"\xff\xd8\xff"),
    ("GIF", b"GIF87a"),
    ("GIF", b"GIF89a"),
    ("BMP", b"BM"),
    ("TIFF", b"II*\x00"),
    ("TIFF", b"MM\x00*"),
    ("WEBP", b"WEBP"),
)
_MAGIC_AT = {"WEBP": 8}  # after "RIFF" and the length
# 8-bit PNG colour types -> Pillow mode (also the decoder's raw mode), for the fast path (_plain_png).
_PLAIN_PNG_MODES = {0: "L", 2: "RGB", 4: "LA", 6: "RGBA"}
# Chunks that change nothing Pillow decodes or this module reads, with their lengths (Pillow refuses some
# when short). Any other one (PLTE, tRNS, eXIf, text that may carry EXIF or XMP orientation, APNG frames,
# unknown chunks) sends the file down the full path.
_INERT_PNG_CHUNKS = {b"pHYs": 9, b"sRGB": 1, b"gAMA": 4, b"cHRM": 32, b"tIME": 7}
# Pillow's plugins raise a zoo of exception types on malformed input (OSError, ValueError,
# SyntaxError, struct.error, EOFError, IndexError, ...), so the few lines that run Pillow on
# untrusted bytes catch Exception: every one of them means "bad image".


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 25_000_000  # width*height, checked from the header BEFORE decoding pixels
    formats: frozenset[str] = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"})

    @property
    def allowed(self) -> str:
        """The formats as error messages list them."""
        return ", ".join(sorted(self.formats))


def preprocess(data: bytes, limits: ImageLimits = ImageLimits(), budget: MemoryBudget | None = None) -> np.ndarray:
    """Image file bytes -> float32 [28, 28, 1] in [0, 1]."""
    return to_model_input(decode(data, limits, budget))


def decode_cost(width: int, height: int, mode: str, fmt: str | None) -> int:
    """Worst-case bytes that decoding a width x height image of this mode and format holds at once: its
    pixels as Pillow stores them, the decoder's own buffers, and the tiled reduction and the steps after it
    (bounded whatever the size)."""
    pixels = width * height
    per_pixel = 1 if mode in _ONE_BYTE_MODES else 2 if mode.startswith("I;16") else 4
    per_pixel += _DECODER_BYTES_PER_PIXEL.get(fmt or "", 0)
    return pixels * per_pixel + min(pixels * 16, _REDUCED_BYTES)


def decode(data: bytes, limits: ImageLimits = ImageLimits(), budget: MemoryBudget | None = None) -> Image.Image:
    """Checked, decoded, EXIF-upright first frame, flattened onto a background, mode "L"; reduced to a
    longest edge of about JPEG_DRAFT_EDGE-2*JPEG_DRAFT_EDGE when larger. With a `budget`, the decode's
    working memory (decode_cost, from the header) is reserved from it first: 413 if it can never fit, 503
    if no room comes in time."""
    if not data:
        raise BadInput("empty upload: no image data received")
    if len(data) > limits.max_bytes:
        raise TooLarge(f"image file is {len(data):,} bytes; the limit is {limits.max_bytes:,} bytes")
    with _reserve(budget, _plain_png_cost(data, limits), "PNG"):
        if (plain := _plain_png(data, limits)) is not None:
            # No orientation to apply: _plain_png takes no file that could carry one.
            return _to_gray(_reduced(plain))
    _reject_documents(data, limits)
    claimed = _claimed_format(data)
    # WebP's decoder allocates its canvas when the file is opened, before Pillow's own size check: the size
    # comes from the file's header first (a 1 KB file claiming 16383 x 16383 asked for 2 GiB).
    canvas = _webp_canvas(data) if claimed == "WEBP" and claimed in limits.formats else None
    if canvas is not None:
        _check_size(*canvas, limits)
    # Opening reads the header into Python objects, in proportion to the file (TIFF tags above all).
    opening = len(data) * _OPEN_BYTES_PER_FILE_BYTE.get(claimed or "", 2)
    if canvas is not None:
        opening += decode_cost(*canvas, "RGBA", "WEBP")
    with _reserve(budget, opening, f"{claimed or 'image'} file"):
        image = _open(data, limits)
        _check_size(*image.size, limits)
        return _decode_opened(image, budget if canvas is None else None)


def _check_size(width: int, height: int, limits: ImageLimits) -> None:
    if width <= 0 or height <= 0:
        raise BadInput(f"image has zero size ({width}x{height})")
    if width * height > limits.max_pixels:
        raise TooLarge(
            f"image is {width}x{height} = {width * height:,} pixels; the limit is {limits.max_pixels:,} pixels"
        )


def _decode_opened(image: Image.Image, budget: MemoryBudget | None) -> Image.Image:
    """An opened image's first frame, decoded within its reservation, upright, reduced, grey."""
    width, height = image.size
    try:
        if image.format in ("JPEG", "MPO") and max(width, height) >= 2 * JPEG_DRAFT_EDGE:
            scale = JPEG_DRAFT_EDGE / max(width, height)
            image.draft("L", (math.ceil(width * scale), math.ceil(height * scale)))
        cost = decode_cost(*image.size, image.mode, image.format)  # after draft: the size it will decode at
        with _reserve(budget, cost, f"{image.format} image of {image.size[0]}x{image.size[1]} {image.mode}"):
            image.load()  # the first frame only, for GIF, WebP and TIFF
            method = _orientation(image)
            reduced = _reduced(image)
            if reduced is image:
                _exif_upright(image)
            else:
                image.close()  # the full-size pixels go now, not when the caller lets go
                if method is not None:
                    reduced = reduced.transpose(method)
            gray = _to_gray(reduced)
    except (ServiceError, memory.Cancelled):
        raise
    except Image.DecompressionBombError as exc:
        raise TooLarge(f"image rejected as a decompression bomb: {exc}") from None
    except MemoryError:
        raise TooLarge("image too large to decode in memory") from None
    except Exception as exc:
        raise BadInput(f"{image.format} image could not be decoded (truncated or corrupt): {exc}") from None
    return gray


def to_model_input(image: Image.Image) -> np.ndarray:
    """An "L" image -> float32 [28, 28, 1]: polarity, trim to the garment, longest edge 28, centred."""
    if image.mode != "L":
        raise ValueError(f"to_model_input needs a mode 'L' image, got {image.mode!r}")
    pixels = np.asarray(image)
    height, width = pixels.shape
    border = np.concatenate((pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]))
    background = int(np.partition(border, len(border) // 2)[len(border) // 2])  # the median, fast
    negate = background > 127  # a light background: a photo, so the garment is the dark part

    if (height, width) == (SIZE, SIZE) and not negate:
        # Already in the data set's form: pass it through untouched.
        return (pixels.astype(np.float32) / 255.0).reshape(SIZE, SIZE, 1)

    # Contrast of the garment against the background; pixels on the other side of it count as background.
    peak = background - int(pixels.min()) if negate else int(pixels.max()) - background
    threshold = max(NOISE_FLOOR, round(TRIM_FRACTION * peak))
    if peak <= threshold:
        return np.zeros((SIZE, SIZE, 1), np.float32)  # blank: nothing but background
    mask = pixels < background - threshold if negate else pixels > background + threshold
    # A row or column belongs to the garment when at least two pixels in it do: one odd pixel is noise.
    rows = np.flatnonzero(np.count_nonzero(mask, axis=1) >= 2)
    cols = np.flatnonzero(np.count_nonzero(mask, axis=0) >= 2)
    if rows.size == 0 or cols.size == 0:
        return np.zeros((SIZE, SIZE, 1), np.float32)
    crop = pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    crop_h, crop_w = crop.shape
    if max(crop_h, crop_w) >= 4 * JPEG_DRAFT_EDGE:
        # Work at most ~2*JPEG_DRAFT_EDGE px long: the margin below grows with the scale (a 12,500,000 x 2
        # crop would need a 900,000-row margin), and 28 px need no more detail. decode() has reduced its
        # images already; this is for callers that hand over a large one themselves.
        factor = max(crop_h, crop_w) // (2 * JPEG_DRAFT_EDGE)
        crop = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).reduce(factor))
        crop_h, crop_w = crop.shape

    # The longest edge becomes 28 px and the other keeps the aspect ratio, rounded to whole pixels
    # as the data set's were. The source box is then widened or narrowed to match that rounding
    # so that both axes scale by exactly the same factor and the garment stays centred in its box.
    scale = SIZE / max(crop_h, crop_w)
    out_w, out_h = max(1, round(crop_w * scale)), max(1, round(crop_h * scale))
    pad = math.ceil(1 / scale) + 1  # room for that widening: a zero margin, i.e. more background

    # Distance from the background in the garment's direction, so the background becomes 0 (black).
    garment = np.zeros((crop_h + 2 * pad, crop_w + 2 * pad), np.uint8)
    inner = garment[pad:-pad, pad:-pad]
    bg = np.uint8(background)
    if negate:
        np.subtract(bg, np.minimum(crop, bg), out=inner)
    else:
        np.subtract(np.maximum(crop, bg), bg, out=inner)
    box_w, box_h = out_w / scale, out_h / scale
    box = (
        pad + (crop_w - box_w) / 2,
        pad + (crop_h - box_h) / 2,
        pad + (crop_w + box_w) / 2,
        pad + (crop_h + box_h) / 2,
    )
    fitted = Image.fromarray(garment).resize((out_w, out_h), RESAMPLE, box=box, reducing_gap=3.0)
    values = np.asarray(fitted, dtype=np.float32)

    out = np.zeros((SIZE, SIZE, 1), np.float32)
    top = values.max()
    if top <= 0:
        return out
    # Odd leftover space goes before the garment (left/top), as in the data set; and the data set's
    # brightest pixel is 254-255 in every image, so stretch to full scale likewise.
    y0, x0 = (SIZE - out_h + 1) // 2, (SIZE - out_w + 1) // 2
    out[y0 : y0 + out_h, x0 : x0 + out_w, 0] = values / top
    return out


def input_png(tensor: np.ndarray) -> bytes:
    """A [28, 28, 1] (or [H, W]) tensor in [0, 1] -> 8-bit grayscale PNG bytes."""
    pixels = np.asarray(tensor, dtype=np.float32)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim != 2:
        raise ValueError(f"expected a [H, W, 1] tensor, got shape {tensor.shape}")
    pixels = np.nan_to_num(pixels, nan=0.0)
    return _png(np.rint(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8))


def feature_grid_png(fmap: np.ndarray, scale: int = 4) -> bytes:
    """One image's activations [H, W, C] -> a PNG of its C channels in a near-square grid.

    Each channel is min-max normalised on its own (a constant channel renders black); cells are
    separated by a 1-px grey line, and the grid is enlarged `scale` times with nearest neighbour.
    """
    acts = np.asarray(fmap, dtype=np.float32)
    if acts.ndim != 3 or min(acts.shape) < 1:
        raise ValueError(f"expected a non-empty [H, W, C] feature map, got shape {acts.shape}")
    if scale < 1:
        raise ValueError(f"scale must be at least 1, got {scale}")
    acts = np.nan_to_num(acts, nan=0.0, posinf=0.0, neginf=0.0)
    height, width, channels = acts.shape
    low = acts.min(axis=(0, 1))
    span = acts.max(axis=(0, 1)) - low
    # Constant channels: divide by 1 instead of 0, which leaves them at 0 (black).
    norm = (acts - low) / np.where(span > 0, span, 1.0)
    cells = np.rint(norm * 255.0).astype(np.uint8)

    cols = math.ceil(math.sqrt(channels))
    rows = math.ceil(channels / cols)
    grid = np.full((rows * (height + 1) - 1, cols * (width + 1) - 1), 128, np.uint8)
    for c in range(channels):
        r, k = divmod(c, cols)
        grid[r * (height + 1) : r * (height + 1) + height, k * (width + 1) : k * (width + 1) + width] = cells[:, :, c]
    if scale > 1:
        grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    return _png(grid)


# ----------------------------------------------------------------------------------------------


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@contextlib.contextmanager
def _reserve(budget: MemoryBudget | None, cost: int, what: str) -> Iterator[None]:
    """Hold `cost` bytes of the budget while the block runs (nothing without a budget or a cost)."""
    if budget is None or cost <= 0:
        yield
        return
    with budget.reserve(cost, f"decoding this {what}"):
        yield


def _reduced(image: Image.Image) -> Image.Image:
    """The image box-averaged by a whole factor to a longest edge of JPEG_DRAFT_EDGE..2*JPEG_DRAFT_EDGE px, or
    itself when it is not longer than that. Palette, bilevel and 16-bit images are expanded (Image.reduce
    takes none of them), and a colour key ("transparency") becomes an alpha channel, which averages; all of it
    tile by tile (REDUCE_TILE), each tile a whole number of boxes, so the result is Image.reduce's exactly."""
    factor = max(image.size) // JPEG_DRAFT_EDGE
    if factor < 2:
        return image
    width, height = image.size
    step = max(factor, REDUCE_TILE // factor * factor)  # tile side: a multiple of the factor
    out: Image.Image | None = None
    for top in range(0, height, step):
        for left in range(0, width, step):
            tile = _expanded(image.crop((left, top, min(width, left + step), min(height, top + step))))
            small = tile.reduce(factor)
            if out is None:
                out = Image.new(small.mode, (-(-width // factor), -(-height // factor)))
            out.paste(small, (left // factor, top // factor))
    assert out is not None
    # 16-bit images are reduced as 32-bit and back, so that _to_gray scales them as the 16-bit images they are.
    return out.convert("I;16") if image.mode.startswith("I;16") else out


def _expanded(image: Image.Image) -> Image.Image:
    """A mode Image.reduce takes and averages meaningfully."""
    if image.mode.startswith("I;16"):
        return image.convert("I")
    if image.mode in ("P", "PA") or "transparency" in image.info:
        transparent = image.mode == "PA" or "transparency" in image.info
        return image.convert("RGBA" if transparent else "RGB")
    if image.mode == "1":
        return image.convert("L")
    return image


_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(image: Image.Image) -> Image.Transpose | None:
    """The transposition the file's EXIF orientation asks for (as ImageOps.exif_transpose reads it); None
    for none or unreadable EXIF."""
    try:
        return _TRANSPOSE.get(image.getexif().get(0x0112, 1))
    except Exception:
        return None


def _reject_documents(data: bytes, limits: ImageLimits) -> None:
    """415 for the non-raster uploads people try most, which Pillow cannot (or should not) open."""
    if data.startswith(PNG_SIGNATURE):  # the usual upload: none of the below
        return
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"%pdf"):
        raise UnsupportedMedia(f"PDF documents are not accepted; send an image ({limits.allowed})")
    if head.startswith(b"%!ps"):
        raise UnsupportedMedia(f"PostScript/EPS files are not accepted; send an image ({limits.allowed})")
    if head.startswith((b"<?xml", b"<svg", b"<!doctype svg")) or b"<svg" in head:
        raise UnsupportedMedia(f"SVG (vector) images are not accepted; send a raster image ({limits.allowed})")
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"avif", b"avis"):
        raise UnsupportedMedia(f"HEIC/AVIF images are not accepted; send one of {limits.allowed}")


def _claimed_format(data: bytes) -> str | None:
    """The format a file's first bytes claim (None: none of the usual ones)."""
    return next((fmt for fmt, magic in _MAGIC if data.startswith(magic, _MAGIC_AT.get(fmt, 0))), None)


def _webp_canvas(data: bytes) -> tuple[int, int] | None:
    """A WebP file's canvas size from its first chunk (VP8X, VP8L or VP8), without libwebp; None if unreadable
    (Pillow then says what is wrong)."""
    if len(data) < 30 or not data.startswith(b"RIFF") or data[8:12] != b"WEBP":
        return None
    kind = data[12:16]
    if kind == b"VP8X":
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
    elif kind == b"VP8L" and data[20] == 0x2F:
        (bits,) = struct.unpack_from("<I", data, 21)
        width, height = 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    elif kind == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width, height = (v & 0x3FFF for v in struct.unpack_from("<HH", data, 26))
    else:
        return None
    return width, height


def _plain_png_cost(data: bytes, limits: ImageLimits) -> int:
    """What _plain_png would cost to decode, from the IHDR alone; 0 for files it would not take."""
    if "PNG" not in limits.formats or not data.startswith(PNG_SIGNATURE) or data[8:16] != b"\0\0\0\x0dIHDR":
        return 0
    if len(data) < 33:
        return 0
    width, height, depth, colour = struct.unpack_from(">IIBB", data, 16)
    mode = _PLAIN_PNG_MODES.get(colour)
    if mode is None or depth != 8 or not 0 < width * height <= limits.max_pixels:
        return 0
    return decode_cost(width, height, mode, "PNG")


def _plain_png(data: bytes, limits: ImageLimits) -> Image.Image | None:
    """The usual upload, an 8-bit PNG with nothing in it but pixels, decoded by Pillow's own PNG decoder
    directly; None for anything else, which the full path (Image.open) decodes or rejects.

    Same C decoder, same pixels as Image.open + load (tested against it, corrupted files included),
    without the Python around them (chunk objects, the generic loader, the EXIF lookup): two thirds of
    the decoding time of a 28x28 upload. Whatever Pillow would read differently or refuse (a bad
    checksum, a short chunk, a truncated file) returns None, so rare files and errors keep the full
    path's behaviour and messages.
    """
    if "PNG" not in limits.formats or not data.startswith(PNG_SIGNATURE) or data[8:16] != b"\0\0\0\x0dIHDR":
        return None
    idat: list[bytes] = []
    pos, idat_ended = 8, False
    while True:
        if pos + 12 > len(data):
            return None  # truncated, or no IEND
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 8 + length
        if end + 4 > len(data):
            return None
        if kind == b"IDAT":
            if idat_ended:
                return None  # Pillow stops reading pixels at the first chunk after them
            idat.append(data[pos + 8 : end])  # checked by zlib, not by chunk checksums (as Pillow does)
        elif kind == b"IEND":
            break
        else:
            idat_ended = bool(idat)
            expected = 13 if kind == b"IHDR" and pos == 8 else _INERT_PNG_CHUNKS.get(kind)
            if length != expected or zlib.crc32(data[pos + 4 : end]) != struct.unpack_from(">I", data, end)[0]:
                return None
        pos = end + 4
    width, height, depth, colour, compression, filtering, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    mode = _PLAIN_PNG_MODES.get(colour)
    pixel_limit = min(limits.max_pixels, Image.MAX_IMAGE_PIXELS or limits.max_pixels)
    if mode is None or depth != 8 or compression or filtering or interlace or not 0 < width * height <= pixel_limit:
        return None
    try:
        return Image.frombytes(mode, (width, height), b"".join(idat), "zip", mode)
    except Exception:  # corrupt or short pixel data: the full path says what is wrong
        return None


@functools.lru_cache(maxsize=8)
def _pillow_formats(formats: frozenset[str]) -> list[str]:
    """The order Pillow tries them in: PNG and JPEG, the usual uploads, first."""
    return sorted(formats, key=lambda name: (name not in ("PNG", "JPEG"), name))


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    """Image.open reads only the header: format and size are known before any pixel is decoded."""
    try:
        image = Image.open(io.BytesIO(data), formats=_pillow_formats(limits.formats))
    except Image.DecompressionBombError:
        raise TooLarge(
            f"image header claims a size over {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels "
            f"(the limit is {limits.max_pixels:,}): rejected as a decompression bomb"
        ) from None
    except UnidentifiedImageError:
        pass
    except Exception as exc:
        raise BadInput(f"image header could not be read (corrupt file): {exc}") from None
    else:
        if _ALIASES.get(image.format or "", image.format) in limits.formats:
            return image
        raise UnsupportedMedia(f"{image.format} images are not accepted; send one of {limits.allowed}")

    claimed = _claimed_format(data)
    if claimed in limits.formats:
        raise BadInput(f"corrupt {claimed} file: its header could not be read")
    # Not an allowed format: find out whether it is an image at all, only to say which.
    try:
        with Image.open(io.BytesIO(data)) as other:
            name = f"{other.format} images are"
    except Image.DecompressionBombError:
        name = "this image format is"
    except Exception:
        raise BadInput(f"data is not a recognised image; send one of {limits.allowed}") from None
    raise UnsupportedMedia(f"{name} not accepted; send one of {limits.allowed}")


def _to_gray(image: Image.Image) -> Image.Image:
    """Any mode -> "L". Transparent pixels are flattened onto a background (see _flatten)."""
    mode = image.mode
    # High bit depths first (their rare tRNS colour key is ignored): Pillow's convert would clip.
    if mode.startswith("I;16"):
        return _scaled(np.asarray(image), 65535.0)
    if mode == "I":
        values = np.asarray(image)
        peak = int(values.max())
        # Mode I holds whatever the file did: 8-bit, 16-bit (most PNG/TIFF) or wider values.
        return _scaled(values, 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else float(peak))
    if mode == "F":
        values = np.nan_to_num(np.asarray(image), nan=0.0, posinf=0.0, neginf=0.0)
        top = float(values.max())
        return _scaled(values, 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else top)
    if mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in image.info:
        return _flatten(image)
    if mode == "L":
        return image
    if mode in ("1", "P", "RGB", "CMYK", "YCbCr"):
        return image.convert("L")
    return image.convert("RGB").convert("L")  # LAB, HSV and other rarities


def _scaled(values: np.ndarray, full_scale: float) -> Image.Image:
    """High bit-depth -> 8 bits by scaling the range (0..full_scale -> 0..255), not by clipping."""
    scaled = np.clip(values.astype(np.float32) * np.float32(255.0 / full_scale), 0.0, 255.0)
    return Image.fromarray(np.rint(scaled).astype(np.uint8))


def _flatten(image: Image.Image) -> Image.Image:
    """Composite transparent pixels onto a plain background, then grayscale.

    The background is white, as for a product photo cut out of its white backdrop (the data set's
    photos were shot on light backgrounds), unless the visible content is itself clearly light,
    such as a white garment or a Fashion-MNIST-style image carried in the alpha channel: then it
    is black, so that the garment does not vanish into the background.
    """
    luma, alpha = image.convert("RGBA").convert("LA").split()
    a = np.asarray(alpha, dtype=np.uint32)
    weight = int(a.sum())
    if weight == 0:
        return Image.new("L", image.size, 255)  # fully transparent: blank
    mean = int((np.asarray(luma, dtype=np.uint32) * a).sum()) / weight
    flat = Image.new("L", image.size, 0 if mean > LIGHT_CONTENT else 255)
    flat.paste(luma, mask=alpha)
    return flat


def _exif_upright(image: Image.Image) -> None:
    """Apply the file's EXIF orientation in place (no copy when there is none to apply)."""
    # Unreadable EXIF: the pixels are still fine, so keep them as stored.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(image, in_place=True)
