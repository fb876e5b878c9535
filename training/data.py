"""Find, fetch, read and verify the Fashion-MNIST IDX files, and split them.

Search order: an explicit folder, $FASHION_MNIST_DIR, Debian's `dataset-fashion-mnist`
package, the Keras cache. When none has all four files, they are downloaded from the
data set's canonical location into a cache folder, checked against known SHA-256 sums.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import tempfile
import urllib.request
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# SHA-256 of each file's decompressed IDX payload: gzip re-compression (Debian's package
# is re-compressed) changes the .gz bytes but not these.
CONTENT_SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
EXPECTED_COUNT = {"train": 60_000, "test": 10_000}
DOWNLOAD_URL = "https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
ENV_VAR = "FASHION_MNIST_DIR"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
KERAS_CACHE = Path.home() / ".keras" / "datasets" / "fashion-mnist"
DOWNLOAD_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fashion-serve" / "fashion-mnist"

IMAGE_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABEL_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
IDX_UBYTE = b"\x00\x00\x08"  # the first three bytes of an IDX file of unsigned bytes
GZIP_MAGIC = b"\x1f\x8b"


class DataError(Exception):
    """The data set is missing, truncated or corrupt; the message names the file."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message  # what is wrong, without the file's name (where the message has it)


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, 28, 28]
    labels: np.ndarray  # uint8 [N]


@dataclass(frozen=True)
class Dataset:
    train: Split
    validation: Split
    test: Split
    source: Path
    sha256: dict[str, str]


def candidate_dirs(data_dir: str | Path | None = None) -> list[Path]:
    dirs = []
    if data_dir is not None:
        dirs.append(Path(data_dir))
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]))
    dirs += [DEBIAN_DIR, KERAS_CACHE, DOWNLOAD_CACHE]
    return dirs


def find_data_dir(data_dir: str | Path | None = None, download: bool = True) -> Path:
    """The first folder holding all four files; an explicit folder must hold them."""
    if data_dir is not None and not _has_all(Path(data_dir)):
        missing = [f for f in FILES.values() if not (Path(data_dir) / f).is_file()]
        raise DataError(f"{data_dir}: missing {', '.join(missing)}")
    for folder in candidate_dirs(data_dir):
        if _has_all(folder):
            return folder
    if not download:
        searched = ", ".join(str(d) for d in candidate_dirs(data_dir))
        raise DataError(
            f"Fashion-MNIST not found (searched {searched}); install Debian's dataset-fashion-mnist "
            f"package, set {ENV_VAR}, or pass --data-dir"
        )
    return download_files(DOWNLOAD_CACHE)


def _has_all(folder: Path) -> bool:
    return all((folder / name).is_file() for name in FILES.values())


def download_files(dest: Path, base_url: str = DOWNLOAD_URL, names: Iterable[str] = CONTENT_SHA256) -> Path:
    """Download each file, verify its SHA-256 and move it into place atomically."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        target = dest / name
        if target.is_file() and content_sha256(target) == CONTENT_SHA256[name]:
            continue
        fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{name}.")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(base_url + name, timeout=60) as resp:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
            digest = content_sha256(Path(tmp))
            if digest != CONTENT_SHA256[name]:
                raise DataError(f"{name}: downloaded data has SHA-256 {digest}, expected {CONTENT_SHA256[name]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return dest


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def content_sha256(path: Path) -> str:
    try:
        with gzip.open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path.name}: not a readable gzip file ({exc})") from None


def read_idx(path: Path, expected_magic: int, expected_count: int | None = None) -> np.ndarray:
    """One IDX file of unsigned bytes, gzipped or plain: magic number, dimensions, count and length checked.

    Raises DataError naming the file; its `reason` is the same message without the name."""

    def fail(reason: str) -> NoReturn:
        raise DataError(f"{path.name}: {reason}", reason) from None

    try:
        raw = path.read_bytes()
    except OSError as exc:
        fail(f"cannot read IDX file: {exc}")
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:  # truncated or damaged gzip data
            fail(f"not a readable gzip file ({exc})")
    elif path.suffix.lower() == ".gz" and raw[:3] != IDX_UBYTE:
        fail("not a readable gzip file (no gzip header)")
    if len(raw) < 4:
        fail(f"too short for an IDX header ({len(raw)} bytes)")
    (magic,) = struct.unpack(">I", raw[:4])
    if raw[:3] != IDX_UBYTE:
        fail(f"not an IDX file of unsigned bytes (bad magic number {magic:#010x})")
    if magic != expected_magic:
        fail(f"IDX file holds {_idx_kind(magic)}, expected {_idx_kind(expected_magic)}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        fail("IDX header is truncated")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if ndim == 3 and shape[1:] != (28, 28):
        fail(f"images are {shape[1]}x{shape[2]}, expected 28x28")
    if expected_count is not None and shape[0] != expected_count:
        fail(f"holds {shape[0]} items, expected {expected_count}")
    size = math.prod(shape)
    if len(raw) - header != size:
        fail(f"IDX file has {len(raw) - header} data bytes, expected {size} for {shape}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _idx_kind(magic: int) -> str:
    return {IMAGE_MAGIC: "images", LABEL_MAGIC: "labels"}.get(magic, f"{magic & 0xFF}-D data")


def load_split(folder: Path, which: str, strict_count: bool = True) -> Split:
    images_path = folder / FILES[f"{which}_images"]
    labels_path = folder / FILES[f"{which}_labels"]
    count = EXPECTED_COUNT[which] if strict_count else None
    images = read_idx(images_path, IMAGE_MAGIC, count)
    labels = read_idx(labels_path, LABEL_MAGIC, count)
    if len(images) != len(labels):
        raise DataError(f"{labels_path.name}: {len(labels)} labels for {len(images)} images")
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise DataError(f"{labels_path.name}: label {labels.max()} out of range 0-9")
    return Split(images, labels)


def load(
    data_dir: str | Path | None = None,
    validation_size: int = 5_000,
    seed: int = 0,
    download: bool = True,
    with_test: bool = True,
) -> Dataset:
    """Train/validation/test. Validation is carved from the training set with a fixed seed;
    the test set is only ever used for final evaluation (`with_test=False`: not even read, an empty split)."""
    folder = find_data_dir(data_dir, download=download)
    train = load_split(folder, "train")
    test = load_split(folder, "test") if with_test else Split(np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8))
    order = np.random.default_rng(seed).permutation(len(train.labels))
    val_idx, train_idx = order[:validation_size], order[validation_size:]
    return Dataset(
        train=Split(train.images[train_idx], train.labels[train_idx]),
        validation=Split(train.images[val_idx], train.labels[val_idx]),
        test=test,
        source=folder,
        sha256={name: sha256_of(folder / name) for name in FILES.values()},
    )


def split_seed_of(config: dict[str, Any]) -> int:
    """The validation split's seed of a training record's config: `split_seed`, or for records written
    before it existed, `seed` (which then seeded both)."""
    return int(config.get("split_seed", config.get("seed", 0)))


def load_test(data_dir: str | Path | None = None, download: bool = False) -> Split:
    return load_split(find_data_dir(data_dir, download=download), "test")
