"""How the service is installed and started, checked from the files: the compose files pass every setting
and publish on 127.0.0.1, the API key can come from a Docker secret, the serving install is locked with
hashes (make serve and the image), the console commands exist, and `make serve PORT=9000` works."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib

import pytest
import yaml

from service.settings import ENV_PREFIX, NOT_SETTINGS, Settings, environment_values, variable
from tests.support import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SECRET = yaml.safe_load((ROOT / "docker-compose.secret.yml").read_text())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.mark.parametrize("service", ["fashion-serve", "fashion-serve-gpu"])
def test_compose_passes_every_setting(service: str) -> None:
    environment = COMPOSE["services"][service]["environment"]
    missing = [variable(name) for name in Settings.model_fields if variable(name) not in environment]
    assert not missing, f"add to docker-compose.yml's x-settings (a name alone passes it through): {missing}"
    assert environment["FASHION_SERVE_HOST"] == "0.0.0.0" and environment["FASHION_SERVE_PORT"] == "8000"
    # Set in the shell or .env -> passed; unset -> the image's default (a name without a value).
    assert environment["FASHION_SERVE_API_KEY"] is None and environment["FASHION_SERVE_BATCH_MAX_SIZE"] is None


def test_compose_names_only_settings_and_its_own_variables() -> None:
    text = (ROOT / "docker-compose.yml").read_text() + (ROOT / "docker-compose.secret.yml").read_text()
    used = set(re.findall(rf"\b{ENV_PREFIX}[A-Z0-9_]+", text))
    settings = {variable(name) for name in Settings.model_fields}
    own = {ENV_PREFIX + name for name in NOT_SETTINGS}
    assert used - settings - own - {"FASHION_SERVE_API_KEY_FILE"} == set()
    assert own <= used, "service.settings.NOT_SETTINGS names a variable docker-compose.yml no longer uses"


@pytest.mark.parametrize("service", ["fashion-serve", "fashion-serve-gpu"])
def test_compose_publishes_on_localhost_with_the_alternative_beside(service: str) -> None:
    ports = COMPOSE["services"][service]["ports"]
    assert len(ports) == 1 and ports[0].startswith("127.0.0.1:"), ports
    text = (ROOT / "docker-compose.yml").read_text()
    every_interface = ports[0].removeprefix("127.0.0.1:")
    assert f'# - "{every_interface}"' in text  # the line to use instead, commented, right there


def test_api_key_from_a_docker_secret(tmp_path) -> None:  # type: ignore[no-untyped-def]
    service = SECRET["services"]["fashion-serve"]
    assert service["secrets"] == ["fashion_serve_api_key"]
    assert SECRET["secrets"]["fashion_serve_api_key"]["file"] == "./secrets/api_key"
    where = service["environment"]["FASHION_SERVE_API_KEY_FILE"]
    assert where == "/run/secrets/fashion_serve_api_key"
    assert "secrets/" in (ROOT / ".gitignore").read_text().splitlines()
    # What the service makes of it: the file's one line is the key. Compose passes the unset
    # FASHION_SERVE_API_KEY as nothing or as an empty value; neither competes with the file.
    secret = tmp_path / "fashion_serve_api_key"
    secret.write_text("k1,k2\n")
    for plain in ({}, {"FASHION_SERVE_API_KEY": ""}):
        values = environment_values({**plain, "FASHION_SERVE_API_KEY_FILE": str(secret)})
        assert values == {"api_key": "k1,k2"}
        assert Settings(**values).api_key.get_secret_value() == "k1,k2"  # type: ignore[union-attr]


def lock_pins(name: str) -> dict[str, list[str]]:
    """{package: [its pinned lines with their hashes]} of a lock file."""
    pins: dict[str, list[str]] = {}
    current = None
    for line in (ROOT / name).read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line)
        if match:
            current = match.group(1).lower()
            pins.setdefault(current, [])
        elif current and "--hash=sha256:" in line:
            pins[current].append(line.strip())
    return pins


@pytest.mark.parametrize(
    ("lock", "runtime"), [("requirements.lock", "onnxruntime"), ("requirements-gpu.lock", "onnxruntime-gpu")]
)
def test_lock_pins_every_serving_dependency_with_hashes(lock: str, runtime: str) -> None:
    pins = lock_pins(lock)
    for dependency in PYPROJECT["project"]["dependencies"]:
        name = re.split(r"[\s;\[<>=!~,(]", dependency, maxsplit=1)[0].lower()
        name = runtime if name == "onnxruntime" else name
        assert name in pins, f"{lock} lacks {name}: run `make lock`"
    assert all(hashes for hashes in pins.values()), "every pin needs its hashes (--generate-hashes)"
    assert "tensorflow" not in pins and "tensorflow-cpu" not in pins
    assert "make lock" in (ROOT / lock).read_text().splitlines()[1]


def test_make_serve_and_the_image_install_from_the_lock() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install --quiet --require-hashes -r requirements.lock" in makefile
    assert "pip install --quiet --no-deps -e ." in makefile
    assert re.search(r"^lock:.*\n\t.*scripts/lock\.py", makefile, re.M)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY requirements.lock requirements-gpu.lock ./" in dockerfile
    assert 'pip install --no-cache-dir --require-hashes -r "$lock"' in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "!requirements.lock" in ignored and "!requirements-gpu.lock" in ignored


def test_console_commands() -> None:
    scripts = PYPROJECT["project"]["scripts"]
    assert scripts == {
        "fashion-serve": "service.__main__:main",
        "fashion-score": "scoring.__main__:main",
        "fashion-train": "training.__main__:main",
    }
    import importlib

    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")  # make test needs it anyway
def test_make_serve_takes_settings_as_make_variables() -> None:
    def serve_command(*variables: str) -> str:
        # Outside any make that runs this test (`make test`): a sub-make would print "Entering directory".
        environment = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
        dry = subprocess.run(
            ["make", "--no-print-directory", "-n", "serve", *variables, "SERVE_VENV=/nonexistent-venv"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env=environment,
        )
        assert dry.returncode == 0, dry.stderr
        return dry.stdout.strip().splitlines()[-1]

    assert serve_command() == "/nonexistent-venv/bin/fashion-serve"
    command = serve_command("PORT=9000", "BATCH_MAX_SIZE=16", "API_KEY=s3cret")
    assert command.startswith("/nonexistent-venv/bin/fashion-serve ")
    flags = sorted(command.split()[1:])
    assert flags == ["--api-key='s3cret'", "--batch-max-size='16'", "--port='9000'"]
