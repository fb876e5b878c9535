"""service.imaging on real Fashion-MNIST test images, rendered in memory in every format and mode."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from service import imaging
from service.errors import BadInput, ServiceError, TooLarge, UnsupportedMedia
from service.imaging import ImageLimits, decode, feature_grid_png, input_png, preprocess, to_model_input
from tests.support import ROOT, png_chunk

MODEL = ROOT / "models" / "fashion-mnist-cnn" / "1" / "model.onnx"
# An ankle boot (class 9): no left-right or up-down symmetry, so rotations and flips are caught.
BOOT = 0
DEFAULT_LIMITS = ImageLimits()


@pytest.fixture(scope="module")
def split():
    from training.data import load_test

    return load_test()


@pytest.fixture(scope="module")
def garment(split) -> np.ndarray:
    assert split.labels[BOOT] == 9
    return split.images[BOOT]


def native(pixels: np.ndarray) -> np.ndarray:
    """What the model was trained on (training/train.py): pixels / 255 as float32 [28, 28, 1]."""
    return (pixels.astype(np.float32) / 255.0)[..., None]


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def mad(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two tensors in [0, 1]."""
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def photo(
    pixels: np.ndarray,
    colour: tuple[int, int, int] = (40, 60, 90),
    background: tuple[int, int, int] = (245, 245, 240),
    edge: int = 112,
    canvas: tuple[int, int] | None = None,
    at: tuple[int, int] | None = None,
) -> Image.Image:
    """A shop-photo version of a Fashion-MNIST image: the garment (its intensity as coverage) in
    `colour` on a plain light `background`, upscaled bicubically to `edge` px and placed at `at`
    on a `canvas` (w, h) of the same background."""
    mask = Image.fromarray(pixels).resize((edge, edge), Image.Resampling.BICUBIC)
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    rgb = np.asarray(background, np.float32) * (1 - alpha) + np.asarray(colour, np.float32) * alpha
    item = Image.fromarray(np.rint(rgb).astype(np.uint8), "RGB")
    if canvas is None:
        return item
    out = Image.new("RGB", canvas, background)
    out.paste(item, at if at is not None else ((canvas[0] - edge) // 2, (canvas[1] - edge) // 2))
    return out


# --- native pass-through --------------------------------------------------------------------------


def test_native_png_round_trips_exactly(split):
    """All 10,000 test images, PNG-encoded, come back as exactly pixels / 255."""
    out = np.stack([preprocess(encode(Image.fromarray(img), "PNG")) for img in split.images])
    assert out.dtype == np.float32 and out.shape == (len(split.images), 28, 28, 1)
    np.testing.assert_array_equal(out, native(split.images))


def test_native_rgb_with_equal_channels_round_trips_exactly(split):
    images = split.images[:200]
    out = np.stack([preprocess(encode(Image.fromarray(np.repeat(img[..., None], 3, 2)), "PNG")) for img in images])
    np.testing.assert_array_equal(out, native(images))


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_is_scaled_not_clipped(garment, mode):
    """16-bit (and 32-bit int / float) grayscale is scaled down to 8 bits: 0..65535 -> 0..255."""
    if mode == "I;16":
        image = Image.fromarray(garment.astype(np.uint16) * 257)
        data = encode(image, "PNG")
        assert Image.open(io.BytesIO(data)).mode == "I;16"
    elif mode == "I":
        image = Image.fromarray(garment.astype(np.int32) * 257, "I")
        data = encode(image, "TIFF")
    else:
        image = Image.fromarray(garment.astype(np.float32) / 255.0, "F")
        data = encode(image, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == image.mode
    np.testing.assert_array_equal(preprocess(data), native(garment))


# --- formats and modes ----------------------------------------------------------------------------


def test_shop_photo_gives_about_the_native_tensor(garment):
    """Upscaled, coloured, on a light background and off-centre: back to about what it was made from.
    (Not exactly: resampling up and back down again softens the texture a little.)"""
    out = preprocess(encode(photo(garment, canvas=(200, 160), at=(30, 20)), "PNG"))
    assert out.shape == (28, 28, 1) and out.dtype == np.float32
    assert mad(out, native(garment)) < 0.03


@pytest.mark.parametrize(
    ("fmt", "params", "tolerance"),
    [
        ("PNG", {}, 0.0),
        ("BMP", {}, 0.0),
        ("TIFF", {}, 0.0),
        ("TIFF", {"compression": "tiff_lzw"}, 0.0),
        ("WEBP", {"lossless": True}, 0.0),
        ("JPEG", {"quality": 85}, 0.015),
        ("WEBP", {"quality": 90}, 0.015),
        ("GIF", {}, 0.015),  # quantised to a 256-colour palette
    ],
)
def test_every_format_decodes_alike(garment, fmt, params, tolerance):
    """The same picture in each format gives the same tensor as its PNG (lossless formats exactly)."""
    scene = photo(garment, canvas=(200, 160), at=(30, 20))
    out = preprocess(encode(scene, fmt, **params))
    expected = preprocess(encode(scene, "PNG"))
    assert out.shape == (28, 28, 1) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert mad(out, expected) <= tolerance, fmt


def mode_image(garment: np.ndarray, mode: str) -> Image.Image:
    """The boot on a white background (or, with transparency, on nothing) in the given mode."""
    dark = photo(garment, colour=(0, 0, 0), background=(255, 255, 255), edge=84)
    if mode == "1":
        return dark.convert("L").point(lambda v: 255 if v > 127 else 0).convert("1")
    if mode in ("L", "RGB", "CMYK"):
        return dark.convert(mode)
    if mode == "P":
        return dark.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    if mode == "P+transparency":
        # Index 0 is magenta and transparent: it must come out as background, not as a colour.
        grey = np.asarray(dark.convert("L"))
        index = np.where(grey == 255, 0, np.maximum(grey, 1)).astype(np.uint8)
        pal = Image.fromarray(index, "P")
        pal.putpalette([255, 0, 255] + [v for i in range(1, 256) for v in (i, i, i)])
        pal.info["transparency"] = 0
        return pal
    alpha = Image.fromarray(garment).resize((84, 84), Image.Resampling.BICUBIC)
    if mode == "LA":
        return Image.merge("LA", (Image.new("L", (84, 84), 30), alpha))
    if mode == "RGBA":
        junk = Image.effect_noise((84, 84), 80).convert("RGB")  # random colour where alpha is 0
        rgba = junk.copy()
        rgba.paste(Image.new("RGB", (84, 84), (120, 20, 30)), mask=alpha.point(lambda v: 255 if v else 0))
        rgba.putalpha(alpha)
        return rgba
    raise AssertionError(mode)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("1", "PNG"),
        ("1", "TIFF"),
        ("L", "PNG"),
        ("L", "JPEG"),
        ("P", "PNG"),
        ("P", "GIF"),
        ("P", "BMP"),
        ("P+transparency", "PNG"),
        ("P+transparency", "GIF"),
        ("LA", "PNG"),
        ("LA", "WEBP"),
        ("RGB", "PNG"),
        ("RGB", "TIFF"),
        ("RGBA", "PNG"),
        ("RGBA", "TIFF"),
        ("RGBA", "WEBP"),
        ("CMYK", "JPEG"),
        ("CMYK", "TIFF"),
    ],
)
def test_every_mode_decodes_alike(garment, mode, fmt):
    """Each mode, flattened to grayscale, gives the tensor of the plain grayscale picture."""
    params = {"lossless": True} if fmt == "WEBP" else {"quality": 95} if fmt == "JPEG" else {}
    source = mode_image(garment, mode)
    decoded = decode(encode(source, fmt, **params))
    assert decoded.mode == "L" and decoded.size == source.size
    if mode == "1":  # two levels only: the garment's shape survives, its shading cannot
        np.testing.assert_array_equal(np.asarray(decoded), np.asarray(source.convert("L")))
        return
    expected = preprocess(encode(mode_image(garment, "L"), "PNG"))
    assert mad(to_model_input(decoded), expected) < 0.01, (mode, fmt)


def test_transparent_light_garment_goes_on_black_not_white(garment):
    """A white garment cut out on transparency must not vanish into a white background."""
    alpha = Image.fromarray(garment).resize((84, 84), Image.Resampling.BICUBIC)
    rgba = Image.new("RGBA", (84, 84), (255, 255, 255, 0))
    rgba.putalpha(alpha)
    on_black = photo(garment, colour=(255, 255, 255), background=(0, 0, 0), edge=84)
    assert mad(preprocess(encode(rgba, "PNG")), preprocess(encode(on_black, "PNG"))) < 0.01


def test_colour_key_transparency_is_flattened(garment):
    """PNG tRNS: one grey (or RGB) value stands for transparent; junk there must not show."""
    for mode in ("L", "RGB"):
        keyed = mode_image(garment, "L").convert(mode)
        pixels = np.array(keyed)
        pixels[np.asarray(mode_image(garment, "L")) == 255] = 7  # the key: dark, unlike the white it replaces
        image = Image.fromarray(pixels, mode)
        image.info["transparency"] = 7 if mode == "L" else (7, 7, 7)
        expected = preprocess(encode(mode_image(garment, "L"), "PNG"))
        assert mad(preprocess(encode(image, "PNG", transparency=image.info["transparency"])), expected) < 0.01


def test_mpo_from_a_phone_camera_is_a_jpeg(garment, split):
    """Phones save JPEGs with extra pictures as MPO; Pillow calls it MPO, the first picture is a JPEG."""
    first = photo(garment, canvas=(200, 160))
    data = encode(first, "MPO", save_all=True, append_images=[photo(split.images[1], canvas=(200, 160))])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert mad(preprocess(data), preprocess(encode(first, "JPEG"))) < 0.01


def test_fully_transparent_image_is_blank():
    out = preprocess(encode(Image.new("RGBA", (50, 40), (10, 200, 30, 0)), "PNG"))
    assert not out.any()


@pytest.mark.parametrize(("fmt", "mode"), [("GIF", "P"), ("WEBP", "RGB")])
def test_animation_uses_the_first_frame(split, fmt, mode):
    first, second = split.images[BOOT], split.images[1]  # an ankle boot, then a pullover
    frames = [Image.fromarray(img).resize((84, 84)).convert(mode) for img in (first, second)]
    params = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **params)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    out = preprocess(data)
    assert mad(out, preprocess(encode(frames[0], "PNG"))) < 0.01
    assert mad(out, preprocess(encode(frames[1], "PNG"))) > 0.1


