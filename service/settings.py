"""Every setting, each also an environment variable under the one prefix FASHION_SERVE_.

A plain pydantic model that reads its environment variables itself rather than pydantic-settings'
BaseSettings: the same rules for these flat fields (names case-insensitive, arguments over the
environment, values validated by the field's type), for none of that package's import time, which
every server start and every worker paid (~40 ms).

The fields are the one source of truth: the environment variables (FASHION_SERVE_<NAME>, and
FASHION_SERVE_<NAME>_FILE to read a value from a file such as a Docker secret), the command-line flags of
`python -m service` (`add_arguments`) and the README's table (`settings_table`) are all made from them, so a
field added here is a variable, a flag and a documented row at once. A FASHION_SERVE_* variable that is
none of these is an error that names the closest real one, never a setting ignored in silence."""

from __future__ import annotations

import argparse
import difflib
import math
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

ENV_PREFIX = "FASHION_SERVE_"
# FASHION_SERVE_<NAME>_FILE=/run/secrets/x: the setting's value is that file's content (trailing whitespace off).
FILE_SUFFIX = "_FILE"
# Names under the prefix that are not settings of the server but are read by docker-compose.yml before any
# container starts. Known, so that the check for mistyped names lets them through when they reach a server
# anyway (a shell that exports them, an env file passed whole); everything else under the prefix is a setting.
NOT_SETTINGS = {
    "HOST_PORT": "docker-compose.yml: host port the CPU service is published on (default 8000)",
    "GPU_HOST_PORT": "docker-compose.yml: host port the GPU service is published on (default 8001)",
    "IMAGE": "docker-compose.yml: image name (default fashion-serve)",
    "TAG": "docker-compose.yml: tag of the CPU image (default latest)",
    "MODELS_DIR": "docker-compose.yml: host folder mounted read-only on /mnt/models (default ./models)",
    "GPU_PROVIDERS": "docker-compose.yml: FASHION_SERVE_PROVIDERS of the GPU service (default cuda,cpu)",
}
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Settings(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), validate_default=True)

    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0 in containers).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port.")
    workers: int = Field(
        0,
        ge=0,
        le=64,
        description="uvicorn worker processes, each with its own session; 0: one per usable CPU core (the "
        "fastest setting measured, bench/RESULTS.md).",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level of the server's log and of its JSON access log (one line per request at info)."
    )

    models: Path = Field(
        Path("models"),
        description="Model repository, a folder of <name>/<version>/{model.onnx,card.json}; a relative path is "
        "taken from the folder the server is started in.",
    )
    model: str | None = Field(
        None,
        description="Serve only this model of the repository, and make it the default model; default: every "
        "model in the repository.",
    )
    model_version: str | None = Field(
        None,
        description="Serve only this version of the default model (the version policy specific:VERSION for it); "
        "default: its version policy's.",
    )
    default_model: str | None = Field(
        None,
        description="The model the short routes (/v1/predict, /v1/predict/batch, /v1/feature-maps) serve; default: "
        "`model` when set, else the only model, else fashion-mnist-cnn when present. With several models and no "
        "default those routes answer 404 naming them; /v1/models/<name>/… serves any model.",
    )
    version_policy: str = Field(
        "latest:1",
        pattern=r"^(latest(:[1-9][0-9]*)?|all|specific:[^,\s]+(,[^,\s]+)*)$",
        description="Versions served of each model whose folder has no config.json of its own: latest:N (the N "
        "highest), all, or specific:V1,V2.",
    )
    poll_interval_s: float = Field(
        0.0,
        ge=0,
        description="Seconds between scans of the model repository for new, changed, removed or fixed versions, "
        "each loaded and warmed before it takes traffic (zero downtime); 0: no polling.",
    )
    repository_api: bool = Field(
        True,
        description="POST /v2/repository/models/<name>/load and /unload (Triton's model repository API; the API "
        "key guards them when one is set); false: they answer 403.",
    )
    repository_state_dir: Path | None = Field(
        None,
        description="Folder the worker processes share for what the repository API asked (models unloaded, "
        "policies given); python -m service makes a temporary one when it starts several workers. Unset: "
        "each process keeps its own.",
    )

    # The environment gives a comma-separated list (see _split_providers).
    providers: list[str] = Field(
        default_factory=lambda: ["auto"],
        description="Execution providers in order of preference: cuda, cpu, tensorrt, or auto "
        "(CUDA when onnxruntime offers it, else CPU); comma-separated, e.g. cuda,cpu.",
    )
    strict_providers: bool = Field(
        False, description="Fail at startup when a requested provider is unavailable instead of falling back."
    )
    intra_op_threads: int = Field(
        1, ge=0, description="onnxruntime intra-op threads (0 = one per core). 1 measured fastest here."
    )
    graph_optimization: Literal["disabled", "basic", "extended", "all"] = Field(
        "all", description="onnxruntime graph optimisation level."
    )

    batch_max_size: int = Field(
        32, ge=1, le=1024, description="Most images gathered from concurrent requests into one session run."
    )
    batch_max_delay_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="How long a batch may wait for more requests (0: take only what is queued).",
    )

    inline_decode_max_bytes: int = Field(
        16 * 1024,
        ge=0,
        description="PNGs up to this size (and 64×64 pixels) are decoded on the event loop, where they take "
        "less time than the hop to a worker thread; bigger files and other formats in a thread. 0: always a thread.",
    )

    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1, description="Largest accepted image file.")
    max_image_pixels: int = Field(25_000_000, ge=1, description="Largest width×height, checked before decoding.")
    max_batch_images: int = Field(256, ge=1, description="Most images (or array rows) in one batch request.")
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1, description="Largest request body.")

    api_key: SecretStr | None = Field(
        None,
        description="API key, or several comma-separated (rotation). When set, the API routes need "
        "'Authorization: Bearer <key>' or 'X-API-Key: <key>' (else 401); /healthz, /readyz, /metrics, /v2/health/* "
        "and the pages (/, /docs, /redoc, their files, /openapi.json) do not, and the pages ask for the key. "
        "Unset or blank: no key needed. Prefer the variable or its _FILE form to the flag, which `ps` shows.",
    )
    max_in_flight: int = Field(
        256,
        ge=1,
        description="Requests handled at once per worker (health and metrics not counted), each from the moment "
        "its body is complete; past it, an immediate 503 with Retry-After: 1. Bodies count against "
        "memory_budget_mb as they arrive.",
    )
    request_timeout_s: float = Field(
        30.0,
        ge=0,
        description="Longest a request may take, reading its body included; past it the handler is cancelled "
        "and the client gets 504. 0: no limit.",
    )
    shutdown_grace_s: int = Field(
        30,
        ge=0,
        description="On SIGTERM/SIGINT: stop accepting connections, then wait this long for requests in flight "
        "before cancelling them (503). Keep it above request_timeout_s and below the orchestrator's kill timeout.",
    )
    memory_budget_mb: int = Field(
        256,
        ge=0,
        description="Working memory each worker process may spend on requests at once, in MiB: bodies as they "
        "arrive, each image's decode (its worst case judged from its header), arrays, V2 JSON. A request that "
        "finds no room waits memory_wait_s, then 503 with Retry-After; one that can never fit is a 413. 256 "
        "keeps the default 2 workers within a 1 GiB container. 0: no budget.",
    )
    memory_wait_s: float = Field(
        5.0, ge=0, description="Longest a request waits for room in the memory budget before its 503."
    )
    max_json_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1,
        description="Largest JSON part of a V2 inference request, after gzip/deflate decoding (which stops at it): "
        "a batch of 256 images as JSON numbers needs under 6 MiB. Past it, 413.",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Longest a connection may take to send a request's line and headers (from its first byte, "
        "or from connecting); past it, 408 and the connection is closed.",
    )
    body_idle_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Longest a request's body may pause between bytes; past it, 408. A request takes one of "
        "max_in_flight's slots only once its body is complete, so slow uploads never hold them.",
    )

    @model_validator(mode="before")
    @classmethod
    def _environment(cls, values: Any) -> Any:
        """FASHION_SERVE_<FIELD> variables (any case) fill the fields not given as arguments."""
        if not isinstance(values, dict):
            return values
        return {**environment_values(os.environ, cls), **values}

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, value: object) -> object:
        if isinstance(value, str):
            value = [p for p in value.replace(" ", "").split(",") if p]
        if isinstance(value, list):
            value = [str(p).lower() for p in value]
            if not value:
                raise ValueError("at least one provider")
        return value


