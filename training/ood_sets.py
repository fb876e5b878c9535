"""Images that are not garments, and garments photographed differently, to measure the out-of-distribution
flag against (`python -m training explain-eval`): none of them is ever used to fit the Gaussians or to
choose the threshold (training/ood.py uses the training and validation splits only).

Every set is a list of image files (PNG or JPEG bytes), as a user would upload them: they go through
the service's own preprocessing (service.imaging.preprocess) before the model sees them. Each set is
made from a fixed seed, so the figures in the README can be reproduced exactly.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SEED = 0


def encode(pixels: np.ndarray, fmt: str = "PNG", quality: int = 85) -> bytes:
    """uint8 [H, W] or [H, W, 3] -> image file bytes."""
    buffer = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(pixels))
    if fmt == "JPEG":
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


# ------------------------------------------------------------------------------ out of distribution


def digits(count: int | None = None) -> list[bytes]:
    """scikit-learn's bundled handwritten digits (1,797 images of 8×8, 17 grey levels), upscaled to
    64×64 with bilinear interpolation; every other one dark ink on white paper, as a photo of a digit
    would be (the preprocessing turns both into light on dark)."""
    from sklearn.datasets import load_digits

    images = load_digits().images[:count]
    out = []
    for i, image in enumerate(images):
        pixels = np.rint(image * (255 / 16)).astype(np.uint8)
        big = np.asarray(Image.fromarray(pixels).resize((64, 64), Image.Resampling.BILINEAR))
        out.append(encode(big if i % 2 == 0 else 255 - big))
    return out


def natural_crops(count: int = 1000) -> list[bytes]:
    """Random square and oblong crops (32 to 200 px) of scikit-learn's two bundled photographs
    (china.jpg, flower.jpg), in colour, saved as JPEG."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(SEED)
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = int(rng.integers(32, 201)), int(rng.integers(32, 201))
        y, x = int(rng.integers(0, photo.shape[0] - h)), int(rng.integers(0, photo.shape[1] - w))
        out.append(encode(photo[y : y + h, x : x + w], "JPEG", 90))
    return out


def _sizes(rng: np.random.Generator) -> tuple[int, int]:
    side = int(rng.choice([28, 48, 64, 100]))
    return side, side


def uniform_noise(count: int = 1000) -> list[bytes]:
    """Uniform noise over 0-255, grey or colour, 28 to 100 px square."""
    rng = np.random.default_rng(SEED + 1)
    out = []
    for i in range(count):
        shape = (*_sizes(rng), 3) if i % 2 else _sizes(rng)
        out.append(encode(rng.integers(0, 256, shape, dtype=np.uint8)))
    return out


def gaussian_noise(count: int = 1000) -> list[bytes]:
    """Gaussian noise (mean 32-224, standard deviation 10-80, clipped), grey or colour, 28 to 100 px."""
    rng = np.random.default_rng(SEED + 2)
    out = []
    for i in range(count):
        shape = (*_sizes(rng), 3) if i % 2 else _sizes(rng)
        mean, sd = rng.uniform(32, 224), rng.uniform(10, 80)
        out.append(encode(np.clip(rng.normal(mean, sd, shape), 0, 255).astype(np.uint8)))
    return out


def constant(count: int = 512) -> list[bytes]:
    """Blank and constant images: every grey level 0-255 at 28×28 (a dark one is taken as already in the
    data set's form and reaches the model as it is) and at 64×64 (trimmed to nothing: a blank input), and
    constant colours with faint noise (±3 levels, below the preprocessing's noise floor)."""
    rng = np.random.default_rng(SEED + 3)
    out = []
    for i in range(count):
        level = i % 256
        if i < 256:
            out.append(encode(np.full((28, 28), level, np.uint8)))
        elif i % 2:
            out.append(encode(np.full((64, 64), level, np.uint8)))
        else:
            colour = rng.integers(0, 256, 3)
            noisy = colour + rng.integers(-3, 4, (64, 64, 3))
            out.append(encode(np.clip(noisy, 0, 255).astype(np.uint8)))
    return out


def shapes(count: int = 1000) -> list[bytes]:
    """Simple geometric shapes on a plain canvas (64 to 128 px): filled or outlined circles, ellipses,
    rectangles, squares, triangles, lines, crosses and stars, light on dark or dark on light."""
    rng = np.random.default_rng(SEED + 4)
    kinds = ("circle", "ellipse", "rectangle", "square", "triangle", "line", "cross", "star")
    out = []
    for i in range(count):
        side = int(rng.integers(64, 129))
        light = i % 2 == 0
        background, ink = (0, int(rng.integers(128, 256))) if light else (255, int(rng.integers(0, 128)))
        image = Image.new("L", (side, side), background)
        draw = ImageDraw.Draw(image)
        kind = kinds[i % len(kinds)]
        filled = bool(rng.integers(0, 2))
        width = int(rng.integers(2, 8))
        cx, cy = rng.uniform(0.35, 0.65, 2) * side
        r = rng.uniform(0.15, 0.33) * side
        rx, ry = (r, r) if kind in ("circle", "square") else (r, r * rng.uniform(0.35, 0.9))
        box = (cx - rx, cy - ry, cx + rx, cy + ry)
        fill, outline = (ink, None) if filled else (None, ink)
        if kind in ("circle", "ellipse"):
            draw.ellipse(box, fill=fill, outline=outline, width=width)
        elif kind in ("rectangle", "square"):
            draw.rectangle(box, fill=fill, outline=outline, width=width)
        elif kind == "triangle":
            points = [(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)]
            draw.polygon(points, fill=fill, outline=outline, width=width)
        elif kind == "line":
            angle = rng.uniform(0, np.pi)
            dx, dy = r * np.cos(angle), r * np.sin(angle)
            draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=ink, width=width)
        elif kind == "cross":
            draw.line((cx - r, cy, cx + r, cy), fill=ink, width=width)
            draw.line((cx, cy - r, cx, cy + r), fill=ink, width=width)
        else:
            angles = np.pi / 2 + np.arange(10) * np.pi / 5
            radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
            points = [(cx + q * np.cos(a), cy - q * np.sin(a)) for q, a in zip(radii, angles, strict=True)]
            draw.polygon(points, fill=fill, outline=outline, width=width)
        out.append(encode(np.asarray(image)))
    return out


