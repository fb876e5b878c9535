"""Starting `python -m service` the way a new user does: every setting is a flag that reaches the server, and
what stops it at startup says what to change (the port and its setting, the absolute path and --models, the
real name of a mistyped variable), in one line, before any model is loaded."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np

from tests.support import MODELS, ROOT, png_bytes, running_server


def run_service(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("FASHION_SERVE_")}
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, "FASHION_SERVE_WORKERS": "1", **env},
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip()


def test_a_port_in_use_is_named_with_the_setting_to_change() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_service("--models", str(MODELS), "--port", str(port))
        assert result.returncode == 1
        assert one_line(result) == f"error: port {port} is in use: choose another with --port or FASHION_SERVE_PORT"
        by_variable = run_service("--models", str(MODELS), FASHION_SERVE_PORT=str(port))
        assert f"port {port} is in use" in one_line(by_variable)


def test_no_model_names_the_absolute_path_and_the_flag(tmp_path: Path) -> None:
    result = run_service("--port", "0", cwd=tmp_path)  # started from another folder: models/ is not there
    assert result.returncode == 1
    message = one_line(result)
    assert f"no model found in {tmp_path / 'models'} " in message, message
    assert "--models" in message and "FASHION_SERVE_MODELS" in message


def test_a_mistyped_variable_stops_the_server_naming_the_real_one() -> None:
    result = run_service("--models", str(MODELS), "--port", "0", FASHION_SERVE_APIKEY="s3cret")
    assert result.returncode == 2
    assert one_line(result).startswith(
        "error: unknown setting FASHION_SERVE_APIKEY: did you mean FASHION_SERVE_API_KEY?"
    )
    flag = run_service("--models", str(MODELS), "--batch-max-sise", "16")
    assert flag.returncode == 2 and "did you mean --batch-max-size?" in flag.stderr


def test_help_lists_every_setting_with_its_default_and_variable() -> None:
    from service.settings import Settings

    result = run_service("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps lines
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in text and f"FASHION_SERVE_{name.upper()})" in text, name
    assert "(default: 32; FASHION_SERVE_BATCH_MAX_SIZE)" in text
    assert "_FILE reads the value from a file" in text


def test_settings_that_were_not_flags_reach_the_running_server(tmp_path: Path) -> None:
    """--max-batch-images and --max-in-flight (env-only before) change what the server does."""
    image = png_bytes(np.zeros((28, 28), np.uint8))
    with running_server(tmp_path, "--max-batch-images", "2", "--batch-max-size", "16") as server:
        files = [("files", (f"{i}.png", image, "image/png")) for i in range(3)]
        response = httpx.post(server.url + "/v1/predict/batch", files=files, timeout=30)
        assert response.status_code == 413 and "the limit is 2" in response.json()["error"], response.text
        ok = httpx.post(server.url + "/v1/predict/batch", files=files[:2], timeout=30)
        assert ok.status_code == 200, ok.text
