"""The real container: image built from the Dockerfile, run by docker-compose, asked over HTTP.

What it proves, end to end:
- `scripts/docker-engine.sh` yields a working engine and a local base image (no registry here);
- `docker-compose up -d --build` builds the image (legacy builder) and starts the service, which
  becomes healthy (Docker's HEALTHCHECK) and answers /readyz with 200;
- real Fashion-MNIST test images, sent as PNG to POST /v1/predict, get the same probabilities
  (to 1e-5) and class as onnxruntime in this process on the committed model;
- the server runs as a non-root user, the image has no TensorFlow, tests, training code or
  compilers, and it stays under 400 MB.
Everything it starts is removed in finalizers, failures included. When Docker cannot run here the
test fails with the reason: it is never skipped.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from tests.support import ROOT, container_run, free_port, model_folder
from tests.support import tail as _tail

COMPOSE_FILE = ROOT / "docker-compose.yml"
MODEL_PATH = model_folder() / "model.onnx"  # the default model's highest version: what the image serves
SERVICE = "fashion-serve"
IMAGE_NAME = "fashion-serve-test"
IMAGE_LIMIT_BYTES = 400 * 10**6  # "MB" as docker reports sizes
N_IMAGES = 40
TOLERANCE = 1e-5

BUILD_UP_TIMEOUT_S = 900  # a cold pip install of the serving dependencies: ~1 min
READY_TIMEOUT_S = 180

pytestmark = pytest.mark.slow


run = container_run  # this file's name for it


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    pytest.fail("neither docker-compose nor the `docker compose` plugin is available after the engine setup")


@dataclass
class Deployment:
    project: str
    image: str
    port: int
    container: str
    compose: list[str]
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def exec(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return run(["docker", "exec", self.container, *args], timeout=60, check=check, what="docker exec")


@pytest.fixture(scope="module")
def deployment(base_image: str) -> Iterator[Deployment]:
    """`docker-compose up -d --build` under a unique project name and host port; `down -v` afterwards."""
    if not MODEL_PATH.is_file():
        pytest.fail(f"the committed model {MODEL_PATH.relative_to(ROOT)} is missing: nothing to bake into the image")
    project = f"fstest{os.getpid()}{uuid.uuid4().hex[:6]}"
    port = free_port()
    image = f"{IMAGE_NAME}:{project}"
    # Only this test's settings: nothing from the caller's FASHION_SERVE_* or COMPOSE_* variables.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASHION_SERVE_", "COMPOSE_"))}
    env |= {
        "BASE_IMAGE": base_image,
        "FASHION_SERVE_IMAGE": IMAGE_NAME,
        "FASHION_SERVE_TAG": project,
        "FASHION_SERVE_HOST_PORT": str(port),
        "FASHION_SERVE_BATCH_MAX_SIZE": "16",  # a setting set in the shell: it must reach the container
        "DOCKER_BUILDKIT": "0",  # the legacy builder is what the engine here has; keep it so everywhere
        "COMPOSE_DOCKER_CLI_BUILD": "0",
    }
    compose = [*compose_command(), "-f", str(COMPOSE_FILE), "--project-directory", str(ROOT), "-p", project]
    try:
        started = time.monotonic()
        run([*compose, "up", "-d", "--build", SERVICE], timeout=BUILD_UP_TIMEOUT_S, env=env, what="docker-compose up")
        print(f"[container] docker-compose up -d --build in {time.monotonic() - started:.1f} s (project {project})")
        container = run([*compose, "ps", "-q", SERVICE], timeout=60, env=env).stdout.strip()
        if not container:
            pytest.fail("docker-compose up reported success but no container is there")
        yield Deployment(project, image, port, container, compose, env)
    finally:
        logs = subprocess.run(
            [*compose, "logs", "--no-color", "--tail", "60"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        print(f"[container] last logs:\n{_tail(logs.stdout, 60)}")
        down = subprocess.run(
            [*compose, "down", "-v", "--remove-orphans", "--timeout", "20"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )
        print(f"[container] docker-compose down -v: exit {down.returncode} {_tail(down.stderr, 5)}")
        # --no-prune: keep the parent layers, the next run's build cache.
        subprocess.run(["docker", "rmi", "--no-prune", image], capture_output=True, timeout=120)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def container_state(container: str) -> dict:
    out = run(["docker", "inspect", "-f", "{{json .State}}", container], timeout=30).stdout
    return json.loads(out)


@pytest.fixture(scope="module")
def ready(deployment: Deployment) -> Deployment:
    """Poll until /readyz answers 200 and Docker reports the container healthy (a fresh container can
    refuse the first connections)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    started = time.monotonic()
    last = "no answer yet"
    ready_at = None
    while time.monotonic() < deadline:
        state = container_state(deployment.container)
        if not state.get("Running"):
            pytest.fail(f"the container stopped: {json.dumps(state)}")
        if ready_at is None:
            try:
                status, body = http_get(f"{deployment.url}/readyz", timeout=3)
                last = f"{status} {body[:200]!r}"
                if status == 200:
                    ready_at = time.monotonic() - started
            except OSError as exc:  # refused / reset while uvicorn starts
                last = repr(exc)
        health = (state.get("Health") or {}).get("Status")
        if ready_at is not None and health == "healthy":
            print(f"[container] /readyz 200 after {ready_at:.1f} s; healthy after {time.monotonic() - started:.1f} s")
            return deployment
        if health == "unhealthy":
            pytest.fail(f"Docker reports the container unhealthy: {json.dumps(state.get('Health'))[-1500:]}")
        time.sleep(1)
    pytest.fail(f"not ready within {READY_TIMEOUT_S} s; last /readyz: {last}; state: {json.dumps(state)[-1500:]}")


