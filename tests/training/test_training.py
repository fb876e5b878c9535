"""Every architecture builds, trains an epoch on real data and passes the export's parity gate,
with a lean graph (probabilities and embedding) beside model.onnx; the CLI fails cleanly."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from training import architectures, export
from training.__main__ import main
from training.data import load
from training.train import TrainConfig, save, to_tensor, train

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file is in tests/training/)


@pytest.fixture(scope="module")
def small_dataset():  # type: ignore[no-untyped-def]
    return load(download=False)


@pytest.mark.parametrize("arch", list(architectures.ARCHITECTURES))
def test_architecture_trains_and_exports_with_parity(arch: str, small_dataset, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = TrainConfig(arch=arch, epochs=1, batch_size=64, train_limit=1024)
    result = train(small_dataset, cfg, verbose=0)
    assert result.history["loss"][0] > 0 and len(result.history["val_accuracy"]) == 1
    model = result.model
    layers = architectures.feature_layers(model)
    if arch != "mlp":
        assert layers and all(model.get_layer(n).output.shape[-1] > 1 for n in layers)
    assert model.get_layer("embedding").output.shape[-1] == 128
    if arch == architectures.DEFAULT_ARCH:
        assert model.count_params() < 500_000

    target = tmp_path / "model.onnx"
    exported = export.export(model, target, to_tensor(small_dataset.test.images[:1000]))
    parity = exported.parity
    assert parity.samples == 1000 and parity.max_abs_diff <= 1e-5 and parity.argmax_agreement == 1.0
    assert exported.lean_parity == parity  # the lean graph's probabilities are the full graph's

    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert session.get_inputs()[0].shape == ["N", 28, 28, 1]
    assert [o.name for o in session.get_outputs()] == ["probabilities", *layers, "embedding"]
    out = session.run(None, {"image": to_tensor(small_dataset.test.images[:5])})
    assert out[0].shape == (5, 10)
    np.testing.assert_allclose(out[0].sum(1), 1.0, atol=1e-5)
    _check_lean_graph(tmp_path, to_tensor(small_dataset.test.images[:300]))
    save(result, cfg, tmp_path)
    assert json.loads((tmp_path / "training.json").read_text())["config"]["arch"] == arch


def _check_lean_graph(folder: Path, images: np.ndarray) -> None:
    """model.lean.onnx beside model.onnx: same input, `probabilities` and `embedding` its only outputs, and
    both equal model.onnx's bit for bit (one batch and one image at a time)."""
    assert export.LEAN_FILE == "model.lean.onnx"
    lean_path = folder / export.LEAN_FILE
    onnx.checker.check_model(onnx.load(lean_path))
    full = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    lean = ort.InferenceSession(str(lean_path), providers=["CPUExecutionProvider"])
    names = ["probabilities", "embedding"]
    assert [o.name for o in lean.get_outputs()] == names
    assert [(i.name, i.shape) for i in lean.get_inputs()] == [("image", ["N", 28, 28, 1])]
    for batch in (images, images[:1]):
        for got, want in zip(lean.run(None, {"image": batch}), full.run(names, {"image": batch}), strict=True):
            assert np.array_equal(got, want)


