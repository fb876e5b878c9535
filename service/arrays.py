"""Already-prepared tensors: .npy / .npz uploads and uint8/float arrays → the model's input."""

from __future__ import annotations

import io
import zipfile

import numpy as np

from service.errors import BadInput, TooLarge

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"


def is_array_file(data: bytes, filename: str | None = None) -> bool:
    name = (filename or "").lower()
    return data.startswith(NPY_MAGIC) or data.startswith(ZIP_MAGIC) or name.endswith((".npy", ".npz"))


def load_array_file(data: bytes, max_rows: int) -> np.ndarray:
    """A .npy, or a .npz holding exactly one array (or one named `images`/`x`)."""
    try:
        if data.startswith(ZIP_MAGIC):
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                names = archive.files
                key = next((k for k in ("images", "x", "image") if k in names), None)
                if key is None and len(names) != 1:
                    raise BadInput(
                        f".npz holds {len(names)} arrays ({', '.join(names[:5])}); send one, or name it 'images'"
                    )
                array = archive[key or names[0]]
        elif data.startswith(NPY_MAGIC):
            array = np.load(io.BytesIO(data), allow_pickle=False)
        else:
            raise BadInput("not a .npy or .npz file")
    except BadInput:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise BadInput(f"unreadable array file: {exc}") from None
    return to_model_batch(array, max_rows)


def to_model_batch(array: np.ndarray, max_rows: int) -> np.ndarray:
    """[N, 28, 28] or [N, 28, 28, 1], uint8 (0–255) or float in [0, 1] → float32 [N, 28, 28, 1]."""
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[1:] != (28, 28, 1):
        raise BadInput(f"array shape {list(array.shape)} is not [N, 28, 28] or [N, 28, 28, 1]")
    if array.shape[0] == 0:
        raise BadInput("array holds no images")
    if array.shape[0] > max_rows:
        raise TooLarge(f"array holds {array.shape[0]} images; the limit is {max_rows}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255.0)
    if array.dtype.kind != "f":
        raise BadInput(f"array dtype {array.dtype} is neither uint8 nor float")
    out = array.astype(np.float32)
    if not np.isfinite(out).all() or out.min() < 0.0 or out.max() > 1.0:
        raise BadInput("float arrays must hold finite values in [0, 1]")
    return out