def test_image_size_under_limit(deployment: Deployment) -> None:
    size = int(run(["docker", "image", "inspect", "-f", "{{.Size}}", deployment.image], timeout=30).stdout)
    print(f"[container] image {deployment.image}: {size / 1e6:.1f} MB (limit {IMAGE_LIMIT_BYTES / 1e6:.0f} MB)")
    assert size < IMAGE_LIMIT_BYTES, f"image is {size / 1e6:.1f} MB, over {IMAGE_LIMIT_BYTES / 1e6:.0f} MB"


def test_runs_as_non_root(ready: Deployment) -> None:
    uid = ready.exec("id", "-u", check=True).stdout.strip()
    assert uid.isdigit() and int(uid) != 0, f"docker exec runs as uid {uid}"
    # The server itself is PID 1 (exec-form ENTRYPOINT, so SIGTERM reaches it), and not root.
    status = ready.exec("cat", "/proc/1/status", check=True).stdout
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert all(u != "0" for u in uids), f"the server process runs with uids {uids}"
    cmdline = ready.exec("cat", "/proc/1/cmdline", check=True).stdout.split("\0")
    assert cmdline[1:3] == ["-m", "service"], f"PID 1 is {cmdline}"


def test_image_has_no_tensorflow_tests_or_compilers(ready: Deployment) -> None:
    tf = ready.exec("python", "-c", "import tensorflow")
    assert tf.returncode != 0, "tensorflow is importable inside the serving image"
    assert "No module named" in tf.stderr, tf.stderr
    leftovers = ready.exec(
        "sh",
        "-c",
        "ls -d /app/tests /app/training /app/bench /app/.venv /app/.git 2>/dev/null; "
        "command -v gcc cc g++ 2>/dev/null; true",
    ).stdout.split()
    assert leftovers == [], f"found in the image: {leftovers}"
    # The committed model is baked in.
    assert ready.exec("test", "-f", "/models/fashion-mnist-cnn/1/model.onnx").returncode == 0


def test_modules_load_from_compiled_bytecode(ready: Deployment) -> None:
    """Every Python module the server needs has its bytecode in the image: a start never compiles."""
    probe = (
        "import importlib.util, sys, service.app\n"
        "for name, module in list(sys.modules.items()):\n"
        "    origin = getattr(module, '__file__', None) or ''\n"
        "    if origin.endswith('.py'):\n"
        "        cached = importlib.util.cache_from_source(origin)\n"
        "        import os\n"
        "        if not os.path.exists(cached): print(name)\n"
    )
    result = ready.exec("python", "-c", probe, check=True)
    assert result.stdout.split() == [], f"modules without bytecode in the image: {result.stdout.split()}"


