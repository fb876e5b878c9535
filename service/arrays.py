"""Already-prepared tensors: .npy / .npz uploads and uint8/float arrays → the model's input."""

from __future__ import annotations

import contextlib
import io
import struct
import zipfile
from collections.abc import Sequence
from typing import IO

import numpy as np

from service import memory
from service.errors import BadInput, ServiceError, TooLarge
from service.memory import MemoryBudget

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
ZIP_END = b"PK\x05\x06"
# An .npz holds an array or two (images, labels): a central directory (one ~50-byte entry per member, each a
# Python object once parsed) larger than this is refused before zipfile parses it.
MAX_ZIP_DIRECTORY = 64 * 1024
# Only these member compressions: zipfile inflates deflate within the size a member declares, but bzip2 and
# LZMA members in one go, however far they inflate (a 2 MiB member reached gigabytes).
ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
# .npy element types worth reading (numbers and booleans, at most 8 bytes each); to_model_batch says which
# of them it takes. Anything else (strings, structures, objects) is refused from the header.
NPY_KINDS = "buif"


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


def load_array_file(data: bytes, max_rows: int, budget: MemoryBudget | None = None) -> np.ndarray:
    """A .npy, or a .npz holding exactly one array (or one named `images`/`x`).

    Each array's header is checked (shape, dtype, size) before its data is read: np.load would
    otherwise allocate whatever shape a few hostile bytes claim. A .npz member is inflated as it is
    read, never past the size its header declares, and only if it is stored or deflated. With a
    `budget`, the array's declared size and its float32 copies are reserved before its data is read.
    Every failure of the zip, deflate or .npy readers is a 400."""
    try:
        with contextlib.ExitStack() as held:  # the array's reservation, until its float32 batch is made
            return to_model_batch(_load(data, max_rows, budget, held), max_rows)
    except (ServiceError, memory.Cancelled):
        raise
    except MemoryError:
        raise TooLarge("array file too large to read in memory") from None
    except Exception as exc:
        # zipfile, zlib and numpy's header reader raise a zoo of types on hostile bytes (BadZipFile,
        # zlib.error, NotImplementedError, RuntimeError, struct.error, EOFError, SyntaxError, ...): all bad input.
        raise BadInput(f"unreadable array file: {type(exc).__name__}: {str(exc)[:200]}") from None


def _load(data: bytes, max_rows: int, budget: MemoryBudget | None, held: contextlib.ExitStack) -> np.ndarray:
    if data.startswith(ZIP_MAGIC):
        _check_zip_directory(data)
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = [n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy")]
            key = images_member(names)
            if key is None:
                listed = ", ".join(names[:5]) or "no .npy members"
                raise BadInput(f".npz holds {len(names)} arrays ({listed}); send one, or name it 'images'")
            member = key + ".npy"
            info = archive.getinfo(member)
            if info.flag_bits & 0x1:
                raise BadInput(f".npz member {member} is encrypted; send it unencrypted")
            if info.compress_type not in ZIP_METHODS:
                raise BadInput(
                    f".npz member {member} uses zip compression method {info.compress_type}; "
                    "only stored and deflate are accepted (np.savez, np.savez_compressed)"
                )
            if info.file_size > max_rows * 28 * 28 * 8 + 4096:
                raise TooLarge(f".npz member {member} is larger than {max_rows} images can be")
            with archive.open(member) as stream:
                return _read_npy(stream, max_rows, budget, held, declared=info.file_size)
    if data.startswith(NPY_MAGIC):
        return _read_npy(io.BytesIO(data), max_rows, budget, held)
    raise BadInput("not a .npy or .npz file")


def _check_zip_directory(data: bytes) -> None:
    """Refuse a zip whose central directory is large (many members) before zipfile makes objects of it."""
    end = data.rfind(ZIP_END, max(0, len(data) - (22 + 65535)))
    if end < 0 or end + 22 > len(data):
        raise BadInput("unreadable array file: not a complete zip (.npz) file")
    (size,) = struct.unpack_from("<I", data, end + 12)
    if size > MAX_ZIP_DIRECTORY:
        raise BadInput(f".npz central directory is {size:,} bytes (more than {MAX_ZIP_DIRECTORY:,}): too many members")


def _read_npy(
    stream: IO[bytes],
    max_rows: int,
    budget: MemoryBudget | None,
    held: contextlib.ExitStack,
    declared: int | None = None,
) -> np.ndarray:
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
    if dtype.kind not in NPY_KINDS or dtype.itemsize > 8:
        raise BadInput(f"array dtype {dtype} is neither uint8 nor float")
    count = int(np.prod(shape))
    size = count * dtype.itemsize
    if declared is not None and size > declared:
        raise BadInput(f"array data is {size} bytes by its header, more than the {declared} its .npz entry declares")
    # The data, then float32 copies of it (to_model_batch): all bounded by max_rows, reserved all the same.
    if budget is not None:
        held.enter_context(budget.reserve(size + 2 * count * 4, "this array"))
    payload = stream.read(size + 1)
    if len(payload) != size:
        raise BadInput(f"array data is {len(payload)} bytes; its header promises {size}")
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
