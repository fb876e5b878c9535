"""The committed model: what its card says is what onnxruntime measures on the real test set."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnxruntime as ort

from tests.support import ROOT

FOLDER = ROOT / "models" / "fashion-mnist-cnn" / "1"


def test_card_sha256_matches_the_file() -> None:
    card = json.loads((FOLDER / "card.json").read_text())
    assert hashlib.sha256((FOLDER / "model.onnx").read_bytes()).hexdigest() == card["onnx"]["sha256"]
    assert card["name"] == "fashion-mnist-cnn" and card["version"] == "1"


def test_lean_graph_is_listed_and_equals_the_full_graph_bit_for_bit(test_split) -> None:  # type: ignore[no-untyped-def]
    """model.lean.onnx (what the server runs for predictions: probabilities and the embedding the OOD score
    needs) is the card's, declares only those two, and answers exactly what model.onnx answers on 1,000
    real images."""
    card = json.loads((FOLDER / "card.json").read_text())
    lean_path = FOLDER / card["onnx_lean"]["file"]
    assert lean_path.name == "model.lean.onnx" and card["onnx_lean"]["outputs"] == ["probabilities", "embedding"]
    assert hashlib.sha256(lean_path.read_bytes()).hexdigest() == card["onnx_lean"]["sha256"]
    assert not (FOLDER / "model.probabilities.onnx").exists()  # the earlier probabilities-only graph is gone
    full = ort.InferenceSession(str(FOLDER / "model.onnx"), providers=["CPUExecutionProvider"])
    lean = ort.InferenceSession(str(lean_path), providers=["CPUExecutionProvider"])
    names = ["probabilities", "embedding"]
    assert [o.name for o in lean.get_outputs()] == names
    assert lean.get_inputs()[0].name == card["input"]["name"] == "image"
    x = (test_split.images[:1000].astype(np.float32) / 255.0)[..., None]
    want = full.run(names, {"image": x})
    for got, expected in zip(lean.run(names, {"image": x}), want, strict=True):
        assert np.array_equal(got, expected)
    for got, expected in zip(lean.run(names, {"image": x[:1]}), want, strict=True):
        assert np.array_equal(got, expected[:1])


def test_test_accuracy_is_what_the_card_states_and_at_least_93_percent(test_split) -> None:  # type: ignore[no-untyped-def]
    card = json.loads((FOLDER / "card.json").read_text())
    session = ort.InferenceSession(str(FOLDER / "model.onnx"), providers=["CPUExecutionProvider"])
    x = (test_split.images.astype(np.float32) / 255.0)[..., None]
    probabilities = np.concatenate(
        [session.run(["probabilities"], {"image": x[i : i + 2000]})[0] for i in range(0, 10_000, 2000)]
    )
    accuracy = float(np.mean(probabilities.argmax(1) == test_split.labels))
    print(f"committed model: test accuracy {accuracy:.4f}, card {card['metrics']['test_accuracy']}")
    assert abs(accuracy - card["metrics"]["test_accuracy"]) <= 0.001
    assert accuracy >= 0.93


def test_card_describes_inputs_outputs_training_and_data() -> None:
    card = json.loads((FOLDER / "card.json").read_text())
    session = ort.InferenceSession(str(FOLDER / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o["name"] for o in card["outputs"]] == [o.name for o in session.get_outputs()]
    assert card["input"]["name"] == session.get_inputs()[0].name == "image"
    assert card["input"]["shape"] == [-1, 28, 28, 1] and card["input"]["range"] == [0.0, 1.0]
    assert len(card["classes"]) == 10 and card["parameters"] < 500_000
    assert card["training"]["architecture"] == "bn-cnn" and card["training"]["augmentation"]["enabled"]
    assert card["onnx"]["parity"]["max_abs_diff"] <= 1e-5 and card["onnx"]["parity"]["argmax_agreement"] == 1.0
    assert len(card["data"]["sha256"]) == 4 and card["libraries"]["tf2onnx"]
    for picture in ("confusion_matrix.png", "training_curves.png"):
        assert (FOLDER / picture).stat().st_size > 1000
