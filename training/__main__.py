"""python -m training {train, evaluate, export}: one CLI around one model definition."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import numpy as np

from training import ARCHITECTURE_NAMES, DEFAULT_ARCH
from training.data import DataError

if TYPE_CHECKING:  # importing the export module loads TensorFlow: only where it is used
    from training.export import Parity

DEFAULT_MODEL_NAME = "fashion-mnist-cnn"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + traceback
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m training", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train, export to ONNX (parity-checked) and evaluate")
    t.add_argument("--arch", default=DEFAULT_ARCH, choices=ARCHITECTURE_NAMES)
    t.add_argument("--epochs", type=_positive, default=15)
    t.add_argument("--batch-size", type=_positive, default=128)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--learning-rate", type=float, default=2e-3)
    t.add_argument("--no-augment", action="store_true", help="no flips or shifts")
    t.add_argument("--train-limit", type=_positive, help="train on the first N training images only")
    t.add_argument("--out", type=Path, default=Path("models"), help="model repository folder")
    t.add_argument("--name", help=f"model name (default {DEFAULT_MODEL_NAME} for {DEFAULT_ARCH}, else the arch)")
    t.add_argument("--version", default="1")
    t.add_argument("--data-dir", type=Path, help="folder with the four Fashion-MNIST IDX gz files")

    for name, help_text in (
        (
            "export",
            "convert MODEL_DIR/model.keras (no training) to model.onnx, model.probabilities.onnx (only the "
            "probabilities output) and card.json, behind the parity gate; a card already there keeps "
            "its metrics and created date",
        ),
        ("evaluate", "evaluate MODEL_DIR/model.onnx on the test set with onnxruntime"),
    ):
        c = sub.add_parser(name, help=help_text, description=help_text)
        c.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
        c.add_argument("--data-dir", type=Path, help="folder with the four Fashion-MNIST IDX gz files")
    lat = sub.add_parser("latency", help="single-image CPU latency (1 thread) of each MODEL_DIR/model.onnx")
    lat.add_argument("model_dirs", type=Path, nargs="+", metavar="MODEL_DIR")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "train":
            return cmd_train(args)
        if args.command == "latency":
            return cmd_latency(args.model_dirs)
        if not args.model_dir.is_dir():
            raise FileNotFoundError(f"{args.model_dir}: no such model folder")
        if args.command == "export":
            cmd_export(args.model_dir, args.data_dir)
        else:
            cmd_evaluate(args.model_dir, args.data_dir)
        return 0
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def cmd_train(args: argparse.Namespace) -> int:
    from training import data
    from training.train import TrainConfig, save, train

    cfg = TrainConfig(
        arch=args.arch,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        learning_rate=args.learning_rate,
        augment=not args.no_augment,
        train_limit=args.train_limit,
    )
    dataset = data.load(args.data_dir, validation_size=cfg.validation_size, seed=cfg.seed)
    name = args.name or (DEFAULT_MODEL_NAME if cfg.arch == DEFAULT_ARCH else f"fashion-mnist-{cfg.arch}")
    folder = args.out / name / args.version
    n_train = min(len(dataset.train.labels), cfg.train_limit or len(dataset.train.labels))
    print(f"training {cfg.arch} on {n_train} images from {dataset.source} → {folder}")
    result = train(dataset, cfg)
    save(result, cfg, folder)
    cmd_export(folder, args.data_dir, keep_created=False)
    summary = cmd_evaluate(folder, args.data_dir)
    rows = [
        ("architecture", cfg.arch),
        ("parameters", f"{result.model.count_params():,}"),
        ("epochs (best by validation)", f"{cfg.epochs} ({result.best_epoch})"),
        ("training time", f"{result.seconds:.0f} s"),
        ("validation accuracy", f"{max(result.history['val_accuracy']):.4f}"),
        ("test accuracy", f"{summary['test_accuracy']:.4f}"),
        ("test loss", f"{summary['test_loss']:.4f}"),
        ("model", str(folder / "model.onnx")),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0


def cmd_latency(folders: list[Path]) -> int:
    from training.latency import single_image_latency

    rows = []
    for folder in folders:
        if not (folder / "model.onnx").is_file():
            raise FileNotFoundError(f"{folder / 'model.onnx'}: missing")
        rows.append((str(folder), single_image_latency(folder / "model.onnx")))
    reference = rows[0][1]["median_us"]
    width = max(len(name) for name, _ in rows)
    print(f"{'model':<{width}}  median µs  p99 µs  vs first")
    for name, r in rows:
        print(f"{name:<{width}}  {r['median_us']:9.1f}  {r['p99_us']:6.1f}  {r['median_us'] / reference:7.2f}×")
    return 0


def _training_record(folder: Path) -> dict:
    path = folder / "training.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (train the model first)")
    return json.loads(path.read_text())


def cmd_export(folder: Path, data_dir: Path | None, *, keep_created: bool = True) -> None:
    """Export MODEL_DIR/model.keras and write its card. Re-exporting keeps the metrics an earlier
    evaluation wrote into the card and, with `keep_created`, the card's created date: the model is
    the same, only its ONNX files are rewritten."""
    record = _training_record(folder)
    keras_path = folder / "model.keras"
    if not keras_path.is_file():
        raise FileNotFoundError(f"{keras_path}: missing (train the model first)")

    import keras

    from training import card, data, export
    from training.train import to_tensor

    model = keras.models.load_model(keras_path)
    test = data.load_test(data_dir, download=data_dir is None)
    target = folder / "model.onnx"
    exported = export.export(model, target, to_tensor(test.images[: export.PARITY_SAMPLES]))
    parity = exported.parity
    print(
        f"exported {target} and {exported.probabilities_path.name}: parity on {parity.samples} test images, "
        f"max |diff| {parity.max_abs_diff:.2e}; probabilities-only graph identical to the full one"
    )
    cfg = record["config"]
    shapes = {"probabilities": [-1, 10]}
    shapes |= {n: [-1, *model.get_layer(n).output.shape[1:]] for n in export.output_names(model)[1:]}
    old_metrics: dict[str, object] | None = None
    old_created: str | None = None
    if (folder / card.CARD).is_file():
        old_card = card.read(folder)
        old_metrics = old_card.get("metrics")  # type: ignore[assignment]
        old_created = old_card.get("created") if keep_created else None  # type: ignore[assignment]
    card.write(
        folder,
        card.build(
            name=folder.parent.name,
            version=folder.name,
            onnx_path=target,
            probabilities_path=exported.probabilities_path,
            output_shapes=shapes,
            training={
                "architecture": cfg["arch"],
                "epochs": cfg["epochs"],
                "best_epoch": record["best_epoch"],
                "batch_size": cfg["batch_size"],
                "seed": cfg["seed"],
                "optimizer": {
                    "name": cfg["optimizer"],
                    "learning_rate": cfg["learning_rate"],
                    "weight_decay": cfg["weight_decay"],
                    "schedule": f"linear warm-up {cfg['warmup_epochs']} epoch(s), then cosine decay",
                },
                "augmentation": {
                    "enabled": cfg["augment"],
                    "horizontal_flip": cfg["horizontal_flip"],
                    "max_shift_px": cfg["max_shift_px"],
                }
                if cfg["augment"]
                else {"enabled": False},
                "validation": f"{cfg['validation_size']} images carved from the training set (seed {cfg['seed']})",
                "train_images": cfg["train_limit"] or 60_000 - cfg["validation_size"],
                "training_seconds": record["training_seconds"],
            },
            parameters=int(record["parameters"]),
            data_sha256=_data_sha(data_dir),
            parity=_parity_entry(parity),
            # against Keras, like model.onnx's; and its probabilities equal model.onnx's bit for bit
            probabilities_parity=_parity_entry(exported.probabilities_parity) | {"equals_full_graph": True},
            opset=export.OPSET,
            metrics=old_metrics,
            created=old_created,
        ),
    )


def _parity_entry(parity: Parity) -> dict[str, object]:
    return {"samples": parity.samples, "max_abs_diff": parity.max_abs_diff, "argmax_agreement": parity.argmax_agreement}


def _data_sha(data_dir: Path | None) -> dict[str, str]:
    from training import data

    folder = data.find_data_dir(data_dir, download=False)
    return {name: data.sha256_of(folder / name) for name in data.FILES.values()}


def cmd_evaluate(folder: Path, data_dir: Path | None) -> dict[str, object]:
    import onnxruntime as ort

    from training import card, data, report
    from training.train import to_tensor

    onnx_path = folder / "model.onnx"
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path}: missing (export the model first)")
    test = data.load_test(data_dir, download=data_dir is None)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = to_tensor(test.images)
    start = time.perf_counter()
    probs = np.concatenate(
        [session.run(["probabilities"], {"image": x[i : i + 1000]})[0] for i in range(0, len(x), 1000)]
    )
    seconds = time.perf_counter() - start
    result = report.metrics(probs, test.labels)
    history = None
    validation_accuracy = None
    if (folder / "training.json").is_file():
        history = _training_record(folder)["history"]
        validation_accuracy = max(history["val_accuracy"])
    written = report.write(folder, result, history)
    if (folder / card.CARD).is_file():
        model_card = card.read(folder)
        model_card["metrics"] = card.card_metrics(result, validation_accuracy)
        card.write(folder, model_card)
    print(
        f"evaluated {onnx_path} on {len(x)} test images in {seconds:.2f} s: "
        f"accuracy {result['test_accuracy']:.4f}, loss {result['test_loss']:.4f}; wrote {', '.join(written)}"
    )
    return result


if __name__ == "__main__":
    sys.exit(main())
