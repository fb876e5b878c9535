"""Every setting, each also an environment variable under the one prefix FASHION_SERVE_.

A plain pydantic model that reads its environment variables itself rather than pydantic-settings'
BaseSettings: the same rules for these flat fields (names case-insensitive, arguments over the
environment, values validated by the field's type), for none of that package's import time, which
every server start and every worker paid (~40 ms)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

ENV_PREFIX = "FASHION_SERVE_"
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
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    models: Path = Field(Path("models"), description="Model repository: <name>/<version>/{model.onnx,card.json}.")
    model: str | None = Field(None, description="Model name to serve; default: the only one in the repository.")
    model_version: str | None = Field(None, description="Version to serve; default: the highest.")

    # The environment gives a comma-separated list (see _split_providers).
    providers: list[str] = Field(
        default_factory=lambda: ["auto"],
        description="Execution providers in order of preference: cuda, cpu, tensorrt, or auto "
        "(CUDA when onnxruntime offers it, else CPU). Comma-separated in the environment.",
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
        description="API key, or several comma-separated (rotation). When set, every route except /healthz, "
        "/readyz, /metrics and /v2/health/* (the web page, /docs and /openapi.json included) needs "
        "'Authorization: Bearer <key>' or 'X-API-Key: <key>'; else 401. Unset or blank: no key needed.",
    )
    max_in_flight: int = Field(
        256,
        ge=1,
        description="Requests handled at once per worker (health and metrics not counted); past it, an "
        "immediate 503 with Retry-After: 1. Worst-case body memory is this times max_request_bytes.",
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

    @model_validator(mode="before")
    @classmethod
    def _environment(cls, values: Any) -> Any:
        """FASHION_SERVE_<FIELD> variables (any case) fill the fields not given as arguments."""
        if not isinstance(values, dict):
            return values
        fields = {name.upper(): name for name in cls.model_fields}
        found = {
            fields[key[len(ENV_PREFIX) :]]: value
            for key, value in ((k.upper(), v) for k, v in os.environ.items())
            if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :] in fields
        }
        return {**found, **values}

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
