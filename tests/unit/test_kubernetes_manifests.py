"""deploy/kubernetes, short of a cluster: every kustomization rendered with `kubectl kustomize`, every object
checked against the Kubernetes API's own schemas (kubernetes-validate, strict: an unknown field is an error)
for the oldest and newest Kubernetes versions it knows of, and the InferenceService against KServe's own API
types; then what the manifests say about the service read against the service's code (settings, Dockerfile).
What needs a running server or the image is in tests/process/test_kubernetes_service.py and
tests/container/test_kubernetes_pod.py.

KServe's types come from its SDK's generated models (kserve.models.*: for each type, its fields, their JSON
names and types), read from the SDK's wheel as data: the SDK cannot be installed beside this project (its
server dependencies pin protobuf<7 and python-dateutil<3, which would downgrade what TensorFlow here uses),
no PyPI package ships KServe's CRD, and importing the models would import the SDK's model server. make test
downloads the wheel (pip download --no-deps) into the venv. The Kubernetes types KServe's fields refer to
(V1Container, V1ObjectMeta, ...) are checked against the Kubernetes schemas, as above."""

from __future__ import annotations

import ast
import json
import re
import sys
import zipfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from service.settings import FILE_SUFFIX, Settings, environment_values
from tests.support import KUSTOMIZATIONS, ROOT, pod_spec, rendered, serving_objects

KINDS = {
    "base": ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"],
    "gpu": ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"],
    "kserve": ["InferenceService"],
}
KSERVE_SDK = "0.21.0"  # the SDK wheel make test downloads: its models are KServe's v1beta1 API


def test_every_kustomization_is_tested() -> None:
    found = {
        p.parent.relative_to(ROOT / "deploy" / "kubernetes") for p in (ROOT / "deploy").rglob("kustomization.yaml")
    }
    assert found == {p.relative_to(ROOT / "deploy" / "kubernetes") for p in KUSTOMIZATIONS.values()}
    assert set(KINDS) == set(KUSTOMIZATIONS)


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_renders_the_expected_objects(name: str) -> None:
    assert sorted(obj["kind"] for obj in rendered(name)) == KINDS[name]


# ------------------------------------------------------------------------------ Kubernetes' schemas


def kubernetes_versions() -> list[str]:
    import kubernetes_validate.utils as kv

    versions = sorted(
        {".".join(v.split(".")[:2]) for v in kv.all_versions()}, key=lambda v: tuple(map(int, v.split(".")))
    )
    return [versions[0], versions[-1]]


def k8s_validate(obj: dict[str, Any], version: str) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(map(str, exc.path))
        pytest.fail(f"{obj['kind']} {obj['metadata']['name']} against Kubernetes {version}: {where}: {exc.message}")


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_objects_match_the_kubernetes_api_schemas(name: str) -> None:
    checked = 0
    for obj in rendered(name):
        if obj["apiVersion"].startswith("serving.kserve.io/"):
            continue  # a custom resource: below, against KServe's types
        for version in kubernetes_versions():
            k8s_validate(obj, version)
        checked += 1
    assert checked == len(KINDS[name]) - KINDS[name].count("InferenceService")


