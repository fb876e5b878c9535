"""Evaluation on the test set: metrics, confusion matrix and pictures, written next to the model.

Works from probabilities, so it evaluates the exported ONNX file itself (what is served)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from training.data import CLASS_NAMES


def metrics(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, object]:
    pred = probabilities.argmax(1)
    n = len(CLASS_NAMES)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (labels.astype(np.int64), pred), 1)
    tp = np.diag(confusion).astype(np.float64)
    precision = np.divide(tp, confusion.sum(0), out=np.zeros(n), where=confusion.sum(0) > 0)
    recall = np.divide(tp, confusion.sum(1), out=np.zeros(n), where=confusion.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n), where=(precision + recall) > 0)
    picked = probabilities[np.arange(len(labels)), labels]
    loss = float(-np.mean(np.log(np.clip(picked, 1e-7, 1.0))))
    return {
        "test_accuracy": round(float(np.mean(pred == labels)), 4),
        "test_loss": round(loss, 4),
        "test_samples": int(len(labels)),
        "macro_f1": round(float(f1.mean()), 4),
        "per_class": {
            name: {"precision": round(float(p), 4), "recall": round(float(r), 4), "f1": round(float(f), 4)}
            for name, p, r, f in zip(CLASS_NAMES, precision, recall, f1, strict=True)
        },
        "confusion_matrix": confusion.tolist(),
    }


def write(folder: Path, result: dict[str, object], history: dict[str, list[float]] | None) -> list[str]:
    """evaluation.json, confusion_matrix.png and (given a history) training_curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evaluation.json").write_text(json.dumps(result, indent=2))
    written = ["evaluation.json", "confusion_matrix.png"]

    confusion = np.array(result["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Test set confusion matrix (accuracy {result['test_accuracy']:.2%})")
    for (i, j), v in np.ndenumerate(confusion):
        ax.text(
            j,
            i,
            str(v),
            ha="center",
            va="center",
            fontsize=7,
            color="white" if v > confusion.max() / 2 else "black",
        )
    fig.tight_layout()
    fig.savefig(folder / "confusion_matrix.png", dpi=100)
    plt.close(fig)

    if history:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        epochs = range(1, len(history["loss"]) + 1)
        left.plot(epochs, history["loss"], label="train")
        left.plot(epochs, history["val_loss"], label="validation")
        left.set_title("loss")
        right.plot(epochs, history["accuracy"], label="train")
        right.plot(epochs, history["val_accuracy"], label="validation")
        right.set_title("accuracy")
        for ax in (left, right):
            ax.set_xlabel("epoch")
            ax.legend()
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / "training_curves.png", dpi=100)
        plt.close(fig)
        written.append("training_curves.png")
    return written
