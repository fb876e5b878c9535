"""Make the example files the README's commands use, from the real Fashion-MNIST test set.

    python examples/make_examples.py [--data-dir DIR] [--out examples]

The data comes from the first place that has it (--data-dir, $FASHION_MNIST_DIR, Debian's
/usr/share/datasets/fashion-mnist, the Keras cache), as for training; nothing is downloaded. Writes:

    <class>.png              test images as the data set has them: 28×28 grayscale, light garment on black
    photo-ankle-boot.jpg     the same kind of garment as a shop photo would show it: dark on white, larger,
    photo-trouser.png        in colour, off-centre with a margin (what the server's preprocessing undoes)
    images.npy, labels.npy   the first 16 test images [16, 28, 28] uint8, and their class ids [16] int64

The output is deterministic: running it again gives the same pixels (the files are committed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: the repository's packages
    sys.path.insert(0, str(ROOT))

from training.data import load_test  # noqa: E402

# Test-set indices, each the first test image of its class (index 0 is an ankle boot).
IMAGES = {"ankle-boot": 0, "pullover": 1, "trouser": 2, "shirt": 4, "sneaker": 9, "bag": 18}
PHOTOS = {"photo-ankle-boot.jpg": 0, "photo-trouser.png": 2}
BATCH = 16


def product_photo(pixels: np.ndarray, size: tuple[int, int] = (480, 400), garment_px: int = 300) -> Image.Image:
    """A 28×28 data set image as a shop photo: negated (dark garment on white), enlarged smoothly, tinted,
    placed off-centre on an off-white RGB background."""
    garment = Image.fromarray(255 - pixels).resize((garment_px, garment_px), Image.Resampling.BICUBIC)
    shade = np.asarray(garment, np.float32)[..., None] / 255.0  # 1 = background, 0 = darkest garment
    tint = np.array([58, 64, 92], np.float32)  # a dark navy garment
    paper = np.array([250, 249, 246], np.float32)
    rgb = np.rint(tint + (paper - tint) * shade).astype(np.uint8)
    photo = Image.new("RGB", size, tuple(int(c) for c in paper))
    photo.paste(Image.fromarray(rgb, "RGB"), ((size[0] - garment_px) // 2 + 30, (size[1] - garment_px) // 2 - 10))
    return photo


def make(out: Path, data_dir: str | None = None) -> list[Path]:
    split = load_test(data_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, index in IMAGES.items():
        path = out / f"{name}.png"
        Image.fromarray(split.images[index]).save(path, optimize=True)
        written.append(path)
    for name, index in PHOTOS.items():
        path = out / name
        photo = product_photo(split.images[index])
        if path.suffix == ".jpg":
            photo.save(path, quality=90)
        else:
            photo.save(path, optimize=True)
        written.append(path)
    np.save(out / "images.npy", split.images[:BATCH])
    np.save(out / "labels.npy", split.labels[:BATCH].astype(np.int64))
    written += [out / "images.npy", out / "labels.npy"]
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="folder with the four IDX files (default: found as for training)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    args = parser.parse_args(argv)
    for path in make(args.out, args.data_dir):
        print(f"{path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
