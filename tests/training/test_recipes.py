"""The named recipes (training/recipes.py) and the recipe options of TrainConfig: each recipe trains on
a small real subset and passes the export's parity gate; shifts and flips are drawn per image; the
weight-decay conversion does what it says; the multiply-add counter counts a known layer right."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from training import architectures, export
from training.__main__ import main, parser, train_settings
from training.data import Dataset, Split, load
from training.recipes import RECIPES
from training.train import TrainConfig, _dataset, card_training_record, keras_weight_decay, save, to_tensor, train


@pytest.fixture(scope="module")
def full_dataset() -> Dataset:
    return load(download=False)


def _small(dataset: Dataset, validation: int = 300) -> Dataset:
    """The real data with a short validation split, so an epoch's validation is quick."""
    v = dataset.validation
    return dataclasses.replace(dataset, validation=Split(v.images[:validation], v.labels[:validation]))


@pytest.mark.parametrize("name", list(RECIPES))
def test_each_recipe_trains_and_exports_with_parity(name: str, full_dataset: Dataset, tmp_path: Path) -> None:
    recipe = RECIPES[name]
    cfg = TrainConfig(**{**recipe.config_kwargs(), "epochs": 1, "train_limit": 500})
    assert cfg.recipe == name and cfg.arch in architectures.ARCHITECTURES
    result = train(_small(full_dataset), cfg, verbose=0)
    assert len(result.history["loss"]) == 1 and result.best_epoch == 1
    exported = export.export(result.model, tmp_path / "model.onnx", to_tensor(full_dataset.test.images[:500]))
    assert exported.parity.max_abs_diff <= 1e-5 and exported.parity.argmax_agreement == 1.0
    save(result, cfg, tmp_path)
    record = json.loads((tmp_path / "training.json").read_text())
    assert record["config"]["recipe"] == name
    assert record["multiply_adds"] == architectures.multiply_adds(result.model) > 0
    entry = card_training_record(record)
    assert entry["recipe"] == name and entry["checkpoint"] == cfg.checkpoint


def test_the_recipes_say_what_the_documents_did() -> None:
    mlp, cnn = RECIPES["udacity-mlp"].settings, RECIPES["udacity-cnn"].settings
    assert (mlp["arch"], mlp["epochs"], mlp["batch_size"], mlp["optimizer"], mlp["learning_rate"]) == (
        "mlp",
        5,
        32,
        "Adam",
        1e-3,
    )
    assert (cnn["arch"], cnn["epochs"], cnn["augment"]) == ("seed-cnn", 10, False)
    for name in ("blog-mlp", "blog-1conv", "blog-2conv", "blog-4conv"):
        s = RECIPES[name].settings
        assert s["validation_size"] == 15_000 and s["early_stopping_patience"] == 5
        assert s["checkpoint"] == "best-val-loss" and s["optimizer"] == "Adam"
    assert architectures.build("blog-2conv").count_params() == 485_514
    blog = architectures.build("blog-4conv")
    assert all(layer.padding == "valid" for layer in blog.layers if isinstance(layer, keras.layers.Conv2D))
    assert architectures.build("double-conv").count_params() == architectures.build("double-conv-same").count_params()


def test_the_blog_split_keeps_15000_images_out(full_dataset: Dataset) -> None:
    blog = load(download=False, validation_size=15_000)
    assert len(blog.train.labels) == 45_000 and len(blog.validation.labels) == 15_000


def _through_pipeline(images: np.ndarray, **options: object) -> np.ndarray:
    cfg = TrainConfig(batch_size=len(images), **options)  # type: ignore[arg-type]
    labels = np.zeros(len(images), np.uint8)
    batch, _ = next(iter(_dataset(images, labels, cfg, training=True)))
    return batch.numpy()


def test_shifts_are_drawn_per_image(full_dataset: Dataset) -> None:
    # 64 copies of one garment, flips off: with one offset per batch (the old random_crop on the 4-D
    # batch) all 64 outputs are equal; per image, they differ.
    keras.utils.set_random_seed(0)
    images = np.repeat(to_tensor(full_dataset.train.images[:1]), 64, axis=0)
    out = _through_pipeline(images, horizontal_flip=False, max_shift_px=2)
    distinct = {o.tobytes() for o in out}
    assert len(distinct) > 5  # 25 possible offsets
    assert all(np.isclose(o.sum(), images[0].sum(), rtol=0.2) for o in out)  # shifted, not otherwise changed


