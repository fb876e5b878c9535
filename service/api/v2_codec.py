"""The Open Inference Protocol (KServe V2) on the wire: datatypes, the JSON request, Triton's binary
tensor data and classification extensions, and the response body.

Pure functions of bytes and numpy arrays: no HTTP, no model. Every problem is a ServiceError
(nearly always BadInput, 400) whose message names the tensor at fault.

JSON BYTES elements are base64 strings. The protocol carries BYTES in JSON as plain strings, which
cannot hold an image file (not valid UTF-8), so base64 it is; raw bytes go as binary tensor data.
"""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from service.dataplane import top_k
from service.errors import BadInput, TooLarge, UnsupportedMedia

# V2 datatype -> numpy dtype, little-endian as the binary extension lays tensors out. BYTES (length-
# prefixed strings) and BF16 (no numpy type) are known names without a fixed-size numpy dtype.
NUMPY_TYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(code)
    for name, code in {
        "BOOL": "?",
        "UINT8": "u1",
        "UINT16": "<u2",
        "UINT32": "<u4",
        "UINT64": "<u8",
        "INT8": "i1",
        "INT16": "<i2",
        "INT32": "<i4",
        "INT64": "<i8",
        "FP16": "<f2",
        "FP32": "<f4",
        "FP64": "<f8",
    }.items()
}
DATATYPES = frozenset(NUMPY_TYPES) | {"BYTES", "BF16"}
_NAMES = {dtype: name for name, dtype in NUMPY_TYPES.items()}
_LENGTH = struct.Struct("<I")  # a BYTES element's length prefix in binary data
# Inflation of a compressed body proceeds in steps of this many bytes, each counted against the limit (and
# reserved from the memory budget) before the next is made.
INFLATE_STEP = 1 << 20
# Python objects that parsing JSON makes cost about this much per value or container (a float: 24 bytes and
# a list slot; a list: 56 bytes and up): reserved from the budget before the parse, per token counted.
JSON_BYTES_PER_TOKEN = 64
# Tokens (values and containers) a request may hold besides its data: ids, names, shapes, parameters, outputs.
JSON_SPARE_TOKENS = 65536

Reserve = Callable[[int], None]  # hold this many more bytes of working memory (service.memory), or raise


def datatype_of(dtype: np.dtype[Any] | str) -> str:
    """The V2 name of a numpy dtype (object and string arrays are BYTES)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return "BYTES"
    return _NAMES[dtype.newbyteorder("<")]


# ---------------------------------------------------------------------------------------- request


class _Wire(BaseModel):
    # strict: a shape of [1, true] or an id of 42 is a client bug worth a 400, not a silent coercion.
    model_config = ConfigDict(strict=True, extra="ignore")


class RequestInput(_Wire):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class RequestOutput(_Wire):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(_Wire):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


@dataclass(frozen=True)
class ParsedRequest:
    header: InferRequest
    raw: list[bytes | None]  # each input's binary tensor data, in input order; None: it is in "data"


def decode_content(body: bytes, encoding: str | None, limit: int, reserve: Reserve | None = None) -> bytes:
    """Undo a gzip/deflate Content-Encoding (tritonclient can compress requests), within `limit`: inflated
    INFLATE_STEP bytes at a time, each step counted against the limit (and `reserve`d, twice: the steps and
    their join) before the next, so a small bomb stops at the limit, never past it."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMedia(f"unsupported Content-Encoding {encoding!r}: send gzip, deflate or none")
    # deflate means the zlib format (RFC 9110); 16 + MAX_WBITS reads gzip.
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    parts: list[bytes] = []
    size, pending = 0, body
    try:
        while not inflater.eof:
            step = inflater.decompress(pending, INFLATE_STEP)
            pending = inflater.unconsumed_tail
            if not step and not pending:
                break  # all input consumed short of the stream's end: truncated
            size += len(step)
            if size > limit:
                raise TooLarge(f"decompressed request body exceeds the limit of {limit:,} bytes")
            if reserve is not None:
                reserve(2 * len(step))
            parts.append(step)
    except zlib.error as exc:
        raise BadInput(f"request body is not valid {encoding} data: {exc}") from None
    if not inflater.eof:
        raise BadInput(f"request body is truncated {encoding} data")
    return b"".join(parts)


