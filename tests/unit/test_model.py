"""The model wrapper: repository layout, verification, provider selection and fallback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from service.errors import ModelLoadError, NotFound
from service.model import PREFERRED_DEFAULT, Model, locate, resolve_providers, versions
from tests.support import model_folder

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


def test_the_lean_graph_is_verified_like_the_main_one(tmp_path: Path) -> None:
    """The card lists the lean graph with its SHA-256: a file that does not match stops the
    load with a one-line reason, as the main graph's would."""
    folder = tmp_path / "m" / "1"
    shutil.copytree(model_folder(), folder)
    lean = folder / "model.lean.onnx"
    lean.write_bytes(lean.read_bytes()[:-1] + b"\0")
    with pytest.raises(ModelLoadError, match="model.lean.onnx: SHA-256 .* does not match the card"):
        Model(folder, providers=["cpu"]).load()
    lean.unlink()
    with pytest.raises(ModelLoadError, match="model.lean.onnx: cannot read model"):
        Model(folder, providers=["cpu"]).load()


def test_probabilities_run_on_the_lean_graph_with_identical_results(test_split) -> None:  # type: ignore[no-untyped-def]
    model = Model(model_folder(), providers=["cpu"])
    model.load()
    assert model.lean_session is not None and model.session is not None
    assert [o.name for o in model.lean_session.get_outputs()] == ["probabilities", "embedding"]
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
    # What every prediction asks for: the probabilities and the OOD score, from the lean graph's embedding.
    classified = model.run(x[:8], model.classify_outputs)
    assert model.classify_outputs == ["probabilities", "ood_score"] and list(classified) == model.classify_outputs
    assert calls == ["lean", "full", "full", "lean"]
    assert model.ood is not None
    np.testing.assert_array_equal(classified["ood_score"], model.ood.score(everything["embedding"]))
    assert model.run(x[:0], ["ood_score"])["ood_score"].shape == (0,)
    assert np.array_equal(lean, both["probabilities"])  # the same numbers, bit for bit
    assert np.array_equal(lean[:8], everything["probabilities"])


def test_without_a_lean_graph_every_run_uses_the_full_one(tmp_path: Path) -> None:
    """A version whose card lists no lean graph is served from its full graph."""
    folder = tmp_path / "m" / "1"
    shutil.copytree(model_folder(), folder)
    card = json.loads((folder / "card.json").read_text())
    del card["onnx_lean"]
    (folder / "card.json").write_text(json.dumps(card))
    (folder / "model.lean.onnx").unlink()
    model = Model(folder, providers=["cpu"])
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
    # Several models: the preferred default when it is among them, else the caller must choose.
    assert name == PREFERRED_DEFAULT and locate(tmp_path, None, None) == tmp_path / name / "10"
    shutil.move(tmp_path / name, tmp_path / "renamed")
    with pytest.raises(ModelLoadError, match="several models"):
        locate(tmp_path, None, None)
