"""python -m training {train, evaluate, export}: one CLI around one model definition."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import numpy as np

from training import ARCHITECTURE_ALIASES, ARCHITECTURE_NAMES, CHECKPOINTS, DEFAULT_ARCH, SCHEDULES
from training.data import DataError
from training.recipes import RECIPE_NAMES, RECIPES

if TYPE_CHECKING:  # importing the export module loads TensorFlow: only where it is used
    from training.export import Parity

DEFAULT_MODEL_NAME = "fashion-mnist-cnn"
DATA_DIR_HELP = (
    "folder with the four Fashion-MNIST IDX gz files (default: $FASHION_MNIST_DIR, "
    "/usr/share/datasets/fashion-mnist, the Keras cache, else a checked download)"
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + traceback
        self.exit(2, f"{self.prog}: error: {message}\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except None and False: those options say in words what they default to."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m training", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser(
        "train",
        help="train, export to ONNX (parity-checked) and evaluate",
        description="Train, export to ONNX behind the parity gate, and evaluate on the test set. Without "
        "--recipe, the plain bn-cnn recipe (15 epochs: the first default model's, with per-image shifts); "
        "--recipe fashion-mnist-cnn is the current default model's; explicit flags override a recipe's settings.",
        formatter_class=_Help,
    )
    t.add_argument(
        "--recipe",
        choices=RECIPE_NAMES,
        help="a named recipe from training/recipes.py (the seed documents' networks with their own recipes): "
        + "; ".join(f"{r.name}: {r.summary}" for r in RECIPES.values()),
    )
    # None below means "the recipe's value, else TrainConfig's": the help states the default itself.
    t.add_argument(
        "--arch",
        choices=ARCHITECTURE_NAMES + tuple(ARCHITECTURE_ALIASES),
        help=f"network (training/architectures.py; default {DEFAULT_ARCH}, or the recipe's)",
    )
    t.add_argument("--epochs", type=_positive, help="epochs (default 15, or the recipe's)")
    t.add_argument("--batch-size", type=_positive, help="batch size (default 128, or the recipe's)")
    t.add_argument("--seed", type=int, default=0, help="seed of the weights, the shuffling and the augmentation")
    t.add_argument(
        "--split-seed",
        type=int,
        default=0,
        help="seed of the validation split (kept apart from --seed so runs are compared on the same images)",
    )
    t.add_argument("--learning-rate", type=float, help="peak learning rate (default 2e-3, or the recipe's)")
    t.add_argument(
        "--schedule", choices=SCHEDULES, help="learning-rate schedule (default warmup-cosine, or the recipe's)"
    )
    t.add_argument(
        "--weight-decay-per-step",
        type=float,
        help="decoupled weight decay: the fraction of every weight removed per step at the peak learning rate, "
        "e.g. 5e-5 (default: Keras's coefficient 1e-4 × the learning rate, i.e. almost none)",
    )
    t.add_argument(
        "--ema", type=float, metavar="MOMENTUM", help="average the weights (e.g. 0.999); validate and keep the average"
    )
    t.add_argument("--label-smoothing", type=float, help="label smoothing (default 0)")
    t.add_argument(
        "--random-erasing", type=float, metavar="P", help="chance per image of erasing a random rectangle (default 0)"
    )
    t.add_argument("--max-shift", type=int, metavar="PX", help="largest random shift per image in pixels (default 1)")
    t.add_argument(
        "--checkpoint", choices=CHECKPOINTS, help="which epoch's weights are kept (default best-val-accuracy)"
    )
    t.add_argument("--no-augment", action="store_true", help="no flips, shifts or erasing")
    t.add_argument(
        "--validation-only",
        action="store_true",
        help="a selection run: train and save model.keras and training.json, report the validation score, and "
        "neither export nor look at the test set (`export` and `evaluate --write` the chosen run later)",
    )
    t.add_argument(
        "--train-limit",
        type=_positive,
        help="train on the first N training images only (quick runs and tests; validation and test stay whole)",
    )
    t.add_argument("--out", type=Path, default=Path("models"), help="model repository folder")
    t.add_argument(
        "--name",
        help=f"model name (default: the recipe's name; {DEFAULT_MODEL_NAME} for {DEFAULT_ARCH}; "
        "else fashion-mnist-ARCH)",
    )
    t.add_argument(
        "--version", help="version folder to write (default: the next free one, one above the highest number)"
    )
    t.add_argument("--force", action="store_true", help="write into --version even if it exists (a served model)")
    t.add_argument("--data-dir", type=Path, help=DATA_DIR_HELP)

    for name, help_text in (
        (
            "export",
            "convert MODEL_DIR/model.keras (no training) to model.onnx, model.lean.onnx (only the "
            "probabilities and embedding outputs), model.head.npz (Grad-CAM's head), model.ood.npz (the "
            "out-of-distribution Gaussians, fitted on the training split) and card.json, behind the parity "
            "gate; a card already there keeps its metrics and created date",
        ),
        (
            "evaluate",
            "evaluate MODEL_DIR/model.onnx on the test set with onnxruntime and print the result; with --write, "
            "also write evaluation.json, the confusion matrix and the card's metrics into MODEL_DIR",
        ),
    ):
        c = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_Help)
        c.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="a model version folder")
        c.add_argument("--data-dir", type=Path, help=DATA_DIR_HELP)
        if name == "evaluate":
            c.add_argument(
                "--write",
                action="store_true",
                help="write the results into MODEL_DIR (a server polling the repository reloads a version whose "
                "files change)",
            )
    latency_help = (
        "single-image latency of each MODEL_DIR/model.onnx: onnxruntime on the CPU with one thread, batch 1, "
        "2,000 timed runs after 200 warm-up runs; prints the median and p99 in µs, the ratio to the first "
        "model's median, and the multiply-adds per image (from the card, else counted on model.keras)"
    )
    lat = sub.add_parser("latency", help=latency_help, description=latency_help, formatter_class=_Help)
    lat.add_argument("model_dirs", type=Path, nargs="+", metavar="MODEL_DIR", help="model version folders")
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
            cmd_evaluate(args.model_dir, args.data_dir, write=args.write)
        return 0
    except (DataError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def train_settings(args: argparse.Namespace) -> dict[str, object]:
    """TrainConfig's keyword arguments: the recipe's settings (if --recipe), then the flags given."""
    settings: dict[str, object] = dict(RECIPES[args.recipe].config_kwargs()) if args.recipe else {}
    given = {
        "arch": args.arch,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "train_limit": args.train_limit,
        "schedule": args.schedule,
        "weight_decay_per_step": args.weight_decay_per_step,
        "ema_momentum": args.ema,
        "label_smoothing": args.label_smoothing,
        "random_erasing": args.random_erasing,
        "max_shift_px": args.max_shift,
        "checkpoint": args.checkpoint,
    }
    settings |= {k: v for k, v in given.items() if v is not None}
    settings["seed"] = args.seed
    settings["split_seed"] = args.split_seed
    if args.no_augment:
        settings["augment"] = False
    return settings


def cmd_train(args: argparse.Namespace) -> int:
    settings = train_settings(args)
    arch = str(settings.get("arch", DEFAULT_ARCH))
    name = args.name or args.recipe or (DEFAULT_MODEL_NAME if arch == DEFAULT_ARCH else f"fashion-mnist-{arch}")
    # Before anything is imported or trained: a served version is never overwritten unless asked to be.
    folder = args.out / name / choose_version(args.out / name, args.version, force=args.force)

    from training import architectures, data
    from training.train import TrainConfig, save, train

    cfg = TrainConfig(**settings)  # type: ignore[arg-type]
    dataset = data.load(
        args.data_dir, validation_size=cfg.validation_size, seed=cfg.split_seed, with_test=not args.validation_only
    )
    n_train = min(len(dataset.train.labels), cfg.train_limit or len(dataset.train.labels))
    print(f"training {cfg.arch} on {n_train} images from {dataset.source} → {folder}")
    result = train(dataset, cfg)
    save(result, cfg, folder)
    val_accuracy = result.history["val_accuracy"][result.best_epoch - 1]
    if args.validation_only:
        from training.card import standard_error

        n_val = len(dataset.validation.labels)
        print(
            f"{folder}: validation accuracy {val_accuracy:.4f} ± {standard_error(val_accuracy, n_val):.4f} "
            f"(standard error, {n_val} images), "
            f"epoch {result.best_epoch} of {len(result.history['loss'])}, {result.seconds:.0f} s; test set not used"
        )
        return 0
    cmd_export(folder, args.data_dir, keep_created=False)
    summary = cmd_evaluate(folder, args.data_dir, write=True)
    rows = [
        ("architecture", cfg.arch),
        ("parameters", f"{result.model.count_params():,}"),
        ("recipe", cfg.recipe or "default"),
        ("multiply-adds per image", f"{architectures.multiply_adds(result.model):,}"),
        (
            f"epochs run (checkpoint: {cfg.checkpoint})",
            f"{len(result.history['loss'])} of {cfg.epochs} ({result.best_epoch})",
        ),
        ("training time", f"{result.seconds:.0f} s"),
        ("validation accuracy", f"{val_accuracy:.4f}"),
        ("test accuracy", f"{summary['test_accuracy']:.4f}"),
        ("test loss", f"{summary['test_loss']:.4f}"),
        ("model", str(folder / "model.onnx")),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0


def choose_version(model_dir: Path, requested: str | None, *, force: bool = False) -> str:
    """The version folder a training run writes under `model_dir`: `requested`, which must not exist yet
    (unless `force`), else the next free one, one above the highest numeric version folder (1 in a new
    model). Raises FileExistsError naming the way out."""
    existing = [p.name for p in model_dir.iterdir() if p.is_dir()] if model_dir.is_dir() else []
    if requested is None:
        return str(max((int(v) for v in existing if v.isdigit()), default=0) + 1)
    if not requested or requested in (".", "..") or "/" in requested or requested.startswith("."):
        raise ValueError(f"--version {requested!r}: not a version folder name")
    folder = model_dir / requested
    if folder.exists() and any(folder.iterdir()) and not force:
        raise FileExistsError(
            f"{folder} exists (a served model version?): leave out --version to write the next free one, "
            "or add --force to overwrite it"
        )
    return requested


def cmd_latency(folders: list[Path]) -> int:
    from training.latency import single_image_latency

    rows = []
    for folder in folders:
        if not (folder / "model.onnx").is_file():
            raise FileNotFoundError(f"{folder / 'model.onnx'}: missing")
        rows.append((str(folder), single_image_latency(folder / "model.onnx"), _multiply_adds(folder)))
    reference = rows[0][1]["median_us"]
    width = max(len(name) for name, _, _ in rows)
    print(f"{'model':<{width}}  median µs  p99 µs  vs first  multiply-adds per image")
    for name, r, macs in rows:
        print(
            f"{name:<{width}}  {r['median_us']:9.1f}  {r['p99_us']:6.1f}  {r['median_us'] / reference:7.2f}×  "
            + (f"{macs:>23,}" if macs is not None else f"{'unknown':>23}")
        )
    return 0


def _multiply_adds(folder: Path) -> int | None:
    """From the card or training.json; else counted on model.keras; None if there is none."""
    for path in (folder / "card.json", folder / "training.json"):
        if path.is_file() and (macs := json.loads(path.read_text()).get("multiply_adds")) is not None:
            return int(macs)
    if not (folder / "model.keras").is_file():
        return None
    import keras

    from training import architectures

    return architectures.multiply_adds(keras.models.load_model(folder / "model.keras"))


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

    from training import architectures, card, data, export, extras
    from training.train import card_training_record, to_tensor

    model = keras.models.load_model(keras_path)
    # The model's own split: the explanation head is checked on test images, the OOD Gaussians are fitted
    # on its training images and their threshold chosen on its validation images.
    config = record.get("config", {})
    dataset = data.load(
        data_dir,
        validation_size=int(config.get("validation_size", 5_000)),
        seed=data.split_seed_of(config),
        download=data_dir is None,
    )
    test = dataset.test
    target = folder / "model.onnx"
    parity_images = to_tensor(test.images[: export.PARITY_SAMPLES])
    made = extras.Extras(model, dataset, parity_images)
    exported = export.export(model, target, parity_images, made)
    parity = exported.parity
    print(
        f"exported {target} and {exported.lean_path.name} ({', '.join(exported.lean_outputs)}): parity on "
        f"{parity.samples} test images, max |diff| {parity.max_abs_diff:.2e}; the lean graph's outputs identical "
        "to the full one's"
    )
    for note in made.notes:
        print(note)
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
            lean_path=exported.lean_path,
            lean_outputs=exported.lean_outputs,
            output_shapes=shapes,
            training=card_training_record(record),
            parameters=int(record["parameters"]),
            multiply_adds=architectures.multiply_adds(model),
            data_sha256=_data_sha(data_dir),
            parity=_parity_entry(parity),
            # against Keras, like model.onnx's; and its outputs equal model.onnx's bit for bit
            lean_parity=_parity_entry(exported.lean_parity) | {"equals_full_graph": True},
            opset=export.OPSET,
            metrics=old_metrics,
            created=old_created,
            extras=made.entries,
            # How the model was chosen (python -m training.selection --out MODEL_DIR/selection.json), if logged.
            selection=json.loads(selection.read_text()) if (selection := folder / "selection.json").is_file() else None,
        ),
    )
    # The probabilities-only graph of earlier exports: model.lean.onnx answers for it now.
    (folder / "model.probabilities.onnx").unlink(missing_ok=True)


def _parity_entry(parity: Parity) -> dict[str, object]:
    return {"samples": parity.samples, "max_abs_diff": parity.max_abs_diff, "argmax_agreement": parity.argmax_agreement}


def _data_sha(data_dir: Path | None) -> dict[str, str]:
    from training import data

    folder = data.find_data_dir(data_dir, download=False)
    return {name: data.sha256_of(folder / name) for name in data.FILES.values()}


def cmd_evaluate(folder: Path, data_dir: Path | None, *, write: bool = False) -> dict[str, object]:
    """Evaluate on the test set and print the result; with `write`, also write evaluation.json, the plots and
    the card's metrics into `folder` (train does; `evaluate` only with --write)."""
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
    validation_images = None
    if (folder / "training.json").is_file():
        record = _training_record(folder)
        history = record["history"]
        validation_images = int(record.get("config", {}).get("validation_size", 5_000))
        # the checkpoint's (its epoch is recorded), not the best of the noisy per-epoch scores
        best_epoch = int(record.get("best_epoch") or 0)
        validation_accuracy = history["val_accuracy"][best_epoch - 1] if best_epoch else max(history["val_accuracy"])
    written: list[str] = []
    if write:
        written = report.write(folder, result, history)
        if (folder / card.CARD).is_file():
            model_card = card.read(folder)
            model_card["metrics"] = card.card_metrics(result, validation_accuracy, validation_images)
            card.write(folder, model_card)
            written.append(card.CARD)
    print(
        f"evaluated {onnx_path} on {len(x)} test images in {seconds:.2f} s: "
        f"accuracy {result['test_accuracy']:.4f}, loss {result['test_loss']:.4f}; "
        + (f"wrote {', '.join(written)}" if written else "wrote nothing (--write writes the results into the folder)")
    )
    return result


if __name__ == "__main__":
    sys.exit(main())