def json_cost(text: bytes, max_tokens: int) -> int:
    """What parsing `text` into Python objects may cost, judged before parsing by counting its containers and
    separators (bytes.count: C speed, no objects). A request holds at most `max_tokens` of them (its largest
    valid batch, in the most nested form); more is refused here (413) instead of being built as objects:
    64 KiB of gzip that inflates to `[],[],...` would otherwise become gigabytes of empty lists."""
    tokens = text.count(b",") + text.count(b"[") + text.count(b"{")
    if tokens > max_tokens:
        raise TooLarge(
            f"the inference request's JSON holds {tokens:,} values and arrays, more than the largest batch this "
            f"server takes can have ({max_tokens:,}); send fewer images, or the data as binary tensors"
        )
    return len(text) + tokens * JSON_BYTES_PER_TOKEN


def max_json_tokens(max_rows: int, values_per_row: int) -> int:
    """Tokens of the largest valid request: each value, each nesting bracket around it (at most one more per
    value: [N, 28, 28, 1] nested), and what the protocol has besides."""
    return 2 * max_rows * values_per_row + JSON_SPARE_TOKENS


def parse_request(
    body: bytes,
    header_length: str | None,
    max_json_bytes: int | None = None,
    max_tokens: int | None = None,
    reserve: Reserve | None = None,
) -> ParsedRequest:
    """Split the body into the JSON header and each input's binary data, checking every size. The JSON part is
    refused (413) past `max_json_bytes`, or past `max_tokens` values and arrays (json_cost) before it is
    parsed; what its parse costs is `reserve`d first."""
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise BadInput(f"Inference-Header-Content-Length {header_length!r} is not an integer") from None
        if not 0 <= length <= len(body):
            raise BadInput(f"Inference-Header-Content-Length is {length} but the body is {len(body)} bytes")
        json_part, binary = body[:length], body[length:]
    if max_json_bytes is not None and len(json_part) > max_json_bytes:
        raise TooLarge(
            f"the inference request's JSON is {len(json_part):,} bytes; the limit is {max_json_bytes:,} "
            "(send large tensors as binary data)"
        )
    if max_tokens is not None:
        cost = json_cost(json_part, max_tokens)
        if reserve is not None:
            reserve(cost)
    try:
        header = InferRequest.model_validate_json(json_part)
    except ValidationError as exc:
        raise BadInput(_describe(exc)) from None
    except (ValueError, RecursionError, MemoryError) as exc:  # whatever else a parser may raise on hostile text
        raise BadInput(f"malformed JSON in the inference request: {type(exc).__name__}") from None

    raw: list[bytes | None] = []
    offset = 0
    for tensor in header.inputs:
        what = f"input {tensor.name!r}"
        _refuse_shared_memory(tensor.parameters, what)
        size = _parameter(tensor.parameters, "binary_data_size", int, what)
        if size is None:
            if tensor.data is None:
                raise BadInput(f"{what} has neither 'data' nor parameters.binary_data_size")
            raw.append(None)
            continue
        if tensor.data is not None:
            raise BadInput(f"{what} has both 'data' and parameters.binary_data_size; send one")
        if header_length is None:
            raise BadInput(f"{what} has binary_data_size but the request has no Inference-Header-Content-Length")
        if size < 0 or offset + size > len(binary):
            raise BadInput(
                f"{what} declares binary_data_size {size} but {len(binary) - offset} bytes of binary data remain"
            )
        raw.append(binary[offset : offset + size])
        offset += size
    if offset != len(binary):
        raise BadInput(
            f"{len(binary) - offset} bytes after the JSON header belong to no input "
            f"(the binary_data_size values add up to {offset} of {len(binary)})"
        )
    return ParsedRequest(header, raw)