def test_multipage_tiff_uses_the_first_page(split):
    pages = [Image.fromarray(img) for img in (split.images[BOOT], split.images[1])]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    np.testing.assert_array_equal(preprocess(data), native(split.images[BOOT]))


# --- EXIF orientation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("orientation", "stored"),
    [
        (3, Image.Transpose.ROTATE_180),
        (6, Image.Transpose.ROTATE_90),  # the camera was turned: viewers rotate 90 degrees clockwise
        (8, Image.Transpose.ROTATE_270),
    ],
)
def test_exif_orientation_is_applied(garment, orientation, stored):
    upright = photo(garment, canvas=(180, 140), at=(40, 10))
    expected = preprocess(encode(upright, "JPEG", quality=95))
    exif = Image.Exif()
    exif[0x0112] = orientation
    turned = upright.transpose(stored)
    with_tag = preprocess(encode(turned, "JPEG", quality=95, exif=exif.tobytes()))
    without_tag = preprocess(encode(turned, "JPEG", quality=95))
    assert mad(with_tag, expected) < 0.01
    assert mad(without_tag, expected) > 0.05  # the tag, not luck, made the difference


def test_broken_exif_is_ignored(garment):
    data = encode(photo(garment), "JPEG", quality=95, exif=b"Exif\x00\x00II*\x00\xff\xff\xff\xff")
    np.testing.assert_array_equal(preprocess(data), preprocess(encode(photo(garment), "JPEG", quality=95)))