def test_flips_are_drawn_per_image(full_dataset: Dataset) -> None:
    keras.utils.set_random_seed(0)
    image = to_tensor(full_dataset.train.images[:1])
    assert not np.array_equal(image, image[:, :, ::-1])
    out = _through_pipeline(np.repeat(image, 64, axis=0), max_shift_px=0)
    flipped = [np.array_equal(o, image[0, :, ::-1]) for o in out]
    assert all(f or np.array_equal(o, image[0]) for f, o in zip(flipped, out, strict=True))
    assert 0 < sum(flipped) < 64


def test_random_erasing_erases_some_images_and_leaves_the_others(full_dataset: Dataset) -> None:
    keras.utils.set_random_seed(0)
    images = np.repeat(to_tensor(full_dataset.train.images[:1]), 64, axis=0)
    out = _through_pipeline(images, horizontal_flip=False, max_shift_px=0, random_erasing=0.5)
    changed = [not np.array_equal(o, images[0]) for o in out]
    assert 0 < sum(changed) < 64
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_weight_decay_per_step_is_converted_to_keras_coefficient() -> None:
    assert keras_weight_decay(1e-4, 2e-3) == pytest.approx(0.05)
    cfg = TrainConfig(learning_rate=2e-3, weight_decay_per_step=1e-4)
    assert cfg.effective_weight_decay() == pytest.approx(0.05)
    assert TrainConfig(optimizer="Adam").effective_weight_decay() == 0.0
    # One AdamW step with a zero gradient (Adam's update is then 0) leaves only the decay: each weight
    # loses exactly the fraction asked for.
    w = keras.Variable(np.ones((4,), np.float32))
    opt = keras.optimizers.AdamW(learning_rate=2e-3, weight_decay=cfg.effective_weight_decay())
    opt.apply_gradients([(tf.zeros((4,)), w)])
    np.testing.assert_allclose(w.numpy(), 1.0 - 1e-4, rtol=1e-6)


def test_multiply_add_counter_on_known_layers() -> None:
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(8, 3, padding="same")(inputs)  # 28·28·3·3·1·8
    x = keras.layers.Conv2D(4, 3, padding="valid")(x)  # 26·26·3·3·8·4
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)  # 13·13·4 = 676
    outputs = keras.layers.Dense(10)(x)  # 676·10
    model = keras.Model(inputs, outputs)
    assert architectures.multiply_adds(model) == 28 * 28 * 9 * 8 + 26 * 26 * 9 * 8 * 4 + 676 * 10
    assert architectures.multiply_adds(architectures.build("mlp")) == 784 * 128 + 128 * 10


def test_every_option_trains_and_is_recorded(full_dataset: Dataset, tmp_path: Path) -> None:
    cfg = TrainConfig(
        arch="mlp",
        epochs=2,
        batch_size=64,
        train_limit=400,
        weight_decay_per_step=5e-5,
        label_smoothing=0.1,
        ema_momentum=0.9,
        random_erasing=0.25,
        checkpoint="best-val-loss",
        early_stopping_patience=1,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(_small(full_dataset), cfg, verbose=0)
    assert not [w for w in caught if "shuffle" in str(w.message)]  # fit is not told to shuffle a Dataset
    assert 1 <= len(result.history["loss"]) <= 2 and "val_accuracy" in result.history
    # the kept weights are the averaged ones that were validated: evaluating them gives the logged loss
    x_val = to_tensor(full_dataset.validation.images[:300])
    y_val = keras.utils.to_categorical(full_dataset.validation.labels[:300], 10)
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=0.1)(y_val, result.model.predict(x_val, verbose=0))
    assert float(loss) == pytest.approx(result.history["val_loss"][result.best_epoch - 1], rel=1e-3)
    save(result, cfg, tmp_path)
    entry = card_training_record(json.loads((tmp_path / "training.json").read_text()))
    assert entry["label_smoothing"] == 0.1 and entry["checkpoint"] == "best-val-loss"
    assert entry["optimizer"]["weight_decay_per_step_at_peak_lr"] == pytest.approx(5e-5)  # type: ignore[index]
    assert entry["optimizer"]["weight_averaging_ema_momentum"] == 0.9  # type: ignore[index]
    assert entry["augmentation"]["shift"] == "per image" and entry["augmentation"]["random_erasing"] == 0.25  # type: ignore[index]


