"""The model wrapper: repository layout, verification, provider selection and fallback."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.errors import ModelLoadError, NotFound
from service.model import Model, graph_with_outputs, locate, resolve_providers, versions
from tests.conftest import make_settings, model_folder

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


@pytest.mark.parametrize(
    ("requested", "available", "chosen", "warned"),
    [
        (["auto"], [CPU], [CPU], False),
        (["auto"], [CUDA, CPU], [CUDA, CPU], False),
        (["auto"], [TRT, CUDA, CPU], [CUDA, CPU], False),
        (["cpu"], [CUDA, CPU], [CPU], False),
        (["cuda", "cpu"], [CUDA, CPU], [CUDA, CPU], False),
        (["cuda", "cpu"], [CPU], [CPU], True),
        (["cuda"], [CPU], [CPU], True),
        (["tensorrt", "cuda", "cpu"], [TRT, CUDA, CPU], [TRT, CUDA, CPU], False),
        (["cuda"], [CUDA, CPU], [CUDA, CPU], False),  # CPU always last, as the safety net
    ],
)
def test_provider_resolution(requested: list[str], available: list[str], chosen: list[str], warned: bool) -> None:
    got, warnings = resolve_providers(requested, available, strict=False)
    assert got == chosen
    assert bool(warnings) == warned
    if warned:
        assert "CUDAExecutionProvider requested but not available" in warnings[0]


def test_strict_providers_refuse_missing_cuda() -> None:
    with pytest.raises(ModelLoadError, match="CUDAExecutionProvider requested but not available"):
        resolve_providers(["cuda", "cpu"], [CPU], strict=True)
    with pytest.raises(ModelLoadError, match="unknown execution provider 'gpu'"):
        resolve_providers(["gpu"], [CPU], strict=False)


def test_cuda_fallback_is_reported_in_readyz_and_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    # As on a CPU-only build of onnxruntime, whatever this machine has.
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    with TestClient(create_app(make_settings(providers=["cuda", "cpu"]))) as c:
        ready = c.get("/readyz").json()
        assert ready["providers"] == [CPU]
        assert any("CUDAExecutionProvider" in w for w in ready["warnings"])
        meta = c.get("/v1/models").json()["models"][0]["providers"]
        assert meta["requested"] == ["cuda", "cpu"] and meta["in_use"] == [CPU] and meta["warnings"]


def test_reports_what_the_session_really_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu can list CUDA yet fail to initialise it and run on CPU: that must be reported."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    real_session = ort.InferenceSession

    def session_without_cuda(data, sess_options=None, providers=None):  # type: ignore[no-untyped-def]
        return real_session(data, sess_options=sess_options, providers=[p for p in providers if p != CUDA])

    monkeypatch.setattr(ort, "InferenceSession", session_without_cuda)
    model = Model(model_folder(), providers=["cuda", "cpu"])
    model.load()
    assert model.providers_in_use == [CPU]
    assert any("could not be initialised" in w for w in model.provider_warnings)
    strict = Model(model_folder(), providers=["cuda", "cpu"], strict_providers=True)
    with pytest.raises(ModelLoadError, match="could not be initialised"):
        strict.load()


def test_threads_and_optimisation_settings_reach_the_session() -> None:
    for level in ("disabled", "basic", "extended", "all"):
        model = Model(model_folder(), providers=["cpu"], intra_op_threads=2, graph_optimization=level)
        model.load()
        assert model.ready
        out = model.run(np.zeros((2, 28, 28, 1), np.float32), ["probabilities"])
        assert out["probabilities"].shape == (2, 10)


def test_run_outputs_and_unknown_output() -> None:
    model = Model(model_folder(), providers=["cpu"])
    model.load()
    result = model.run(np.zeros((3, 28, 28, 1), np.float32))
    assert list(result) == model.output_names
    assert model.feature_layers and all(result[n].ndim == 4 for n in model.feature_layers)
    with pytest.raises(NotFound, match="unknown output 'conv99'"):
        model.run(np.zeros((1, 28, 28, 1), np.float32), ["conv99"])


def test_graph_with_outputs_edits_only_the_output_list() -> None:
    import onnx  # training's dependency, not the service's: the edit itself works on the wire format

    data = (model_folder() / "model.onnx").read_bytes()
    assert graph_with_outputs(data, [o.name for o in onnx.load_from_string(data).graph.output]) == data
    expected = onnx.load_from_string(data)
    kept = [o for o in expected.graph.output if o.name == "probabilities"]
    del expected.graph.output[:]
    expected.graph.output.extend(kept)
    lean = graph_with_outputs(data, ["probabilities"])
    assert lean == expected.SerializeToString()  # byte for byte what onnx itself writes
    onnx.checker.check_model(onnx.load_from_string(lean))
    for cut in (len(data) // 2, len(data) - 1, 3):
        with pytest.raises(ValueError, match="truncated"):
            graph_with_outputs(data[:cut], ["probabilities"])


def test_probabilities_run_on_the_lean_graph_with_identical_results(test_split) -> None:  # type: ignore[no-untyped-def]
    model = Model(model_folder(), providers=["cpu"])
    model.load()
    assert model.lean_session is not None and model.session is not None
    assert [o.name for o in model.lean_session.get_outputs()] == ["probabilities"]
    calls: list[str] = []

    def counted(label: str, run: Any) -> Any:
        def wrapper(*args: Any) -> Any:
            calls.append(label)
            return run(*args)

        return wrapper

    model.session.run = counted("full", model.session.run)  # type: ignore[method-assign]
    model.lean_session.run = counted("lean", model.lean_session.run)  # type: ignore[method-assign]
    x = (test_split.images[:1000].astype(np.float32) / 255.0)[..., None]
    lean = model.run(x, ["probabilities"])["probabilities"]
    both = model.run(x, ["probabilities", "conv1"])
    everything = model.run(x[:8])
    assert calls == ["lean", "full", "full"]
    assert np.array_equal(lean, both["probabilities"])  # the same numbers, bit for bit
    assert np.array_equal(lean[:8], everything["probabilities"])


def test_without_a_lean_graph_every_run_uses_the_full_one(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(data: bytes, keep: object) -> bytes:
        raise ValueError("unsupported protobuf wire type 6")

    monkeypatch.setattr("service.model.graph_with_outputs", broken)
    model = Model(model_folder(), providers=["cpu"])
    model.load()
    assert model.ready and model.lean_session is None
    assert model.run(np.zeros((2, 28, 28, 1), np.float32), ["probabilities"])["probabilities"].shape == (2, 10)


def test_latest_version_is_served_unless_told_otherwise(tmp_path: Path) -> None:
    name = model_folder().parent.name
    for version in ("1", "2", "10"):
        shutil.copytree(model_folder(), tmp_path / name / version)
    (tmp_path / name / "notes").mkdir()  # not a version: no card
    assert versions(tmp_path / name) == ["10", "2", "1"]
    assert locate(tmp_path, None, None) == tmp_path / name / "10"
    assert locate(tmp_path, name, "2") == tmp_path / name / "2"
    shutil.copytree(model_folder(), tmp_path / "other" / "1")
    with pytest.raises(ModelLoadError, match="several models"):
        locate(tmp_path, None, None)
