"""Already-prepared tensors: .npy / .npz uploads and uint8/float arrays → the model's input."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from typing import IO

import numpy as np

from service.errors import BadInput, TooLarge

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"


IMAGE_KEYS = ("images", "x", "image")


def images_member(names: Sequence[str], besides: Sequence[str] = ()) -> str | None:
    """Which array of a .npz holds the images: one named as in IMAGE_KEYS, else the only one not named in
    `besides` (labels); None when that is ambiguous."""
    key = next((k for k in IMAGE_KEYS if k in names), None)
    if key is not None:
        return key
    rest = [n for n in names if n not in besides]
    return rest[0] if len(rest) == 1 else None


def is_array_file(data: bytes, filename: str | None = None) -> bool:
    name = (filename or "").lower()
    return data.startswith(NPY_MAGIC) or data.startswith(ZIP_MAGIC) or name.endswith((".npy", ".npz"))


def load_array_file(data: bytes, max_rows: int) -> np.ndarray:
    """A .npy, or a .npz holding exactly one array (or one named `images`/`x`).

    Each array's header is checked (shape, dtype, size) before its data is read: np.load would
    otherwise allocate whatever shape a few hostile bytes claim."""
    try:
        if data.startswith(ZIP_MAGIC):
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                names = [n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy")]
                key = images_member(names)
                if key is None:
                    listed = ", ".join(names[:5]) or "no .npy members"
                    raise BadInput(f".npz holds {len(names)} arrays ({listed}); send one, or name it 'images'")
                member = key + ".npy"
                if archive.getinfo(member).file_size > max_rows * 28 * 28 * 8 + 4096:
                    raise TooLarge(f".npz member {member} is larger than {max_rows} images can be")
                with archive.open(member) as stream:
                    array = _read_npy(stream, max_rows)
        elif data.startswith(NPY_MAGIC):
            array = _read_npy(io.BytesIO(data), max_rows)
        else:
            raise BadInput("not a .npy or .npz file")
    except (BadInput, TooLarge):
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise BadInput(f"unreadable array file: {exc}") from None
    return to_model_batch(array, max_rows)


def _read_npy(stream: IO[bytes], max_rows: int) -> np.ndarray:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version in ((2, 0), (3, 0)):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise BadInput(f"unreadable array file: unsupported .npy format version {version}")
    if dtype.hasobject:
        raise BadInput("object arrays are not accepted")
    if len(shape) not in (3, 4) or tuple(shape[1:3]) != (28, 28) or (len(shape) == 4 and shape[3] != 1):
        raise BadInput(f"array shape {list(shape)} is not [N, 28, 28] or [N, 28, 28, 1]")
    if shape[0] > max_rows:
        raise TooLarge(f"array holds {shape[0]} images; the limit is {max_rows}")
    count = int(np.prod(shape))
    payload = stream.read(count * dtype.itemsize + 1)
    if len(payload) != count * dtype.itemsize:
        raise BadInput(f"array data is {len(payload)} bytes; its header promises {count * dtype.itemsize}")
    array = np.frombuffer(payload, dtype=dtype, count=count)
    return array.reshape(shape[::-1]).T if fortran_order else array.reshape(shape)


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