# --- polarity, trim, fit, centre ------------------------------------------------------------------


@pytest.mark.parametrize("size", [56, 100])
def test_light_background_is_negated(split, size):
    """Dark garment on white gives the same tensor as the light garment on black it was made from."""
    for img in split.images[:20]:
        upscaled = Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC)
        inverted = Image.fromarray(255 - np.asarray(upscaled))
        assert mad(preprocess(encode(inverted, "PNG")), preprocess(encode(upscaled, "PNG"))) < 0.005


def test_inverted_native_image_is_negated(split):
    """255 - pixels at 28x28 comes back close to the original. Not exactly: trimming the faint
    edge of the garment can drop a row or column, which the fit then rescales."""
    errors = [mad(preprocess(encode(Image.fromarray(255 - img), "PNG")), native(img)) for img in split.images[:50]]
    assert np.median(errors) < 0.002
    assert np.mean(errors) < 0.04 and max(errors) < 0.2


def test_dark_background_photo_is_not_negated(garment):
    """A light garment on a dark background gives what the dark garment on a light one does."""
    dark = encode(photo(garment, colour=(250, 240, 200), background=(10, 10, 20), canvas=(240, 200)), "PNG")
    light = encode(photo(garment, canvas=(240, 200)), "PNG")
    assert mad(preprocess(dark), preprocess(light)) < 0.01


