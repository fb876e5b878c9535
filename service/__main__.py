"""python -m service (or fashion-serve): settings from flags and FASHION_SERVE_* variables, then uvicorn.

Every setting is a flag (made from the Settings fields by service.settings.add_arguments): flags win over
the environment, and are handed to the workers as environment variables."""

from __future__ import annotations

import argparse
import difflib
import errno
import gc
import logging
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError

from service.errors import ModelLoadError
from service.memory import ARENA_MAX, MMAP_THRESHOLD
from service.settings import (
    ENV_PREFIX,
    FILE_SUFFIX,
    LOG_FORMAT,
    NOT_SETTINGS,
    Settings,
    SettingsError,
    add_arguments,
    settings_table,
    variable,
    worker_count,
)

# What each worker process imports and calls to build its app (uvicorn's factory form).
APP_FACTORY = "service.app:app_from_env"


def prog() -> str:
    """The command as it was called: the console script by its name, else `python -m service`."""
    script = Path(sys.argv[0]).name if sys.argv else ""
    return script if script == "fashion-serve" else "python -m service"


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """argparse's error, with the closest real flag for a mistyped one."""
        flags = [option for action in self._actions for option in action.option_strings]
        for word in message.split():
            if word.startswith("--") and word.split("=")[0] not in flags:
                close = difflib.get_close_matches(word.split("=")[0], flags, n=1)
                if close:
                    message += f" (did you mean {close[0]}?)"
                    break
        super().error(message)


def parse_args(argv: list[str] | None) -> dict[str, str]:
    """The settings given as flags, as strings (booleans as true/false); --print-settings-table exits."""
    parser = Parser(
        prog=prog(),
        description="Serve the Fashion-MNIST model over HTTP: REST /v1, the Open Inference Protocol /v2, the "
        "web page at /, and the API documentation at /docs.",
        epilog=f"Every flag is also an environment variable, {ENV_PREFIX}<NAME> (--batch-max-size 16 is "
        f"{ENV_PREFIX}BATCH_MAX_SIZE=16); {ENV_PREFIX}<NAME>{FILE_SUFFIX} reads the value from a file (a Docker "
        f"secret). Flags win over the environment. An unknown {ENV_PREFIX}* variable stops the server, except "
        f"docker-compose's own: {', '.join(ENV_PREFIX + n for n in NOT_SETTINGS)}.",
    )
    add_arguments(parser)
    parser.add_argument(
        "--print-settings-table", action="store_true", help="print every setting as the README's Markdown table"
    )
    namespace = vars(parser.parse_args(argv))
    if namespace.pop("print_settings_table"):
        sys.stdout.write(settings_table())
        raise SystemExit(0)
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in namespace.items() if v is not None}


def use_flags(flags: dict[str, str], environ: dict[str, str] | os._Environ[str] = os.environ) -> None:
    """Flags become the environment variables every uvicorn worker reads its settings from; the same
    setting's variables in other spellings (any case, *_FILE) give way to the flag."""
    for name, value in flags.items():
        wanted = variable(name)
        for key in [k for k in environ if k.upper() in (wanted, wanted + FILE_SUFFIX)]:
            del environ[key]
        environ[wanted] = value


def listen_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port, in words that say which setting to change; None when it
    can. A trial bind before the model is loaded, with the options uvicorn binds with."""
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot listen on {host!r} ({exc.strerror}): choose another address with --host or {variable('host')}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as trial:
        trial.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            trial.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} is in use: choose another with --port or {variable('port')}"
            if exc.errno == errno.EACCES:
                return f"port {port} needs privileges: choose one above 1023 with --port or {variable('port')}"
            return (
                f"cannot listen on {host}:{port} ({exc.strerror}): choose another address with --host or "
                f"{variable('host')}"
            )
    return None


def main(argv: list[str] | None = None) -> int:
    use_flags(parse_args(argv))
    try:
        settings = Settings()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(map(str, first["loc"]))
        where = f" (--{name.replace('_', '-')} or {variable(name)})" if name else ""
        print(f"error: invalid setting {name}{where}: {first['msg']}", file=sys.stderr)
        return 2
    problem = listen_problem(settings.host, settings.port)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1

    from service.api.protocol import serve  # uvicorn.run, with the connection handling of service/api/protocol.py
    from service.repository import Control, Repository

    workers = worker_count(settings)
    if workers == 1:
        from service.app import configure_logging, create_app

        configure_logging(settings)
    else:
        # The supervisor only checks the model and watches the workers: it never imports the web app
        # (FastAPI, the routes: half a second), which each worker builds for itself.
        logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    try:
        if settings.repository_state_dir is not None:
            Control.reset(settings.repository_state_dir)  # what the repository API asked is this run's alone
    except OSError as exc:
        print(f"error: repository_state_dir {settings.repository_state_dir}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        # Fail fast with a one-line reason before serving: scan the repository, verify and load what it serves.
        repository = Repository(settings)
        repository.preload()
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
    # glibc reads these when a process starts (the workers); each process also sets them itself with mallopt
    # (service.memory.tune_allocator): freed memory goes back to the system after a burst.
    os.environ.setdefault("MALLOC_ARENA_MAX", str(ARENA_MAX))
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    # uvicorn re-raises SIGTERM after its graceful shutdown; a handled signal lets it exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    if workers == 1:
        serve(create_app(settings, repository=repository), 1, **common)
    else:  # each worker process builds its own app and sessions from the environment
        del repository  # checked; this process only supervises, and keeps no session of its own
        gc.collect()
        # Workers share their Prometheus metrics through files in one folder,
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="fashion-serve-metrics-"))
        # and what the repository API asks (each worker acts on it) through a file in another.
        if settings.repository_state_dir is None:
            state = Path(tempfile.mkdtemp(prefix="fashion-serve-repository-"))
            Control.reset(state)
            os.environ[variable("repository_state_dir")] = str(state)
        serve(APP_FACTORY, workers, factory=True, **common)
    return 0


if __name__ == "__main__":
    sys.exit(main())
