"""python -m service: read settings (flags override FASHION_SERVE_* variables), run uvicorn."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import tempfile
from typing import Any

from pydantic import ValidationError

from service.errors import ModelLoadError
from service.settings import ENV_PREFIX, LOG_FORMAT, Settings, worker_count

# What each worker process imports and calls to build its app (uvicorn's factory form).
APP_FACTORY = "service.app:app_from_env"

FLAGS = {
    "host": "interface to listen on",
    "port": "TCP port",
    "models": "model repository folder",
    "model": "model name to serve",
    "model_version": "model version to serve (default: highest)",
    "providers": "execution providers in order, e.g. cuda,cpu (default: auto)",
    "workers": "uvicorn worker processes (0: one per usable core)",
    "intra_op_threads": "onnxruntime intra-op threads",
    "log_level": "log level",
}


def parse_args(argv: list[str] | None) -> dict[str, str]:
    parser = argparse.ArgumentParser(prog="python -m service", description="Serve the Fashion-MNIST model.")
    for name, help_text in FLAGS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, help=f"{help_text} [{ENV_PREFIX}{name.upper()}]")
    parser.add_argument("--strict-providers", action="store_true", default=None, help="fail if a provider is missing")
    return {k: str(v) for k, v in vars(parser.parse_args(argv)).items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    flags = parse_args(argv)
    # Flags become environment variables so every uvicorn worker builds the same settings.
    for name, value in flags.items():
        os.environ[f"{ENV_PREFIX}{name.upper()}"] = value
    try:
        settings = Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        print(f"error: invalid setting {'.'.join(map(str, first['loc']))}: {first['msg']}", file=sys.stderr)
        return 2

    import uvicorn

    from service.model import build_model

    workers = worker_count(settings)
    if workers == 1:
        from service.app import configure_logging, create_app

        configure_logging(settings)
    else:
        # The supervisor only checks the model and watches the workers: it never imports the web app
        # (FastAPI, the routes: half a second), which each worker builds for itself.
        logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    try:
        # Fail fast with a one-line reason before serving: locate, verify and load once.
        model = build_model(settings)
        model.load()
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "timeout_graceful_shutdown": settings.shutdown_grace_s,
        "access_log": False,  # service.api.middleware writes structured JSON access logs instead
    }
    # uvicorn re-raises SIGTERM after its graceful shutdown; a handled signal lets it exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    if workers == 1:
        uvicorn.run(create_app(settings, model=model), **common)
    else:  # each worker process builds its own app and session from the environment
        del model  # checked; this process only supervises, and keeps no session of its own
        gc.collect()
        # Workers share their Prometheus metrics through files in one folder.
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="fashion-serve-metrics-"))
        uvicorn.run(APP_FACTORY, factory=True, workers=workers, **common)
    return 0


if __name__ == "__main__":
    sys.exit(main())
