"""examples/ holds what examples/make_examples.py makes from the real test set, and the committed model
classifies each example as the class it shows (the README's sample outputs depend on it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from tests.support import ROOT

EXAMPLES = ROOT / "examples"


def make_examples() -> object:
    spec = importlib.util.spec_from_file_location("make_examples", EXAMPLES / "make_examples.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_examples_are_what_the_script_makes(tmp_path: Path, test_split) -> None:  # type: ignore[no-untyped-def]
    script = make_examples()
    written = script.make(tmp_path)  # type: ignore[attr-defined]
    assert sorted(p.name for p in written) == sorted(p.name for p in EXAMPLES.iterdir() if p.suffix != ".py")
    for made in written:
        committed = EXAMPLES / made.name
        if made.suffix == ".npy":
            np.testing.assert_array_equal(np.load(made), np.load(committed))
        else:
            a, b = (np.asarray(Image.open(p), np.int16) for p in (made, committed))
            assert a.shape == b.shape and np.abs(a - b).max() <= (2 if made.suffix == ".jpg" else 0), made.name
        assert committed.stat().st_size < 64 * 1024, f"{committed.name}: examples stay small"
    for name, index in script.IMAGES.items():  # type: ignore[attr-defined]
        np.testing.assert_array_equal(np.asarray(Image.open(EXAMPLES / f"{name}.png")), test_split.images[index])
    np.testing.assert_array_equal(np.load(EXAMPLES / "labels.npy"), test_split.labels[:16])


def test_the_model_recognises_every_example(reference_session) -> None:  # type: ignore[no-untyped-def]
    from service import imaging
    from service.model import Card
    from tests.support import model_folder

    classes = Card.read(model_folder()).classes
    expected = {
        "ankle-boot.png": "Ankle boot",
        "pullover.png": "Pullover",
        "trouser.png": "Trouser",
        "shirt.png": "Shirt",
        "sneaker.png": "Sneaker",
        "bag.png": "Bag",
        "photo-ankle-boot.jpg": "Ankle boot",
        "photo-trouser.png": "Trouser",
    }
    for name, label in expected.items():
        tensor = imaging.preprocess((EXAMPLES / name).read_bytes())
        probabilities = reference_session.run(["probabilities"], {"image": tensor[None]})[0][0]
        assert classes[int(probabilities.argmax())] == label, name