def test_predictions_match_in_process_onnxruntime(ready: Deployment) -> None:
    import httpx
    import onnxruntime as ort
    from PIL import Image

    from training.data import load_test

    test = load_test()
    # A spread over the whole test split (not just its first rows), deterministic.
    picks = np.linspace(0, len(test.images) - 1, N_IMAGES).astype(int)
    images = test.images[picks]
    assert images.dtype == np.uint8 and images.shape == (N_IMAGES, 28, 28)

    session = ort.InferenceSession(str(MODEL_PATH), providers=["CPUExecutionProvider"])
    expected = session.run(["probabilities"], {"image": (images.astype(np.float32) / 255.0)[..., None]})[0]

    mismatches = []
    with httpx.Client(base_url=ready.url, timeout=30) as client:
        for i, pixels in enumerate(images):
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            response = client.post(
                "/v1/predict", files={"file": (f"test-{picks[i]}.png", buffer.getvalue(), "image/png")}
            )
            assert response.status_code == 200, f"image {picks[i]}: {response.status_code} {response.text[:300]}"
            body = response.json()
            got = np.asarray(body["probabilities"], dtype=np.float64)
            assert got.shape == expected[i].shape, f"image {picks[i]}: {got.shape} probabilities"
            diff = float(np.max(np.abs(got - expected[i])))
            if diff > TOLERANCE or body["class_id"] != int(np.argmax(expected[i])):
                mismatches.append((int(picks[i]), diff, body["class_id"], int(np.argmax(expected[i]))))
    assert not mismatches, f"(index, max |diff|, served class, local class): {mismatches}"
    accuracy = float(np.mean(np.argmax(expected, axis=1) == test.labels[picks]))
    print(f"[container] {N_IMAGES} images match in-process onnxruntime to {TOLERANCE}; accuracy {accuracy:.2f}")


def test_shell_settings_reach_the_container_which_listens_on_localhost(ready: Deployment) -> None:
    """docker-compose.yml passes every setting set in the shell (or .env) and no other, keeps the image's
    defaults for those not set, and publishes the port on 127.0.0.1 only."""
    assert ready.exec("printenv", "FASHION_SERVE_BATCH_MAX_SIZE", check=True).stdout.strip() == "16"
    assert ready.exec("printenv", "FASHION_SERVE_WORKERS").returncode == 1  # not set in the shell: not set
    assert ready.exec("printenv", "FASHION_SERVE_MODELS", check=True).stdout.strip() == "/models"
    published = run(["docker", "port", ready.container, "8000"], timeout=30).stdout.split()
    assert published == [f"127.0.0.1:{ready.port}"], published


def test_api_key_from_a_docker_secret(ready: Deployment) -> None:
    """docker-compose.secret.yml: the key in secrets/api_key reaches the service as a Docker secret; the API
    needs it, the page and the docs do not. The image built for `ready` is reused (no build)."""
    secret = ROOT / "secrets" / "api_key"
    made = not secret.exists()
    if made:
        secret.parent.mkdir(exist_ok=True)
        secret.write_text("secret-from-a-file\n")
        secret.chmod(0o644)
    key = secret.read_text().strip().split(",")[0]
    project = f"{ready.project}s"
    port = free_port()
    env = ready.env | {"FASHION_SERVE_HOST_PORT": str(port)}
    compose = [*compose_command(), "-f", str(COMPOSE_FILE), "-f", str(ROOT / "docker-compose.secret.yml")]
    compose += ["--project-directory", str(ROOT), "-p", project]
    url = f"http://127.0.0.1:{port}"
    try:
        run([*compose, "up", "-d", "--no-build", SERVICE], timeout=300, env=env, what="docker-compose up (secret)")
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if http_get(url + "/readyz", timeout=3)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        else:
            logs = run([*compose, "logs", "--no-color", "--tail", "30"], timeout=60, env=env, check=False).stdout
            pytest.fail(f"the service with the secret never got ready:\n{_tail(logs)}")
        import urllib.request

        assert http_get(url + "/v1/models")[0] == 401
        assert http_get(url + "/")[0] == 200 and http_get(url + "/docs")[0] == 200
        request = urllib.request.Request(url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
    finally:
        subprocess.run([*compose, "down", "-v", "--timeout", "20"], env=env, cwd=ROOT, capture_output=True, timeout=180)
        if made:
            secret.unlink()
            with contextlib.suppress(OSError):
                secret.parent.rmdir()