def test_an_old_training_record_gives_the_old_card_entry() -> None:
    committed = Path(__file__).resolve().parents[2] / "models" / "fashion-mnist-cnn" / "1"
    record = json.loads((committed / "training.json").read_text())
    card = json.loads((committed / "card.json").read_text())
    assert card_training_record(record) == card["training"]


def test_a_recipe_sets_the_config_and_flags_override_it() -> None:
    args = parser().parse_args(["train", "--recipe", "blog-2conv", "--epochs", "3"])
    settings = train_settings(args)
    assert settings["arch"] == "blog-2conv" and settings["epochs"] == 3 and settings["validation_size"] == 15_000
    assert TrainConfig(**settings).recipe == "blog-2conv"  # type: ignore[arg-type]
    default = train_settings(parser().parse_args(["train"]))
    assert TrainConfig(**default) == TrainConfig()  # type: ignore[arg-type]
    with pytest.raises(SystemExit):
        parser().parse_args(["train", "--recipe", "no-such-recipe"])


def test_cli_trains_a_recipe_into_its_own_model_name(tmp_path: Path) -> None:
    argv = ["train", "--recipe", "udacity-mlp", "--epochs", "1", "--train-limit", "300", "--out", str(tmp_path)]
    assert main(argv) == 0
    folder = tmp_path / "udacity-mlp" / "1"
    card = json.loads((folder / "card.json").read_text())
    assert card["training"]["recipe"] == "udacity-mlp" and card["training"]["batch_size"] == 32
    assert card["multiply_adds"] == 784 * 128 + 128 * 10


def test_selection_runs_never_look_at_the_test_set_and_are_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`train --validation-only` writes the run and prints its validation score with its standard error; it
    exports nothing and never reads the test images; `training.selection` logs the run with its options,
    and `export` copies a selection.json in the model folder into the card."""
    from training import data, selection

    real_split = data.load_split

    def no_test(folder: Path, kind: str) -> Split:
        assert kind != "test", "a selection run read the test set"
        return real_split(folder, kind)

    monkeypatch.setattr(data, "load_split", no_test)
    argv = ["train", "--validation-only", "--arch", "mlp", "--epochs", "1", "--train-limit", "300"]
    argv += ["--label-smoothing", "0.1", "--seed", "3", "--out", str(tmp_path), "--name", "run-a"]
    assert main(argv) == 0
    folder = tmp_path / "run-a" / "1"
    assert (folder / "model.keras").is_file() and not (folder / "model.onnx").exists()
    assert "± " in capsys.readouterr().out
    log_path = folder / "selection.json"
    assert selection.main([str(folder), "--mirror", "--out", str(log_path)]) == 0
    (line,) = json.loads(log_path.read_text())
    assert line["run"] == "run-a" and line["seed"] == 3 and line["validation_images"] == 5_000
    assert (
        line["recipe"]["arch"] == "mlp" and line["recipe"]["epochs"] == 1 and line["recipe"]["label_smoothing"] == 0.1
    )
    se = (line["validation_accuracy"] * (1 - line["validation_accuracy"]) / 5_000) ** 0.5
    assert line["validation_standard_error"] == pytest.approx(se, abs=1e-4)
    # The mirrored score: each image's probabilities averaged with its mirror image's.
    validation = load(download=False, with_test=False).validation
    model = keras.models.load_model(folder / "model.keras")
    x = to_tensor(validation.images)
    p = model.predict(x, verbose=0) + model.predict(x[:, :, ::-1], verbose=0)
    assert line["validation_accuracy_mirrored"] == pytest.approx(np.mean(p.argmax(1) == validation.labels), abs=1e-4)
    monkeypatch.setattr(data, "load_split", real_split)  # the export checks the head on test images
    from training.__main__ import cmd_export

    cmd_export(folder, None)
    assert json.loads((folder / "card.json").read_text())["selection"] == [line]
