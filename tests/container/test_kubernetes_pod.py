"""The image run the way deploy/kubernetes runs it, short of a cluster: `docker run` with each rendered
container's environment, its user (the pod's securityContext), a read-only root file system with only the
pod's emptyDir (a tmpfs on /tmp) writable, no capabilities, no privilege escalation, the API key mounted
read-only where the Secret would be, and the container's port published on loopback. The server must become
ready, answer every probe path on that port, serve an authenticated request, have the preStop command, and
exit 0 on `docker stop` (SIGTERM) within the pod's grace period, all without writing outside /tmp."""

from __future__ import annotations

import io
import json
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.support import container_run, free_port, pod_spec, serving_objects

pytestmark = pytest.mark.slow
READY_TIMEOUT_S = 120
SERVABLE = [(name, obj) for name, obj in serving_objects() if name != "gpu"]  # gpu: needs CUDA


def get(url: str, headers: dict[str, str] | None = None, data: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def key_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "secret"
    folder.mkdir(mode=0o755)
    (folder / "api-key").write_text("pod-test-key")
    (folder / "api-key").chmod(0o444)  # the container's user is not this machine's
    return folder


@pytest.fixture
def pod(request: pytest.FixtureRequest, service_image: str, key_folder: Path) -> Iterator[dict[str, Any]]:
    name, obj = request.param
    (main,) = pod_spec(obj)["containers"]
    security = pod_spec(obj)["securityContext"]
    env = {e["name"]: e["value"] for e in main["env"]}
    port = main["ports"][0]["containerPort"]
    mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    host_port = free_port()
    container = f"fstest-pod-{name}-{uuid.uuid4().hex[:8]}"
    command = [
        "docker", "run", "-d", "--name", container,
        "--read-only", "--tmpfs", f"{mounts['tmp']}:rw,size=64m,mode=1777",
        "--user", f"{security['runAsUser']}:{security['runAsGroup']}",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--cpus", main["resources"]["limits"]["cpu"], "--memory", "512m",
        "-v", f"{key_folder}:{mounts['api-key']}:ro",
        "-p", f"127.0.0.1:{host_port}:{port}",
        *[arg for key, value in env.items() for arg in ("-e", f"{key}={value}")],
        service_image,
    ]  # fmt: skip
    container_run(command, timeout=120, what="docker run")
    try:
        yield {"name": name, "obj": obj, "main": main, "container": container, "url": f"http://127.0.0.1:{host_port}"}
    finally:
        logs = subprocess.run(["docker", "logs", "--tail", "40", container], capture_output=True, text=True, timeout=60)
        print(f"[pod {name}] last logs:\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")
        subprocess.run(["docker", "rm", "-f", container], capture_output=True, timeout=120)


def state(container: str) -> dict[str, Any]:
    out = container_run(["docker", "inspect", "-f", "{{json .State}}", container], timeout=30).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def test_the_image_runs_as_the_user_the_manifests_name(service_image: str) -> None:
    user = container_run(["docker", "image", "inspect", "-f", "{{.Config.User}}", service_image], timeout=30).stdout
    for _, obj in serving_objects():
        security = pod_spec(obj)["securityContext"]
        assert user.strip() == f"{security['runAsUser']}:{security['runAsGroup']}", obj["metadata"]["name"]


@pytest.mark.parametrize("pod", SERVABLE, ids=[f"{n}-{o['kind']}" for n, o in SERVABLE], indirect=True)
def test_the_pod_starts_serves_and_stops_on_a_read_only_root(pod: dict[str, Any]) -> None:
    url, main, container = pod["url"], pod["main"], pod["container"]
    ready = main["readinessProbe"]["httpGet"]["path"]
    deadline = time.monotonic() + READY_TIMEOUT_S
    status = 0
    while time.monotonic() < deadline:
        if not state(container).get("Running"):
            pytest.fail(f"the container stopped: {state(container)}")
        try:
            status, _ = get(url + ready)
        except OSError:
            status = 0  # refused while uvicorn starts
        if status == 200:
            break
        time.sleep(0.5)
    assert status == 200, f"{ready} never answered 200 on the manifest's port"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        path = main[kind]["httpGet"]["path"]
        assert get(url + path)[0] == 200, f"{kind} {path}"
    assert get(url + "/metrics")[0] == 200

    # A real request, with the key from the mounted Secret.
    pixels = np.zeros((28, 28), np.uint8)
    pixels[6:22, 9:19] = 220
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    headers = {"Authorization": "Bearer pod-test-key"}
    if pod["obj"]["kind"] == "InferenceService":
        model = pod["obj"]["metadata"]["name"]
        tensor = {"name": "image", "datatype": "UINT8", "shape": [1, 28, 28], "data": pixels.ravel().tolist()}
        body = {"inputs": [tensor], "outputs": [{"name": "probabilities"}]}
        status, answer = get(
            f"{url}/v2/models/{model}/infer", {**headers, "Content-Type": "application/json"}, json.dumps(body).encode()
        )
        assert status == 200, answer[:300]
        assert json.loads(answer)["model_name"] == model
    else:
        status, answer = get(f"{url}/v1/predict", {**headers, "Content-Type": "image/png"}, buffer.getvalue())
        assert status == 200, answer[:300]
        assert len(json.loads(answer)["probabilities"]) == 10
    assert get(f"{url}/v1/models")[0] == 401

    # The preStop hook's command exists in the image.
    pre_stop = main["lifecycle"]["preStop"]["exec"]["command"]
    container_run(["docker", "exec", container, pre_stop[0], "0"], timeout=30, what="the preStop command")

    # SIGTERM, as the kubelet sends after preStop: a clean exit within the pod's grace period.
    grace = pod_spec(pod["obj"])["terminationGracePeriodSeconds"]
    started = time.monotonic()
    container_run(["docker", "stop", "-t", str(grace), container], timeout=grace + 30, what="docker stop")
    final = state(container)
    assert final["ExitCode"] == 0 and not final["OOMKilled"], final
    assert time.monotonic() - started < grace
    logs = subprocess.run(["docker", "logs", container], capture_output=True, text=True, timeout=60)
    output = logs.stdout + logs.stderr
    assert "Read-only file system" not in output, output[-3000:]