def usable_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a container's
    --cpus), which os.cpu_count() does not see."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 file, or an unexpected one: the affinity mask stands
    return max(1, cores)


def worker_count(settings: Settings) -> int:
    return settings.workers or usable_cores()


# ------------------------------------------------------------------------------ the environment


class SettingsError(Exception):
    """The environment's FASHION_SERVE_* variables as a whole are wrong (an unknown name, a *_FILE that
    cannot be read, a value given twice), as opposed to one value being invalid (pydantic's ValidationError).
    Not a ValueError, so that it leaves Settings() as it is rather than as a validation error."""


def variable(name: str) -> str:
    """The environment variable of setting `name`: FASHION_SERVE_<NAME>."""
    return f"{ENV_PREFIX}{name.upper()}"


def environment_values(environ: Mapping[str, str], model: type[Settings] | None = None) -> dict[str, str]:
    """{field: value} from FASHION_SERVE_<NAME> (any case) and FASHION_SERVE_<NAME>_FILE variables; raises
    SettingsError for a name under the prefix that is neither a setting nor in NOT_SETTINGS."""
    fields = {name.upper(): name for name in (model or Settings).model_fields}
    found: dict[str, str] = {}
    given_by: dict[str, str] = {}
    for key, value in environ.items():
        upper = key.upper()
        if not upper.startswith(ENV_PREFIX):
            continue
        name = upper[len(ENV_PREFIX) :]
        if name in fields:
            field = fields[name]
        elif name.endswith(FILE_SUFFIX) and name.removesuffix(FILE_SUFFIX) in fields:
            field = fields[name.removesuffix(FILE_SUFFIX)]
            if not value.strip():
                continue  # FASHION_SERVE_API_KEY_FILE= (empty): not given
            try:
                value = Path(value).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                reason = getattr(exc, "strerror", None) or str(exc)
                raise SettingsError(f"{key}={value}: cannot read the file ({reason})") from None
        elif name in NOT_SETTINGS:
            continue
        else:
            raise SettingsError(unknown_variable_message(key, fields.values()))
        earlier = given_by.get(field)
        if earlier is not None and earlier.endswith(FILE_SUFFIX) != upper.endswith(FILE_SUFFIX):
            if found[field].strip() and value.strip():
                raise SettingsError(f"both {earlier} and {upper} are set: give the setting {field} one way only")
            if not value.strip():
                continue  # an empty variable beside the other form (compose passing an unset name): the other wins
        given_by[field] = upper
        found[field] = value
    return found


