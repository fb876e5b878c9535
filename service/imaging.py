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
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import BadInput, TooLarge, UnsupportedMedia

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
JPEG_DRAFT_EDGE = 448
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


def preprocess(data: bytes, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Image file bytes -> float32 [28, 28, 1] in [0, 1]."""
    return to_model_input(decode(data, limits))


def decode(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Checked, decoded, EXIF-upright first frame, flattened onto a background, mode "L"."""
    if not data:
        raise BadInput("empty upload: no image data received")
    if len(data) > limits.max_bytes:
        raise TooLarge(f"image file is {len(data):,} bytes; the limit is {limits.max_bytes:,} bytes")
    if (plain := _plain_png(data, limits)) is not None:
        return _to_gray(plain)  # no orientation to apply: _plain_png takes no file that could carry one
    _reject_documents(data, limits)
    image = _open(data, limits)
    width, height = image.size
    if width <= 0 or height <= 0:
        raise BadInput(f"image has zero size ({width}x{height})")
    if width * height > limits.max_pixels:
        raise TooLarge(
            f"image is {width}x{height} = {width * height:,} pixels; the limit is {limits.max_pixels:,} pixels"
        )
    try:
        if image.format in ("JPEG", "MPO") and max(width, height) >= 2 * JPEG_DRAFT_EDGE:
            scale = JPEG_DRAFT_EDGE / max(width, height)
            image.draft("L", (math.ceil(width * scale), math.ceil(height * scale)))
        image.load()  # the first frame only, for GIF, WebP and TIFF
        _exif_upright(image)
        gray = _to_gray(image)
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

    claimed = next((fmt for fmt, magic in _MAGIC if data.startswith(magic, _MAGIC_AT.get(fmt, 0))), None)
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