def test_the_schema_check_is_strict() -> None:
    """A misspelt field, a wrong type: both caught, so a pass above means something."""
    import kubernetes_validate

    deployment = next(o for o in rendered("base") if o["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    for broken in ({**container, "readinessprobe": container["readinessProbe"]}, {**container, "ports": "8000"}):
        wrong = json.loads(json.dumps(deployment))
        wrong["spec"]["template"]["spec"]["containers"][0] = broken
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(wrong, kubernetes_versions()[-1], strict=True)


# ------------------------------------------------------------------------------- KServe's API types


def kserve_wheel() -> Path:
    wheels = sorted(Path(sys.prefix).glob(f"wheels/kserve-{KSERVE_SDK}-*.whl"))
    if not wheels:
        pytest.fail(
            f"KServe's SDK wheel is missing from {Path(sys.prefix) / 'wheels'}: the InferenceService is checked "
            f"against its API models. pip download --no-deps --dest {Path(sys.prefix) / 'wheels'} "
            f"kserve=={KSERVE_SDK} (make test does)"
        )
    return wheels[-1]


@cache
def kserve_models() -> dict[str, tuple[dict[str, str], dict[str, str]]]:
    """{type name: (python attribute -> type, python attribute -> JSON name)} of every generated model,
    read from the wheel's source (literal dicts), never imported."""
    models = {}
    with zipfile.ZipFile(kserve_wheel()) as wheel:
        for member in wheel.namelist():
            if not re.fullmatch(r"kserve/models/v1\w+\.py", member):
                continue
            for node in ast.walk(ast.parse(wheel.read(member))):
                if not isinstance(node, ast.ClassDef):
                    continue
                found = {
                    target.id: ast.literal_eval(statement.value)
                    for statement in node.body
                    if isinstance(statement, ast.Assign)
                    for target in statement.targets
                    if isinstance(target, ast.Name) and target.id in ("openapi_types", "attribute_map")
                }
                if set(found) == {"openapi_types", "attribute_map"}:
                    models[node.name] = (found["openapi_types"], found["attribute_map"])
    assert "V1beta1InferenceService" in models, "no V1beta1InferenceService model in the KServe wheel"
    return models


@cache
def kubernetes_definitions() -> dict[str, Any]:
    import importlib.resources

    version = kubernetes_versions()[-1]
    path = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    data: dict[str, Any] = json.loads((path / f"v{version}.0-local-strict" / "_definitions.json").read_text())
    return data


def kubernetes_definition(type_name: str) -> str:
    """The Kubernetes schema of a type the SDK names as the kubernetes client does: V1Container ->
    io.k8s.api.core.v1.Container, K8sIoApiAppsV1DeploymentStrategy -> io.k8s.api.apps.v1.DeploymentStrategy."""
    defs = kubernetes_definitions()["$defs"]
    if type_name == "ResourceQuantity":
        return "io.k8s.apimachinery.pkg.api.resource.Quantity"
    match = re.fullmatch(r"K8sIoApi([A-Z][a-z]+)(V\d\w*?)([A-Z]\w*)", type_name)
    if match:
        group, version, kind = match.groups()
        wanted = f"io.k8s.api.{group.lower()}.{version.lower()}.{kind}"
        assert wanted in defs, f"no Kubernetes schema for {type_name} ({wanted})"
        return wanted
    match = re.fullmatch(r"(V\d(?:alpha\d|beta\d)?)([A-Z]\w*)", type_name)
    assert match, f"{type_name}: neither a KServe model nor a Kubernetes type"
    version, kind = match.group(1).lower(), match.group(2)
    candidates = [k for k in defs if k.endswith(f".{version}.{kind}")]
    preferred = [k for k in candidates if k.startswith(("io.k8s.api.core.", "io.k8s.apimachinery.pkg.apis.meta."))]
    chosen = preferred or candidates
    assert len(chosen) == 1, f"{type_name}: {len(chosen)} Kubernetes schemas match: {chosen}"
    return chosen[0]


def kserve_problems(value: Any, type_name: str, where: str) -> Iterator[str]:
    """What in `value` does not fit the SDK's type `type_name`: unknown fields (strict), wrong types."""
    if type_name.startswith("list["):
        if not isinstance(value, list):
            yield f"{where}: {type(value).__name__}, not a list"
            return
        for i, item in enumerate(value):
            yield from kserve_problems(item, type_name[5:-1], f"{where}[{i}]")
        return
    if type_name.startswith("dict("):
        inner = type_name[5:-1].split(",", 1)[1].strip()
        if not isinstance(value, dict):
            yield f"{where}: {type(value).__name__}, not a map"
            return
        for key, item in value.items():
            yield from kserve_problems(item, inner, f"{where}.{key}")
        return
    primitives = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}
    if type_name in primitives:
        if not isinstance(value, primitives[type_name]) or (type_name == "int" and isinstance(value, bool)):
            yield f"{where}: {value!r} is not {type_name}"
        return
    models = kserve_models()
    if type_name in models:
        types, names = models[type_name]
        if not isinstance(value, dict):
            yield f"{where}: {type(value).__name__}, not a {type_name} object"
            return
        by_json = {json_name: attribute for attribute, json_name in names.items()}
        for key, item in value.items():
            if key not in by_json:
                yield f"{where}.{key}: no such field in KServe's {type_name}"
            else:
                yield from kserve_problems(item, types[by_json[key]], f"{where}.{key}")
        return
    import jsonschema
    from referencing import Registry, Resource

    definitions = kubernetes_definitions()
    registry = Resource.from_contents(definitions) @ Registry()
    schema = {"$ref": f"{definitions['$id']}#/$defs/{kubernetes_definition(type_name)}"}
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    for error in validator.iter_errors(value):
        yield f"{where}.{'.'.join(map(str, error.path))}: {error.message} (Kubernetes {type_name})"


def test_the_inference_service_matches_kserve_api_types() -> None:
    (isvc,) = rendered("kserve")
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    problems = list(kserve_problems(isvc, "V1beta1InferenceService", "InferenceService"))
    assert not problems, "\n".join(problems)


def test_the_kserve_check_is_strict() -> None:
    (isvc,) = rendered("kserve")
    for path, value in ((("spec", "predictor", "minReplica"), 2), (("spec", "predictor", "maxReplicas"), "ten")):
        wrong = json.loads(json.dumps(isvc))
        wrong["spec"]["predictor"][path[-1]] = value
        assert list(kserve_problems(wrong, "V1beta1InferenceService", "isvc")), f"{path} = {value!r} passed"
    wrong = json.loads(json.dumps(isvc))
    wrong["spec"]["predictor"]["containers"][0]["readinessprobe"] = {}
    assert any("readinessprobe" in p for p in kserve_problems(wrong, "V1beta1InferenceService", "isvc"))


# --------------------------------------------------------------------------------- versus the service


def container(obj: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec(obj)["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(obj: dict[str, Any]) -> dict[str, str]:
    env = container(obj)["env"]
    names = [e["name"] for e in env]
    assert len(names) == len(set(names)), f"an environment variable is given twice: {names}"
    assert all("value" in e for e in env), "every variable has a plain value"
    return {e["name"]: e["value"] for e in env}


IDS = [f"{name}-{obj['kind']}" for name, obj in serving_objects()]


@pytest.mark.parametrize(("name", "obj"), serving_objects(), ids=IDS)
def test_every_setting_variable_is_a_real_setting_with_a_valid_value(name: str, obj: dict[str, Any]) -> None:
    env = {k: v for k, v in env_of(obj).items() if k.startswith("FASHION_SERVE_")}
    assert env, "no settings at all?"
    values = environment_values({k: v for k, v in env.items() if not k.endswith(FILE_SUFFIX)})  # unknown: error
    for key in [k for k in env if k.endswith(FILE_SUFFIX)]:
        setting = key.removeprefix("FASHION_SERVE_").removesuffix(FILE_SUFFIX).lower()
        assert setting in Settings.model_fields, f"{key}: no setting {setting}"
    Settings(**values)  # every value valid for its setting (pydantic raises otherwise)
    assert env["FASHION_SERVE_WORKERS"] == "1", "one worker per pod: scale with replicas"
    assert env["FASHION_SERVE_HOST"] == "0.0.0.0"


@pytest.mark.parametrize(("name", "obj"), serving_objects(), ids=IDS)
def test_ports_probes_and_shutdown_agree_with_the_service(name: str, obj: dict[str, Any]) -> None:
    spec, main = pod_spec(obj), container(obj)
    env = env_of(obj)
    (port,) = main["ports"]
    assert port["containerPort"] == int(env["FASHION_SERVE_PORT"]), "the service listens on FASHION_SERVE_PORT"
    probes = {kind: main[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    for probe in probes.values():
        assert probe["port"] in (port["containerPort"], port.get("name")), probe
    v2 = obj["kind"] == "InferenceService"
    assert probes["readinessProbe"]["path"] == ("/v2/health/ready" if v2 else "/readyz")
    assert probes["startupProbe"]["path"] == probes["readinessProbe"]["path"]
    assert probes["livenessProbe"]["path"] == ("/v2/health/live" if v2 else "/healthz")
    # The kubelet waits for preStop plus the service's shutdown grace before it kills.
    pre_stop = main["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = int(env.get("FASHION_SERVE_SHUTDOWN_GRACE_S", Settings.model_fields["shutdown_grace_s"].default))
    assert spec["terminationGracePeriodSeconds"] > int(pre_stop[1]) + grace
    # No service links: a Service named fashion-serve would inject FASHION_SERVE_PORT=tcp://... and more.
    assert spec["enableServiceLinks"] is False
    if v2:
        assert main["name"] == "kserve-container" and port["containerPort"] == 8080
        assert env["PROTOCOL"] == "v2"


@pytest.mark.parametrize(("name", "obj"), serving_objects(), ids=IDS)
def test_locked_down_with_a_writable_tmp_and_the_api_key_from_a_secret(name: str, obj: dict[str, Any]) -> None:
    spec, main = pod_spec(obj), container(obj)
    pod, box = spec["securityContext"], main["securityContext"]
    assert pod["runAsNonRoot"] is True and box["runAsNonRoot"] is True
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    assert box["readOnlyRootFilesystem"] is True and box["allowPrivilegeEscalation"] is False
    assert box["capabilities"]["drop"] == ["ALL"] and "add" not in box["capabilities"]
    uid = dockerfile_uid()
    assert (pod["runAsUser"], pod["runAsGroup"]) == (uid, uid), "the Dockerfile's USER"
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    env = env_of(obj)
    assert "emptyDir" in volumes[mounts[env["TMPDIR"]]], "TMPDIR is the pod's emptyDir"
    key_file = Path(env["FASHION_SERVE_API_KEY_FILE"])
    secret = volumes[mounts[str(key_file.parent)]]["secret"]
    assert secret["secretName"] == "fashion-serve-api-key" and secret.get("optional") is not True
    assert "FASHION_SERVE_API_KEY" not in env


@pytest.mark.parametrize(("name", "obj"), serving_objects(), ids=IDS)
def test_one_core_per_pod_sized_from_the_benchmark(name: str, obj: dict[str, Any]) -> None:
    resources = container(obj)["resources"]
    assert resources["limits"]["cpu"] == resources["requests"]["cpu"] == "1", "the limit is the core count"
    if name != "gpu":
        assert resources == {"requests": {"cpu": "1", "memory": "192Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}}
        budget = int(env_of(obj)["FASHION_SERVE_MEMORY_BUDGET_MB"])
        assert 130 + budget < 512, "measured RSS (~130 MiB) plus the memory budget fits the limit"
    else:
        assert resources["limits"]["nvidia.com/gpu"] == "1"
        assert env_of(obj)["FASHION_SERVE_PROVIDERS"] == "cuda,cpu"


def test_replicas_spread_disruptions_and_autoscaling_agree() -> None:
    objects = {obj["kind"]: obj for obj in rendered("base")}
    deployment, service = objects["Deployment"], objects["Service"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert service["spec"]["selector"] == selector
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == selector
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["minReplicas"] >= 2 and deployment["spec"]["replicas"] == hpa["minReplicas"]
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} >= {"kubernetes.io/hostname"}
    assert all(c["labelSelector"]["matchLabels"] == selector for c in spread)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    port = deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    assert annotations["prometheus.io/path"] == "/metrics" and annotations["prometheus.io/port"] == str(port)


def dockerfile_uid() -> int:
    text = (ROOT / "Dockerfile").read_text()
    user = re.search(r"^USER\s+(\S+)", text, re.M)
    assert user, "the Dockerfile names no USER"
    arg = re.search(r"^ARG APP_UID=(\d+)", text, re.M)
    value = user.group(1).split(":")[0]
    if value == "${APP_UID}":
        assert arg, "USER ${APP_UID} without ARG APP_UID=<uid>"
        value = arg.group(1)
    assert value.isdigit(), f"USER {value}: Kubernetes' runAsNonRoot needs a numeric uid"
    return int(value)
