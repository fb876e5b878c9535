"""The scorer's inputs: image files, folders, .npy/.npz arrays and IDX files, with their true labels."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scoring import InputError, UsageError
from service import arrays
from training.data import IMAGE_MAGIC, LABEL_MAGIC, DataError, read_idx

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
ARRAY_SUFFIXES = frozenset({".npy", ".npz"})
# Arrays in a .npz: the images under the names the server accepts, the labels under these.
LABEL_KEYS = ("labels", "y", "label")


@dataclass
class ImageSource:
    path: Path
    truth: int | None = None


@dataclass
class ArraySource:
    path: Path
    images: np.ndarray  # as stored: [N, 28, 28] or [N, 28, 28, 1], uint8 or float
    labels: np.ndarray | None = None


@dataclass
class BrokenSource:
    path: Path
    error: str


Source = ImageSource | ArraySource | BrokenSource


def is_idx_name(path: Path) -> bool:
    name = path.name.lower()
    return "ubyte" in name or re.search(r"\.idx\d?(\.gz)?$", name) is not None


def is_array_input(path: Path) -> bool:
    return path.suffix.lower() in ARRAY_SUFFIXES or is_idx_name(path)


def read_idx_input(path: Path, magic: int) -> np.ndarray:
    """training.data.read_idx (gzipped or not, magic checked), its DataError as an InputError."""
    try:
        return read_idx(path, magic)
    except DataError as exc:
        raise InputError(exc.reason) from None


def label_file_beside(path: Path) -> Path | None:
    """t10k-images-idx3-ubyte.gz -> t10k-labels-idx1-ubyte.gz, when it exists."""
    name = path.name.replace("images", "labels").replace("idx3", "idx1")
    beside = path.with_name(name)
    return beside if name != path.name and beside.is_file() else None


def read_labels(path: Path, count: int, classes: Sequence[str]) -> np.ndarray:
    """Labels from an IDX label file or a .npy of class ids; raises InputError."""
    if path.suffix.lower() == ".npy":
        try:
            labels = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise InputError(f"cannot read labels: {exc}") from None
    else:
        labels = read_idx_input(path, LABEL_MAGIC)
    return check_labels(labels, count, classes)


def check_labels(labels: np.ndarray, count: int, classes: Sequence[str]) -> np.ndarray:
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise InputError(f"labels must be a 1-D array of class ids, got {labels.dtype} {list(labels.shape)}")
    if len(labels) != count:
        raise InputError(f"{len(labels)} labels for {count} images")
    if count and (labels.min() < 0 or labels.max() >= len(classes)):
        raise InputError(f"labels must be class ids 0-{len(classes) - 1}")
    return labels.astype(np.int64)


def read_array(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """A .npy, or a .npz with one array (or `images`/`x`) and optionally `labels`/`y`."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            return np.asarray(loaded), None
        with loaded:
            names = loaded.files
            label_key = next((k for k in LABEL_KEYS if k in names), None)
            key = arrays.images_member(names, besides=[label_key] if label_key else [])
            if key is None:
                raise InputError(f".npz holds {len(names)} arrays ({', '.join(names[:5])}); name the images 'images'")
            return loaded[key], (loaded[label_key] if label_key else None)
    except InputError:
        raise
    except (OSError, ValueError, EOFError) as exc:  # np.load's errors for truncated or non-array files
        raise InputError(f"unreadable array file: {exc}") from None


def check_images(images: np.ndarray) -> np.ndarray:
    """The shape the server accepts; dtype and range are checked per batch by arrays.to_model_batch."""
    if images.ndim not in (3, 4) or images.shape[1:3] != (28, 28) or images.shape[3:] not in ((), (1,)):
        raise InputError(f"array shape {list(images.shape)} is not [N, 28, 28] or [N, 28, 28, 1]")
    if len(images) == 0:
        raise InputError("array holds no images")
    return images


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def class_from_folder(name: str, classes: Sequence[str]) -> int | None:
    """Folder name -> class id: the class name or id, leniently ('T-shirt_top', 'tshirt-top', 'top',
    'Sandals', '9', '9_ankle_boot' all work)."""
    match = re.fullmatch(r"(\d+)(?:[\s_.-]+(.*))?", name.strip())
    if match:
        wanted = int(match.group(1))
        if 0 <= wanted < len(classes):
            return wanted
        name = match.group(2) or ""
    key = _norm(name)
    if not key:
        return None
    keys = {key, key[:-1] if key.endswith("s") else key, key[:-2] if key.endswith("es") else key}
    for index, cls in enumerate(classes):
        names = {_norm(cls), *(_norm(part) for part in re.split(r"[/|]", cls))}
        if keys & names:
            return index
    return None


