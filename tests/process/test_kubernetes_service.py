"""The rendered pods' settings, run for real: `python -m service` started with exactly the FASHION_SERVE_*
environment each Deployment / InferenceService gives its container (the API key file included), only the
address moved to a free loopback port and the model repository to this checkout's. Every probe path answers
200 without the API key (the kubelet sends none), the API itself wants the key, and the model KServe clients
name is the one served. The same settings in the image, with a read-only root file system, are in
tests/container/test_kubernetes_pod.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import MODELS, pod_spec, running_server, serving_objects

SERVABLE = [(name, obj) for name, obj in serving_objects() if name != "gpu"]  # gpu: strict CUDA, none here


def container_env(obj: dict[str, Any]) -> dict[str, str]:
    (main,) = pod_spec(obj)["containers"]
    return {e["name"]: e["value"] for e in main["env"]}


@pytest.mark.parametrize(("name", "obj"), SERVABLE, ids=[f"{n}-{o['kind']}" for n, o in SERVABLE])
def test_probes_answer_on_a_server_with_the_manifest_settings(name: str, obj: dict[str, Any], tmp_path: Path) -> None:
    env = container_env(obj)
    (main,) = pod_spec(obj)["containers"]
    key_file = tmp_path / "api-key"
    key_file.write_text("manifest-test-key\n")
    settings = {k.removeprefix("FASHION_SERVE_").lower(): v for k, v in env.items() if k.startswith("FASHION_SERVE_")}
    del settings["host"], settings["port"]  # start_server's free loopback port instead
    settings |= {"models": str(MODELS), "api_key_file": str(key_file)}
    settings.setdefault("model", None)  # the manifest names the model or serves the whole repository
    extra = {k: v for k, v in env.items() if not k.startswith("FASHION_SERVE_")}
    extra["TMPDIR"] = str(tmp_path)
    with running_server(tmp_path / "server", env=extra, **settings) as server:
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            path = main[kind]["httpGet"]["path"]
            response = httpx.get(server.url + path, timeout=5)
            assert response.status_code == 200, f"{kind} {path}: {response.status_code} {response.text[:200]}"
        assert httpx.get(server.url + "/metrics", timeout=5).status_code == 200  # what Prometheus scrapes
        assert httpx.get(server.url + "/v1/models", timeout=5).status_code == 401, "the API key is in force"
        headers = {"Authorization": "Bearer manifest-test-key"}
        if obj["kind"] == "InferenceService":
            model = obj["metadata"]["name"]  # the name KServe clients use
            assert env["FASHION_SERVE_MODEL"] == model
            ready = httpx.get(f"{server.url}/v2/models/{model}/ready", headers=headers, timeout=5)
            assert ready.status_code == 200, ready.text
        else:
            assert httpx.get(server.url + "/v1/models", headers=headers, timeout=5).status_code == 200
