"""The selection log: how a model was chosen, from its candidates' validation scores only.

    python -m training.selection RUN_DIR... [--mirror] [--out selection.json]

Each RUN_DIR is a version folder written by `train --validation-only` (model.keras and training.json). The
log lists, per run: its name, seed, its training options, the validation accuracy of the
kept weights with its standard error, the epochs and the training time; with --mirror, also the validation
accuracy when each image's prediction is averaged with its horizontal mirror's (what test-time mirroring
inside the graph would buy). The test set is never read here. `export` copies a `selection.json` found in
the model folder into the card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from training.card import standard_error
from training.data import split_seed_of

# The options a log line shows for each run, in full (not as changes from the defaults, which move when a
# selection's winner becomes the default).
RECIPE_OPTIONS = (
    "arch",
    "epochs",
    "batch_size",
    "optimizer",
    "learning_rate",
    "schedule",
    "weight_decay_per_step",
    "ema_momentum",
    "label_smoothing",
    "augment",
    "horizontal_flip",
    "max_shift_px",
    "random_erasing",
    "checkpoint",
)


def recipe(config: dict[str, Any]) -> dict[str, Any]:
    """A run's training options, as its training.json recorded them."""
    return {name: config[name] for name in RECIPE_OPTIONS if name in config}


def entry(folder: Path, validation: Any | None = None) -> dict[str, Any]:
    """One run's line of the log; with `validation` (a data.Split), the mirrored score too (loads TensorFlow)."""
    record = json.loads((folder / "training.json").read_text())
    config = record["config"]
    history = record["history"]
    kept = int(record["best_epoch"])
    accuracy = float(history["val_accuracy"][kept - 1])
    images = int(config["validation_size"])
    line: dict[str, Any] = {
        "run": folder.parent.name if folder.name.isdigit() else folder.name,
        "seed": config["seed"],
        "recipe": recipe(config),
        "validation_accuracy": round(accuracy, 4),
        "validation_standard_error": round(standard_error(accuracy, images), 4),
        "validation_images": images,
        "kept_epoch": kept,
        "epochs_run": len(history["loss"]),
        "training_seconds": record["training_seconds"],
        "parameters": record["parameters"],
        "multiply_adds": record.get("multiply_adds"),
    }
    if validation is not None:
        line["validation_accuracy_mirrored"] = round(mirrored_accuracy(folder, validation), 4)
    return line


def mirrored_accuracy(folder: Path, validation: Any) -> float:
    """Validation accuracy of the mean of the probabilities of each image and of its horizontal mirror."""
    import keras

    from training.train import to_tensor

    model = keras.models.load_model(folder / "model.keras")
    x = to_tensor(validation.images)
    p = model.predict(x, batch_size=1000, verbose=0) + model.predict(x[:, :, ::-1], batch_size=1000, verbose=0)
    return float(np.mean(p.argmax(axis=1) == validation.labels))


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m training.selection", description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR", help="version folders of selection runs")
    parser.add_argument("--mirror", action="store_true", help="also score each run with mirrored predictions")
    parser.add_argument("--out", type=Path, help="write the log here as JSON (default: print a table only)")
    parser.add_argument("--data-dir", type=Path, help="folder with the four Fashion-MNIST IDX gz files")
    args = parser.parse_args(argv)
    validation = None
    if args.mirror:
        from training import data

        configs = {json.dumps(_split_of(run)) for run in args.runs}
        if len(configs) != 1:
            raise SystemExit("error: the runs were validated on different splits; compare them separately")
        size, seed = json.loads(configs.pop())
        validation = data.load(
            args.data_dir, validation_size=size, seed=seed, download=False, with_test=False
        ).validation
    log = [entry(run, validation) for run in args.runs]
    for line in log:
        mirrored = line.get("validation_accuracy_mirrored")
        print(
            f"{line['run']:<22} seed {line['seed']}  {line['validation_accuracy']:.4f} "
            f"± {line['validation_standard_error']:.4f}"
            + (f"  mirrored {mirrored:.4f}" if mirrored is not None else "")
            + f"  {line['training_seconds']:6.0f} s  {line['epochs_run']} epochs"
        )
    if args.out:
        args.out.write_text(json.dumps(log, indent=2) + "\n")
    return 0


def _split_of(run: Path) -> list[int]:
    config = json.loads((run / "training.json").read_text())["config"]
    return [int(config["validation_size"]), split_seed_of(config)]


if __name__ == "__main__":
    raise SystemExit(main())