def walk(folder: Path) -> Iterator[Path]:
    """Files under `folder` in a stable order; hidden files and folders are skipped."""
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            yield from walk(path)
        elif path.is_file():
            yield path


def is_labels_beside_images(path: Path) -> bool:
    """t10k-labels-idx1-ubyte.gz or labels.npy next to the images file it labels (label_file_beside)."""
    name = path.name.replace("labels", "images").replace("idx1", "idx3")
    return name != path.name and path.with_name(name).is_file()


def plan(
    inputs: list[Path], classes: Sequence[str], labels_path: Path | None, skipped: list[Path] | None = None
) -> list[Source]:
    """Expand the inputs into sources, with their true labels where they can be known. Files in folders that
    are neither images nor arrays nor the label files beside them are appended to `skipped`."""
    sources: list[Source] = []
    for given in inputs:
        if given.is_dir():
            for path in walk(given):
                suffix = path.suffix.lower()
                if suffix in IMAGE_SUFFIXES:
                    sources.append(ImageSource(path, class_from_folder(path.parent.name, classes)))
                elif is_labels_beside_images(path) or (is_idx_name(path) and "idx1" in path.name.lower()):
                    continue  # labels: read with the images they belong to
                elif suffix in ARRAY_SUFFIXES or is_idx_name(path):
                    sources.append(load_array_source(path, classes, None))
                elif skipped is not None:
                    skipped.append(path)
        elif is_array_input(given):
            sources.append(load_array_source(given, classes, labels_path))
        else:
            sources.append(ImageSource(given))
    return sources


def load_array_source(path: Path, classes: Sequence[str], labels_path: Path | None) -> Source:
    try:
        if path.suffix.lower() in ARRAY_SUFFIXES:
            images, labels = read_array(path)
        else:
            images, labels = read_idx_input(path, IMAGE_MAGIC), None
        check_images(images)
    except InputError as exc:
        return BrokenSource(path, str(exc))
    if labels_path is not None:  # given explicitly: a mismatch is the user's mistake, so refuse
        try:
            return ArraySource(path, images, read_labels(labels_path, len(images), classes))
        except InputError as exc:
            raise UsageError(f"--labels {labels_path}: {exc}") from None
    beside = label_file_beside(path) if labels is None else None
    try:
        if beside is not None:
            labels = read_labels(beside, len(images), classes)
        elif labels is not None:
            labels = check_labels(labels, len(images), classes)
    except InputError as exc:
        print(f"warning: {beside or path}: labels ignored: {exc}", file=sys.stderr)
        labels = None
    return ArraySource(path, images, labels)


def count(sources: list[Source]) -> int:
    """How many images the sources hold (one per image or broken source, one per array row)."""
    return sum(len(s.images) if isinstance(s, ArraySource) else 1 for s in sources)


@dataclass
class Unit:
    """One model run of the scorer, made the same way whichever engine runs it (so that every engine runs the
    same batches and gets the same answers): consecutive image files, up to `batch_size` rows of one array
    (rows start:stop), or one input that could not be read (no model run)."""

    images: list[ImageSource] | None = None
    array: ArraySource | None = None
    start: int = 0
    stop: int = 0
    broken: BrokenSource | None = None

    def __len__(self) -> int:
        if self.images is not None:
            return len(self.images)
        return self.stop - self.start if self.array is not None else 1

    def names(self) -> list[str]:
        """Each image's `source` in the output: its path, or `array#row`."""
        if self.images is not None:
            return [str(s.path) for s in self.images]
        if self.array is not None:
            return [f"{self.array.path}#{i}" for i in range(self.start, self.stop)]
        assert self.broken is not None
        return [str(self.broken.path)]

    def truths(self) -> list[int | None]:
        if self.images is not None:
            return [s.truth for s in self.images]
        if self.array is not None:
            labels = self.array.labels
            return [None if labels is None else int(labels[i]) for i in range(self.start, self.stop)]
        return [None]


def units(sources: list[Source], batch_size: int) -> Iterator[Unit]:
    """The sources as model runs, in input order: image files gathered up to `batch_size` at a time (a run
    ends at the next array or broken input, which keeps rows in input order), arrays cut into chunks."""
    pending: list[ImageSource] = []
    for source in sources:
        if isinstance(source, ImageSource):
            pending.append(source)
            if len(pending) >= batch_size:
                yield Unit(images=pending)
                pending = []
            continue
        if pending:
            yield Unit(images=pending)
            pending = []
        if isinstance(source, BrokenSource):
            yield Unit(broken=source)
            continue
        for start in range(0, len(source.images), batch_size):
            yield Unit(array=source, start=start, stop=min(start + batch_size, len(source.images)))
    if pending:
        yield Unit(images=pending)