def test_small_off_centre_garment_is_trimmed_fitted_and_centred():
    canvas = np.full((300, 400), 250, np.uint8)
    canvas[200:280, 20:60] = 30  # an 80 x 40 px dark "garment" near the bottom-left corner
    out = preprocess(encode(Image.fromarray(canvas), "JPEG", quality=85))[..., 0]
    rows, cols = np.flatnonzero(out.max(1) > 0.5), np.flatnonzero(out.max(0) > 0.5)
    assert (rows[0], rows[-1]) == (0, 27)  # the longest edge fills 28 px
    assert (cols[0], cols[-1]) == (7, 20)  # 14 px wide, centred
    assert out.max() == pytest.approx(1.0)
    assert out[:, :6].max() < 0.05 and out[:, 22:].max() < 0.05  # the background stays black


def test_background_noise_does_not_widen_the_crop(garment):
    """JPEG artefacts and sensor-like noise in a big flat background must not count as garment."""
    scene = photo(garment, canvas=(880, 700), at=(600, 50))
    clean = preprocess(encode(scene, "PNG"))
    assert mad(preprocess(encode(scene, "JPEG", quality=70)), clean) < 0.01
    pixels = np.asarray(scene, np.float32) + np.random.default_rng(3).normal(0.0, 3.0, (700, 880, 3))
    noisy = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    assert mad(preprocess(encode(noisy, "PNG")), clean) < 0.02


def test_large_jpeg_is_decoded_at_reduced_scale(garment, monkeypatch):
    """A 6 MP JPEG is decoded at 1/4 scale in the DCT (cheap) and gives what full decoding gives."""
    data = encode(photo(garment, edge=600, canvas=(3000, 2000), at=(1700, 900)), "JPEG", quality=90)
    assert max(decode(data).size) < 1000
    reduced = preprocess(data)
    monkeypatch.setattr(imaging, "JPEG_DRAFT_EDGE", 10**9)
    assert decode(data).size == (3000, 2000)
    assert mad(reduced, preprocess(data)) < 0.01


@pytest.mark.parametrize("value", [0, 128, 255])
def test_blank_image_gives_a_valid_tensor(value):
    for size in [(28, 28), (300, 200)]:
        out = preprocess(encode(Image.new("L", size, value), "PNG"))
        assert out.shape == (28, 28, 1) and out.dtype == np.float32
        assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0


def test_to_model_input_needs_mode_l():
    with pytest.raises(ValueError, match="mode 'L'"):
        to_model_input(Image.new("RGB", (28, 28)))


# --- errors ---------------------------------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with one tiny compressed row: no pixel data to speak of."""

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


def raises(exc_type: type[ServiceError], data: bytes, *words: str, limits: ImageLimits | None = None) -> None:
    with pytest.raises(exc_type) as info:
        preprocess(data, limits or ImageLimits())
    message = info.value.message.lower()
    for word in words:
        assert word.lower() in message, message


def test_empty_upload():
    raises(BadInput, b"", "empty")


def test_random_bytes():
    raises(BadInput, np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(), "not a recognised")


