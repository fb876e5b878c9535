"""Fixtures of the container tier: a running Docker engine with the local base image (one per session, for
every module here), and the service's image built from the Dockerfile on it. Helpers that are not fixtures
(container_run, engine_answers, tail) are in tests/support.py."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.support import ENGINE_SCRIPT, ROOT, container_run, engine_answers, tail

ENGINE_TIMEOUT_S = 900  # apt + debootstrap on a fresh machine: ~3 min; afterwards ~1 s
BUILD_TIMEOUT_S = 900  # a cold pip install of the serving dependencies: ~1 min; cached layers: seconds


@pytest.fixture(scope="session")
def base_image() -> Iterator[str]:
    """A running engine and the local base image; stops the engine afterwards if this session started it."""
    if not ENGINE_SCRIPT.is_file():
        pytest.fail(f"{ENGINE_SCRIPT} is missing")
    was_running = engine_answers()
    started = time.monotonic()
    proc = container_run(
        ["bash", str(ENGINE_SCRIPT)], timeout=ENGINE_TIMEOUT_S, check=False, what="scripts/docker-engine.sh"
    )
    if proc.returncode != 0:
        pytest.fail(
            "Docker could not be set up on this machine, so the container cannot be tested.\n"
            f"scripts/docker-engine.sh exited {proc.returncode} after {time.monotonic() - started:.0f} s:\n"
            f"{tail(proc.stdout)}\n{tail(proc.stderr)}"
        )
    print(f"\n[container] engine setup in {time.monotonic() - started:.1f} s:\n{proc.stdout.strip()}")
    name = container_run(["bash", str(ENGINE_SCRIPT), "base-image"], timeout=30).stdout.strip()
    try:
        yield name
    finally:
        if not was_running:
            stop = subprocess.run(["bash", str(ENGINE_SCRIPT), "stop"], capture_output=True, text=True, timeout=120)
            print(f"[container] {stop.stdout.strip()} {tail(stop.stderr, 5)}")


@pytest.fixture(scope="session")
def service_image(base_image: str) -> Iterator[str]:
    """The service's image, `docker build` from the Dockerfile on the local base (the legacy builder, as the
    engine here has; layers cached from earlier builds are reused), built once for the whole tier; removed
    afterwards, its layers kept."""
    tag = f"fashion-serve-test:{os.getpid()}{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    container_run(
        ["docker", "build", "--build-arg", f"BASE_IMAGE={base_image}", "-t", tag, str(ROOT)],
        timeout=BUILD_TIMEOUT_S,
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
        what="docker build",
    )
    print(f"[container] docker build {tag} in {time.monotonic() - started:.1f} s")
    try:
        yield tag
    finally:
        subprocess.run(["docker", "rmi", "--no-prune", tag], capture_output=True, timeout=120)