def decode_input(tensor: RequestInput, raw: bytes | None) -> np.ndarray:
    """The input's elements in its declared shape: numeric types as their numpy dtype (read-only when
    from binary data), BYTES as an object array of bytes."""
    name, shape, datatype = tensor.name, tensor.shape, tensor.datatype
    if datatype not in DATATYPES:
        raise BadInput(f"input {name!r}: unknown datatype {datatype!r} (V2 datatypes: {', '.join(sorted(DATATYPES))})")
    if any(d < 0 for d in shape):
        raise BadInput(f"input {name!r}: shape {shape} has a negative dimension")
    count = prod(shape)
    if datatype == "BYTES":
        elements = _split_bytes(raw, name) if raw is not None else _json_bytes(tensor.data or [], name)
        if len(elements) != count:
            raise BadInput(f"input {name!r} holds {len(elements)} BYTES elements but shape {shape} needs {count}")
        array = np.empty(count, dtype=object)
        array[:] = elements
        return array.reshape(shape)
    dtype = NUMPY_TYPES.get(datatype)
    if dtype is None:
        raise BadInput(f"input {name!r}: datatype {datatype} is not supported")
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise BadInput(
                f"input {name!r}: binary_data_size is {len(raw)} bytes but shape {shape} of {datatype} "
                f"needs {count * dtype.itemsize}"
            )
        return np.frombuffer(raw, dtype).reshape(shape)
    values = _json_numbers(tensor.data or [], dtype, name)
    if values.size != count:
        raise BadInput(f"input {name!r} has {values.size} data elements but shape {shape} needs {count}")
    return values.reshape(shape)


def _json_numbers(data: list[Any], dtype: np.dtype[Any], name: str) -> np.ndarray:
    """Flat or nested (row-major) JSON numbers -> a flat array of `dtype`, refusing anything that would
    need a lossy or surprising conversion (strings, floats for integers, values out of range)."""
    if not data:
        return np.zeros(0, dtype)
    try:
        values = np.array(data)
    except ValueError:
        raise BadInput(f"input {name!r}: data is not a regular nesting of numbers (ragged or too deep)") from None
    accepted = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}[dtype.kind]
    if values.dtype.kind not in accepted:
        found = "booleans" if values.dtype.kind == "b" else "numbers" if values.dtype.kind in "iuf" else "non-numbers"
        raise BadInput(f"input {name!r}: data holds {found} that are not valid {datatype_of(dtype)} values")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise BadInput(f"input {name!r}: data holds values outside {datatype_of(dtype)}'s {info.min}..{info.max}")
    return values.astype(dtype).ravel()


def _json_bytes(data: list[Any], name: str) -> list[bytes]:
    """Flat or nested JSON strings, each base64 -> bytes. A stack, not recursion: nesting depth is the
    client's to choose."""
    out: list[bytes] = []
    stack: list[Any] = [iter(data)]
    while stack:
        item = next(stack[-1], stack)  # the stack itself marks an exhausted level
        if item is stack:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        elif isinstance(item, str):
            try:
                out.append(base64.b64decode(item, validate=True))
            except ValueError:
                raise BadInput(
                    f"input {name!r} element {len(out)} is not base64: in JSON, BYTES data must be base64 "
                    "(or send the raw bytes as binary tensor data)"
                ) from None
        else:
            raise BadInput(f"input {name!r}: BYTES data must be base64 strings, not {type(item).__name__}")
    return out


def _split_bytes(raw: bytes, name: str) -> list[bytes]:
    """Binary BYTES: each element is a 4-byte little-endian length, then that many bytes."""
    out: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + _LENGTH.size > len(raw):
            raise BadInput(f"input {name!r}: BYTES element {len(out)} has a truncated length prefix")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise BadInput(
                f"input {name!r}: BYTES element {len(out)} declares {length} bytes but {len(raw) - offset} remain"
            )
        out.append(raw[offset : offset + length])
        offset += length
    return out