def test_truncated_png(garment):
    data = encode(photo(garment, canvas=(200, 200)), "PNG")
    raises(BadInput, data[: len(data) // 2], "truncated")


def test_truncated_jpeg_header():
    data = encode(Image.new("RGB", (64, 64), "red"), "JPEG")
    raises(BadInput, data[:40])


def test_zero_size_png():
    raises(BadInput, png_header(0, 10), "PNG")


def test_text_is_not_an_image():
    raises(BadInput, b"hello, this is not an image", "not a recognised", "PNG")
    raises(BadInput, b"<html><body>not an image</body></html>", "not a recognised")


def test_over_max_bytes():
    data = encode(Image.new("L", (64, 64)), "PNG")
    raises(TooLarge, data, "bytes", "limit", limits=ImageLimits(max_bytes=len(data) - 1))
    preprocess(data, ImageLimits(max_bytes=len(data)))  # exactly at the limit is fine


def test_over_max_pixels_from_header_alone():
    """A few hundred bytes claiming 50000 x 50000: refused before any pixel is decoded."""
    data = png_header(50_000, 50_000)
    assert len(data) < 200
    raises(TooLarge, data, "decompression bomb", "25,000,000")
    raises(TooLarge, png_header(6_000, 5_000), "pixels", "limit")  # 30 MP: over ours, under Pillow's


def test_real_decompression_bomb():
    """A 36-megapixel PNG of zeros compresses to a few tens of kilobytes."""
    data = encode(Image.new("1", (6_000, 6_000)), "PNG")
    assert len(data) < 100_000
    raises(TooLarge, data, "pixels")


def test_pixel_limit_is_configurable(garment):
    data = encode(photo(garment), "PNG")  # 112 x 112
    raises(TooLarge, data, "112x112", limits=ImageLimits(max_pixels=112 * 112 - 1))
    preprocess(data, ImageLimits(max_pixels=112 * 112))


def test_disallowed_formats():
    image = Image.new("RGB", (32, 32), "blue")
    raises(UnsupportedMedia, encode(image, "ICO"), "ICO", "PNG")
    raises(UnsupportedMedia, encode(image, "EPS"), "EPS")
    raises(UnsupportedMedia, encode(image, "PPM"), "PPM")
    raises(UnsupportedMedia, encode(image, "JPEG"), "JPEG", limits=ImageLimits(formats=frozenset({"PNG"})))


def test_svg_and_pdf_are_unsupported_media():
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="28" height="28"><rect width="9" height="9"/></svg>'
    raises(UnsupportedMedia, svg, "SVG")
    raises(UnsupportedMedia, b'<?xml version="1.0" encoding="UTF-8"?>\n' + svg, "SVG")
    raises(UnsupportedMedia, b"\xef\xbb\xbf  " + svg, "SVG")
    raises(UnsupportedMedia, b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n", "PDF")
    raises(UnsupportedMedia, encode(Image.new("RGB", (32, 32)), "PDF"), "PDF")


def test_corrupted_files_never_leak_pillow_errors(garment):
    """Flip bytes in valid files of every format: each either decodes or raises a ServiceError."""
    rng = np.random.default_rng(1)
    image = photo(garment, canvas=(64, 48))
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"):
        clean = np.frombuffer(encode(image, fmt), np.uint8)
        for _ in range(15):
            data = clean.copy()
            where = rng.integers(0, len(data), size=rng.integers(1, 6))
            data[where] = rng.integers(0, 256, size=len(where), dtype=np.uint8)
            try:
                out = preprocess(data.tobytes())
            except ServiceError:
                continue
            assert out.shape == (28, 28, 1) and np.isfinite(out).all()


# --- the plain-PNG fast path (imaging._plain_png) against Pillow's full path -----------------------


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """A PNG's (type, body) chunks, in order."""
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        out.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return out


def pixel_data_offsets(data: bytes) -> list[int]:
    """Where a PNG's IDAT bodies lie: the bytes no chunk checksum covers."""
    offsets, pos = [], 8
    for kind, body in chunks(data):
        if kind == b"IDAT":
            offsets += range(pos + 8, pos + 8 + len(body))
        pos += 12 + len(body)
    return offsets


def rebuild(parts: list[tuple[bytes, bytes]]) -> bytes:
    return imaging.PNG_SIGNATURE + b"".join(png_chunk(kind, body) for kind, body in parts)


def outcome(data: bytes, limits: ImageLimits, fast: bool) -> tuple[object, ...]:
    """What decode makes of `data`, with or without the fast path: the image, or the error it raises."""
    with pytest.MonkeyPatch.context() as patch:
        if not fast:
            patch.setattr(imaging, "_plain_png", lambda data, limits: None)
        try:
            image = decode(data, limits)
        except ServiceError as exc:
            return type(exc), exc.status_code, exc.message
    return image.mode, image.size, image.tobytes()


def same_as_pillow(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> bool:
    """Whether the fast path took the file; asserts that decode gives what Pillow's full path gives."""
    assert outcome(data, limits, fast=True) == outcome(data, limits, fast=False)
    return imaging._plain_png(data, limits) is not None


def plain_pngs(split, garment) -> dict[str, bytes]:
    """8-bit PNGs with nothing but pixels in them, as encoders write them (Pillow, by hand)."""
    rng = np.random.default_rng(7)
    boot = photo(garment, canvas=(97, 61))
    alpha = Image.fromarray(garment).resize(boot.size)
    noise = Image.fromarray(rng.integers(0, 256, (800, 1000), dtype=np.uint8))  # ~13 IDAT chunks
    files = {f"test image {i}": encode(Image.fromarray(split.images[i]), "PNG") for i in range(0, 10_000, 97)}
    files |= {
        "L": encode(boot.convert("L"), "PNG"),
        "RGB": encode(boot, "PNG"),
        "LA": encode(Image.merge("LA", (boot.convert("L"), alpha)), "PNG"),
        "RGBA": encode(Image.merge("RGBA", (*boot.split(), alpha)), "PNG"),
        "1x1": encode(Image.new("L", (1, 1), 200), "PNG"),
        "uncompressed": encode(boot, "PNG", compress_level=0),
        "optimized": encode(boot, "PNG", optimize=True),
        "noise, many IDAT chunks": encode(noise, "PNG"),
        "dpi (pHYs)": encode(boot, "PNG", dpi=(300, 300)),
    }
    parts = chunks(files["L"])
    data = zlib.compress(b"".join(encode_rows(np.asarray(boot.convert("L")))))
    pieces = [(b"IDAT", data[i : i + 7]) for i in range(0, len(data), 7)]
    inert = [(b"sRGB", b"\0"), (b"gAMA", struct.pack(">I", 45455)), (b"cHRM", bytes(32)), (b"pHYs", bytes(9))]
    files["inert chunks before and after"] = rebuild([parts[0], *inert, *parts[1:-1], (b"tIME", bytes(7)), parts[-1]])
    files["IDAT in 7-byte pieces, one empty"] = rebuild([parts[0], *pieces[:2], (b"IDAT", b""), *pieces[2:], parts[-1]])
    return files


def encode_rows(pixels: np.ndarray) -> list[bytes]:
    """PNG scanlines with filter type 1 (Sub), the way some encoders write every row."""
    return [b"\1" + np.diff(row, prepend=np.uint8(0)).astype(np.uint8).tobytes() for row in pixels]


def test_plain_pngs_take_the_fast_path_and_decode_as_pillow_does(split, garment):
    files = plain_pngs(split, garment)
    assert len(chunks(files["noise, many IDAT chunks"])) > 10
    taken = {name: same_as_pillow(data) for name, data in files.items()}
    assert all(taken.values()), [name for name, fast in taken.items() if not fast]


def test_anything_else_goes_to_pillow(split, garment):
    boot = photo(garment, canvas=(97, 61))
    plain = encode(boot.convert("L"), "PNG")
    ihdr, *rest = chunks(plain)
    info = PngInfo()
    info.add_text("Comment", "hello")
    second_frame = boot.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    interlaced = (b"IHDR", ihdr[1][:12] + b"\1")
    turned = Image.Exif()
    turned[0x0112] = 6
    files = {
        "palette": encode(boot.convert("P"), "PNG"),
        "1-bit": encode(boot.convert("1"), "PNG"),
        "16-bit": encode(Image.fromarray(np.asarray(boot.convert("L")).astype(np.uint16) * 257), "PNG"),
        "colour key (tRNS)": encode(boot.convert("L"), "PNG", transparency=255),
        "EXIF orientation (eXIf)": encode(boot, "PNG", exif=turned.tobytes()),
        "text": encode(boot, "PNG", pnginfo=info),
        "animated": encode(boot, "PNG", save_all=True, append_images=[second_frame]),
        "interlace flag": rebuild([interlaced, *rest]),
        "pixels after another chunk": rebuild([ihdr, rest[0], (b"pHYs", bytes(9)), rest[0], *rest[1:]]),
        "short pHYs": rebuild([ihdr, (b"pHYs", bytes(4)), *rest]),
        "unknown chunk": rebuild([ihdr, (b"abCd", b"x"), *rest]),
        "bad IHDR checksum": plain[:29] + bytes([plain[29] ^ 1]) + plain[30:],
        "no IEND": plain[:-12],
        "truncated": plain[: len(plain) // 2],
        "zero width": png_header(0, 10),
        "over the pixel limit": png_header(6_000, 5_000),
    }
    taken = {name: same_as_pillow(data) for name, data in files.items()}
    assert not any(taken.values()), [name for name, fast in taken.items() if fast]
    png_not_allowed = ImageLimits(formats=frozenset({"JPEG"}))
    assert not same_as_pillow(plain, png_not_allowed)
    assert not same_as_pillow(plain, ImageLimits(max_pixels=97 * 61 - 1))


def test_corrupted_pngs_decode_or_fail_as_pillow_does(split, garment):
    """Random bytes changed anywhere, pixel data included (which no chunk checksum guards), and every
    truncation of a small file: the fast path never gives an image, or an error, that Pillow would not."""
    rng = np.random.default_rng(3)
    files = plain_pngs(split, garment)
    sources = [files[name] for name in ("test image 0", "RGB", "LA", "inert chunks before and after")]
    fast = 0
    for clean in sources:
        pixel_data = pixel_data_offsets(clean)
        for trial in range(200):
            data = bytearray(clean)
            anywhere = trial % 2 == 0
            for where in rng.choice(np.arange(8, len(data)) if anywhere else pixel_data, size=rng.integers(1, 4)):
                data[where] = rng.integers(0, 256)
            fast += same_as_pillow(bytes(data))
    small = files["test image 0"]
    for length in range(len(small)):
        fast += same_as_pillow(small[:length])
    # Not a vacuous comparison: some corrupted files did decode by the fast path (most changes to compressed
    # pixels break the zlib stream, and both paths refuse those).
    assert fast >= 10


# --- PNG outputs ----------------------------------------------------------------------------------


def test_input_png_round_trips(garment):
    png = input_png(native(garment))
    decoded = Image.open(io.BytesIO(png))
    assert decoded.format == "PNG" and decoded.mode == "L" and decoded.size == (28, 28)
    np.testing.assert_array_equal(np.asarray(decoded), garment)


@pytest.mark.parametrize(("shape", "grid"), [((28, 28, 32), (6, 6)), ((7, 7, 96), (10, 10)), ((14, 14, 3), (2, 2))])
def test_feature_grid_png(shape, grid):
    height, width, channels = shape
    rng = np.random.default_rng(2)
    fmap = rng.normal(size=shape).astype(np.float32)
    fmap[:, :, 1] = 3.5  # a constant channel
    png = feature_grid_png(fmap, scale=3)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.mode == "L"
    cols, rows = grid
    assert image.size == ((cols * (width + 1) - 1) * 3, (rows * (height + 1) - 1) * 3)
    pixels = np.asarray(image)[::3, ::3]  # undo the nearest-neighbour upscale
    cell = pixels[:height, width + 1 : 2 * width + 1]  # channel 1
    assert not cell.any()  # constant -> black
    first = pixels[:height, :width]
    assert first.min() == 0 and first.max() == 255  # each channel stretched on its own


def test_feature_grid_png_rejects_bad_shapes():
    with pytest.raises(ValueError):
        feature_grid_png(np.zeros((4, 4)))
    with pytest.raises(ValueError):
        feature_grid_png(np.zeros((4, 4, 2)), scale=0)


# --- the model sees photos as it sees the data set ------------------------------------------------


def render_shop_photo(pixels: np.ndarray, rng: np.random.Generator) -> bytes:
    """A random 'photo of the garment on a plain light background': the garment in a random colour
    darker than a random light backdrop, upscaled to 80-400 px, anywhere on a canvas of up to
    800 x 800 px, saved as a JPEG of quality 85."""

    def rgb(low: int, high: int) -> tuple[int, int, int]:
        r, g, b = (int(v) for v in rng.integers(low, high, 3))
        return r, g, b

    colour, background = rgb(0, 170), rgb(215, 256)
    edge = int(rng.integers(80, 401))
    canvas = (int(rng.integers(edge + 10, 801)), int(rng.integers(edge + 10, 801)))
    at = (int(rng.integers(0, canvas[0] - edge + 1)), int(rng.integers(0, canvas[1] - edge + 1)))
    return encode(photo(pixels, colour, background, edge, canvas, at), "JPEG", quality=85)


def test_shop_photos_classify_as_well_as_the_data_set(split):
    import onnxruntime as ort

    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1234)
    pick = np.sort(rng.choice(len(split.images), 1000, replace=False))
    images, labels = split.images[pick], split.labels[pick]
    photos = np.stack([preprocess(render_shop_photo(img, rng)) for img in images])

    def accuracy(batch: np.ndarray) -> float:
        probs = session.run(["probabilities"], {"image": batch})[0]
        return float((probs.argmax(1) == labels).mean())

    native_acc, photo_acc = accuracy(native(images)), accuracy(photos)
    print(f"\nnative accuracy {native_acc:.4f}, shop-photo accuracy {photo_acc:.4f} on {len(pick)} images")
    assert photo_acc >= native_acc - 0.02