def unknown_variable_message(key: str, fields: typing.Iterable[str]) -> str:
    # Compared without the prefix, which every candidate shares and which would make anything look close.
    names = [f.upper() for f in fields]
    candidates = [*names, *(n + FILE_SUFFIX for n in names), *NOT_SETTINGS]
    close = difflib.get_close_matches(key.upper().removeprefix(ENV_PREFIX), candidates, n=1, cutoff=0.6)
    hint = f"did you mean {ENV_PREFIX}{close[0]}? " if close else ""
    return f"unknown setting {key}: {hint}(every setting and its variable: python -m service --help)"


# ----------------------------------------------------------------------- flags and documentation


@dataclass(frozen=True)
class SettingDoc:
    """One setting as its flag, its variable and its row in the README are made from its field."""

    name: str
    flag: str
    variable: str
    default: str
    meaning: str
    choices: tuple[str, ...] | None
    is_bool: bool


def _default_text(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int):
        for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
            if value >= size and value % size == 0:
                return f"{value} ({value // size} {unit})"
        return str(value)
    return str(value)


def setting_docs(model: type[Settings] | None = None) -> list[SettingDoc]:
    """Every field of Settings, in declaration order (fields added later included)."""
    docs = []
    for name, info in (model or Settings).model_fields.items():
        annotation = info.annotation
        choices = typing.get_args(annotation) if typing.get_origin(annotation) is Literal else None
        docs.append(
            SettingDoc(
                name=name,
                flag="--" + name.replace("_", "-"),
                variable=variable(name),
                default=_default_text(info.get_default(call_default_factory=True)),
                meaning=" ".join((info.description or "").split()),
                choices=tuple(map(str, choices)) if choices else None,
                is_bool=annotation is bool,
            )
        )
    return docs


def add_arguments(parser: argparse.ArgumentParser, model: type[Settings] | None = None) -> None:
    """One flag per setting, each with its meaning, default and variable in --help. Values stay strings
    (None when not given), validated by Settings as the environment's are; booleans are --x / --no-x."""
    for doc in setting_docs(model):
        help_text = f"{doc.meaning} (default: {doc.default}; {doc.variable})".replace("%", "%%")
        if doc.is_bool:
            parser.add_argument(
                doc.flag, dest=doc.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            metavar = "{" + ",".join(doc.choices) + "}" if doc.choices else doc.name.upper()
            parser.add_argument(doc.flag, dest=doc.name, metavar=metavar, default=None, help=help_text)


def settings_table(model: type[Settings] | None = None) -> str:
    """The README's settings table, in Markdown."""

    def cell(text: str) -> str:  # Markdown would take <name> for an HTML tag
        return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")

    rows = ["| flag | environment variable | default | meaning |", "|---|---|---|---|"]
    for doc in setting_docs(model):
        rows.append(f"| `{doc.flag}` | `{doc.variable}` | {cell(doc.default)} | {cell(doc.meaning)} |")
    return "\n".join(rows) + "\n"