OOD_SETS: dict[str, Callable[[], list[bytes]]] = {
    "digits (scikit-learn, 8×8 upscaled)": digits,
    "natural-image crops (scikit-learn samples)": natural_crops,
    "uniform noise": uniform_noise,
    "Gaussian noise": gaussian_noise,
    "blank and constant": constant,
    "geometric shapes": shapes,
}


# ------------------------------------------------------------------- garments, photographed otherwise


def _photo(image: np.ndarray) -> np.ndarray:
    """A Fashion-MNIST image as a shop photo would show it: dark garment on white."""
    return 255 - image


def dark_on_light(image: np.ndarray, rng: np.random.Generator) -> bytes:
    return encode(_photo(image))


def tinted(image: np.ndarray, rng: np.random.Generator) -> bytes:
    """A coloured garment on white: each channel of the garment takes a random dye."""
    dye = rng.uniform(0.2, 1.0, 3)
    garment = image.astype(np.float32) / 255
    rgb = 255 - garment[..., None] * (255 * dye)
    return encode(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))


def scaled(image: np.ndarray, rng: np.random.Generator) -> bytes:
    """Up to 3-8× larger (bicubic), dark on light."""
    side = 28 * int(rng.integers(3, 9))
    return encode(np.asarray(Image.fromarray(_photo(image)).resize((side, side), Image.Resampling.BICUBIC)))


def off_centre(image: np.ndarray, rng: np.random.Generator) -> bytes:
    """Dark on light, somewhere on a white canvas 2-4× its size."""
    side = 28 * int(rng.integers(2, 5))
    canvas = np.full((side, side), 255, np.uint8)
    y, x = rng.integers(0, side - 28 + 1, 2)
    canvas[y : y + 28, x : x + 28] = _photo(image)
    return encode(canvas)


def jpeg(image: np.ndarray, rng: np.random.Generator) -> bytes:
    """Dark on light, 4× larger, as a JPEG of quality 60-90."""
    big = Image.fromarray(_photo(image)).resize((112, 112), Image.Resampling.BICUBIC)
    return encode(np.asarray(big), "JPEG", int(rng.integers(60, 91)))


def product_photo(image: np.ndarray, rng: np.random.Generator) -> bytes:
    """All of the above at once: tinted, scaled, off centre on white, JPEG."""
    dye = rng.uniform(0.2, 1.0, 3)
    garment = np.asarray(Image.fromarray(image).resize((84, 84), Image.Resampling.BICUBIC)).astype(np.float32) / 255
    rgb = np.clip(np.rint(255 - garment[..., None] * (255 * dye)), 0, 255).astype(np.uint8)
    canvas = np.full((168, 168, 3), 255, np.uint8)
    y, x = rng.integers(0, 168 - 84 + 1, 2)
    canvas[y : y + 84, x : x + 84] = rgb
    return encode(canvas, "JPEG", int(rng.integers(60, 91)))


RENDERINGS: dict[str, Callable[[np.ndarray, np.random.Generator], bytes]] = {
    "dark on light": dark_on_light,
    "tinted": tinted,
    "scaled 3-8×": scaled,
    "off centre": off_centre,
    "JPEG": jpeg,
    "all of these at once": product_photo,
}


def render(images: np.ndarray, how: Callable[[np.ndarray, np.random.Generator], bytes]) -> list[bytes]:
    rng = np.random.default_rng(SEED + 5)
    return [how(image, rng) for image in images]


def as_uploads(images: np.ndarray) -> list[bytes]:
    """Fashion-MNIST images as the 28×28 PNGs a user would upload."""
    return [encode(image) for image in images]


# ----------------------------------------------------------------------------------------- figures


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve for telling `out_scores` (the positives: higher means more unusual) from
    `in_scores`: the probability that an out-of-distribution image scores higher than an in-distribution
    one, ties counting half (the Mann-Whitney U statistic)."""
    scores = np.concatenate([in_scores, out_scores]).astype(np.float64)
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2
    n_in, n_out = len(in_scores), len(out_scores)
    u = ranks[n_in:].sum() - n_out * (n_out + 1) / 2
    return float(u / (n_in * n_out))


def fpr_at_tpr(in_scores: np.ndarray, out_scores: np.ndarray, tpr: float = 0.95) -> float:
    """The fraction of out-of-distribution images that pass as in-distribution at the threshold that lets
    `tpr` of the in-distribution images pass (FPR at 95 % TPR, in-distribution being the positives)."""
    threshold = np.quantile(in_scores, tpr)
    return float(np.mean(out_scores <= threshold))


def save_examples(path: Path, sets: dict[str, list[bytes]], per_set: int = 8) -> None:
    """A contact sheet of the first images of each set, as uploaded (for a reader, not a test)."""
    rows = []
    for files in sets.values():
        row = []
        for data in files[:per_set]:
            image = Image.open(io.BytesIO(data)).convert("L").resize((56, 56))
            row.append(np.asarray(image))
        rows.append(np.concatenate(row, axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