def test_parity_gate_fails_and_writes_nothing(small_dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    model = architectures.build("mlp")
    real_to_onnx = export.to_onnx

    def perturbed(m):  # type: ignore[no-untyped-def]
        # The ONNX graph of a *different* (freshly initialised) model: parity must fail.
        return real_to_onnx(architectures.build("mlp"))

    monkeypatch.setattr(export, "to_onnx", perturbed)
    target = tmp_path / "model.onnx"
    with pytest.raises(export.ParityError, match="ONNX differs from Keras"):
        export.export(model, target, to_tensor(small_dataset.test.images[:200]))
    assert list(tmp_path.iterdir()) == []


def test_lean_graph_must_equal_the_full_one_or_nothing_is_written(  # type: ignore[no-untyped-def]
    small_dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = architectures.build("mlp")
    real = export.lean_graph

    def other_weights(proto):  # type: ignore[no-untyped-def]
        # A lean graph that is not the full graph's: the same network with one weight matrix 1 % larger.
        lean = real(proto)
        weights = next(i for i in lean.graph.initializer if len(i.dims) == 2)
        scaled = onnx.numpy_helper.to_array(weights) * np.float32(1.01)
        weights.CopyFrom(onnx.numpy_helper.from_array(scaled, weights.name))
        return lean

    monkeypatch.setattr(export, "lean_graph", other_weights)
    with pytest.raises(export.ParityError, match="differs from the full graph's"):
        export.export(model, tmp_path / "model.onnx", to_tensor(small_dataset.test.images[:200]))
    assert list(tmp_path.iterdir()) == []


def test_lean_graph_keeps_just_the_probabilities_and_embedding_outputs() -> None:
    proto = export.to_onnx(architectures.build("seed-cnn"))
    lean = export.lean_graph(proto)
    # the original is untouched
    assert [o.name for o in proto.graph.output] == ["probabilities", "conv1", "conv2", "embedding"]
    assert [o.name for o in lean.graph.output] == ["probabilities", "embedding"]
    assert lean.graph.input == proto.graph.input and lean.graph.initializer == proto.graph.initializer
    del proto.graph.output[0]
    with pytest.raises(ValueError, match="no 'probabilities' output"):
        export.lean_graph(proto)


def test_cli_train_export_evaluate_end_to_end(tmp_path: Path) -> None:
    code = main(
        [
            "train",
            "--arch",
            "mlp",
            "--epochs",
            "1",
            "--train-limit",
            "2000",
            "--out",
            str(tmp_path),
            "--version",
            "7",
        ]
    )
    assert code == 0
    folder = tmp_path / "fashion-mnist-mlp" / "7"
    card = json.loads((folder / "card.json").read_text())
    assert card["name"] == "fashion-mnist-mlp" and card["version"] == "7"
    assert card["metrics"]["test_accuracy"] > 0.3  # one short epoch: well above chance (0.1), not trained out
    assert card["training"]["architecture"] == "mlp" and card["training"]["epochs"] == 1
    assert {o["name"] for o in card["outputs"]} == {"probabilities", "embedding"}
    for name in ("model.onnx", "evaluation.json", "confusion_matrix.png", "training_curves.png"):
        assert (folder / name).is_file()
    _check_card_lists_both_graphs(folder, card)
    _check_lean_graph(folder, to_tensor(load(download=False).test.images[:300]))
    # export and evaluate also work as separate steps; re-exporting keeps the card's date and metrics
    assert main(["export", str(folder)]) == 0
    again = json.loads((folder / "card.json").read_text())
    assert again["created"] == card["created"] and again["metrics"] == card["metrics"]
    _check_card_lists_both_graphs(folder, again)
    assert main(["evaluate", str(folder)]) == 0


def _check_card_lists_both_graphs(folder: Path, card: dict) -> None:  # type: ignore[type-arg]
    def sha256(name: str) -> str:
        return hashlib.sha256((folder / name).read_bytes()).hexdigest()

    assert card["onnx"]["file"] == "model.onnx" and card["onnx"]["sha256"] == sha256("model.onnx")
    lean = card["onnx_lean"]
    assert lean["file"] == "model.lean.onnx" and lean["sha256"] == sha256(lean["file"])
    assert lean["outputs"] == ["probabilities", "embedding"]
    # The out-of-distribution parameters, fitted on the training split; an MLP has no conv layer to explain.
    assert card["ood"]["file"] == "model.ood.npz" and card["ood"]["sha256"] == sha256("model.ood.npz")
    assert card["ood"]["train_images"] == 55_000 and card["ood"]["validation_images"] == 5_000
    assert "explain" not in card
    assert lean["parity"]["equals_full_graph"] is True
    assert lean["parity"]["max_abs_diff"] == card["onnx"]["parity"]["max_abs_diff"] <= 1e-5


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "training", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--arch", "resnet9000"], "invalid choice: 'resnet9000'"),
        (["train", "--epochs", "0"], "must be ≥ 1"),
        (["train", "--epochs", "many"], "invalid _positive value"),
        (["train", "--data-dir", "/nonexistent"], "/nonexistent: missing"),
        (["evaluate", "/nonexistent/model"], "no such model folder"),
        (["export", "/tmp"], "training.json: missing"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_cli_errors_are_one_line_and_nonzero(args: list[str], message: str) -> None:
    result = _cli(*args)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip() and "tensorflow" not in line.lower()]
    assert any(message in line for line in lines), result.stderr
    assert "Traceback" not in result.stderr


def test_cli_latency_reports_each_model(tmp_path: Path) -> None:
    from training.latency import single_image_latency

    model = architectures.build("mlp")
    images = to_tensor(load(download=False).test.images[:100])
    export.export(model, tmp_path / "a" / "model.onnx", images)
    result = single_image_latency(tmp_path / "a" / "model.onnx", runs=50, warmup=5)
    assert 0 < result["median_us"] <= result["p99_us"]
    assert main(["latency", str(tmp_path / "a"), str(tmp_path / "a")]) == 0
    assert main(["latency", str(tmp_path / "missing")]) == 1


# ---- training never clobbers a served model ---------------------------------------------------------


def test_training_writes_the_next_free_version_unless_told_which(tmp_path: Path) -> None:
    from training.__main__ import choose_version

    model = tmp_path / "fashion-mnist-cnn"
    assert choose_version(model, None) == "1"  # a new model
    for version in ("1", "2", "10", "notes"):
        (model / version).mkdir(parents=True)
    (model / "10" / "card.json").write_text("{}")
    assert choose_version(model, None) == "11"  # one above the highest number, whatever the folders hold
    assert choose_version(model, "12") == "12"
    assert choose_version(model, "2") == "2"  # an empty folder: nothing to overwrite
    with pytest.raises(FileExistsError, match=r"10 exists .*--force"):
        choose_version(model, "10")
    assert choose_version(model, "10", force=True) == "10"
    for bad in ("../elsewhere", "..", "", ".hidden"):
        with pytest.raises(ValueError, match="not a version folder name"):
            choose_version(model, bad)


def test_train_refuses_an_existing_version_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    served = tmp_path / "fashion-mnist-mlp" / "1"
    served.mkdir(parents=True)
    (served / "card.json").write_text("{}")
    code = main(["train", "--arch", "mlp", "--epochs", "1", "--out", str(tmp_path), "--version", "1"])
    assert code == 1
    assert "exists" in capsys.readouterr().err
    assert [p.name for p in served.iterdir()] == ["card.json"]  # untouched, and nothing trained


def test_evaluate_writes_into_the_model_folder_only_when_asked(tmp_path: Path) -> None:
    from service.repository import fingerprint

    folder = tmp_path / "fashion-mnist-cnn" / "1"
    shutil.copytree(ROOT / "models" / "fashion-mnist-cnn" / "1", folder)
    before = fingerprint(folder)
    assert main(["evaluate", str(folder)]) == 0
    assert fingerprint(folder) == before  # a server polling the repository sees nothing to reload
    card = json.loads((folder / "card.json").read_text())
    assert main(["evaluate", str(folder), "--write"]) == 0
    assert fingerprint(folder) != before
    assert (
        json.loads((folder / "card.json").read_text())["metrics"]["test_accuracy"] == card["metrics"]["test_accuracy"]
    )