# ---------------------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class OutputPlan:
    name: str
    binary: bool
    classification: int = 0  # top-k "value:index[:label]" strings instead of the tensor; 0: the tensor


def plan_outputs(request: InferRequest, available: list[str], model_name: str) -> list[OutputPlan]:
    """Which outputs to return and how. None named: all of them, as the protocol says."""
    default_binary = _parameter(request.parameters, "binary_data_output", bool, "request") or False
    if not request.outputs:
        return [OutputPlan(name, default_binary) for name in available]
    plans: list[OutputPlan] = []
    for output in request.outputs:
        what = f"output {output.name!r}"
        if output.name not in available:
            # 400 as Triton and KServe answer it: the model exists, the request is wrong.
            raise BadInput(
                f"unexpected inference output {output.name!r} for model {model_name!r}; "
                f"outputs are {', '.join(available)}"
            )
        if any(p.name == output.name for p in plans):
            raise BadInput(f"{what} is requested twice")
        _refuse_shared_memory(output.parameters, what)
        binary = _parameter(output.parameters, "binary_data", bool, what)
        count = _parameter(output.parameters, "classification", int, what) or 0
        if count < 0:
            raise BadInput(f"{what}: classification must be a positive count, got {count}")
        plans.append(OutputPlan(output.name, default_binary if binary is None else binary, count))
    return plans


def classify(values: np.ndarray, count: int, labels: Sequence[str] | None = None) -> np.ndarray:
    """Triton's classification extension: per row (first dimension) the `count` highest values as
    b"value:index[:label]", shape [N, min(count, values per row)]. Values are written as the shortest
    decimal that reads back to the same float32, so nothing is lost."""
    rows = values.reshape(len(values), -1)
    order = top_k(rows, count)  # the same ranking as /v1's top_k
    out = np.empty(order.shape, dtype=object)
    for r, c in np.ndindex(out.shape):
        index = int(order[r, c])
        score = np.format_float_positional(rows[r, index], unique=True, trim="-")
        out[r, c] = f"{score}:{index}{':' + labels[index] if labels else ''}".encode()
    return out


@dataclass(frozen=True)
class OutputTensor:
    name: str
    array: np.ndarray
    binary: bool


def encode_response(
    model_name: str, model_version: str, request_id: str | None, tensors: list[OutputTensor]
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary tensor data follows it."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for tensor in tensors:
        array = tensor.array
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": datatype_of(array.dtype),
            "shape": list(array.shape),
        }
        if tensor.binary:
            blob = _to_binary(array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif array.dtype.kind == "O":
            entry["data"] = [element.decode() for element in array.ravel()]
        else:
            entry["data"] = array.ravel().tolist()  # float32 -> Python float is exact, so JSON round-trips
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        body["id"] = request_id
    body["outputs"] = outputs
    header = orjson.dumps(body)  # 10-20x json.dumps on float lists; the same values (tests)
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


def _to_binary(array: np.ndarray) -> bytes:
    if array.dtype.kind == "O":
        return b"".join(_LENGTH.pack(len(element)) + element for element in array.ravel())
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()  # C order: row-major


# ---------------------------------------------------------------------------------------- helpers


def _parameter(parameters: dict[str, Any] | None, key: str, kind: type, what: str) -> Any:
    value = (parameters or {}).get(key)
    # type() rather than isinstance: True is an int in Python, not in the protocol.
    if value is not None and type(value) is not kind:
        expected = "a boolean" if kind is bool else "an integer"
        raise BadInput(f"{what}: parameter {key!r} must be {expected}, got {value!r}")
    return value


def _refuse_shared_memory(parameters: dict[str, Any] | None, what: str) -> None:
    if parameters and any(key.startswith("shared_memory") for key in parameters):
        raise BadInput(f"{what}: shared memory is not supported by this server; send the data in the request")


def _describe(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    if any(e["type"] == "json_invalid" for e in errors):
        return f"malformed JSON in the inference request: {errors[0]['msg']}"
    problems = [f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}" for e in errors[:5]]
    return "invalid inference request: " + "; ".join(problems)
