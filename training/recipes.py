"""Named training recipes: the seed documents' networks, trained the way the documents trained them.

`python -m training train --recipe NAME` starts from the recipe's settings (architecture, epochs, batch
size, optimiser, learning rate, split, augmentation, checkpoint and early stopping); explicit flags
still override them. Free of TensorFlow, like `training/__init__.py`, so the CLI can list them fast.

The documents' figures are what the documents report, on the 10,000 test images; ours are in the
README. Where we differ from a document, the recipe says how.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    document_figure: str  # what the document reports
    settings: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields

    def config_kwargs(self) -> dict[str, Any]:
        return {**self.settings, "recipe": self.name}


_UDACITY = {
    # Adam at Keras's default rate, batch 32, images in [0, 1], no augmentation, shuffled every epoch.
    # The course trained on all 60,000 training images; we keep our 5,000 validation images out (it only
    # watches them) and keep the last epoch's weights, as the course did.
    "optimizer": "Adam",
    "learning_rate": 1e-3,
    "schedule": "constant",
    "batch_size": 32,
    "augment": False,
    "checkpoint": "last",
    "validation_size": 5_000,
}

# The Polish blog: 45,000 images to train on, 15,000 held out for early stopping on validation loss
# (patience 5, best weights restored), Adam, no augmentation. Its code had two faults, fixed here: the
# held-out images were never divided by 255 (so early stopping watched images 255× too bright), and its
# loss said `from_logits=True` on a softmax output (a softmax of a softmax: weak gradients). Its batch
# size is not recorded here: Keras's default, 32. The epoch cap is ours (the blog ran until early stopping).
_BLOG = {
    "optimizer": "Adam",
    "learning_rate": 1e-3,
    "schedule": "constant",
    "batch_size": 32,
    "augment": False,
    "validation_size": 15_000,
    "checkpoint": "best-val-loss",
    "early_stopping_patience": 5,
    "epochs": 50,
}

# The documents used none of these; pinned so that a change of TrainConfig's defaults (the default model's
# recipe) never reaches the seed recipes.
_NONE_OF_OURS = {"label_smoothing": 0.0, "ema_momentum": None, "random_erasing": 0.0, "weight_decay_per_step": None}
_UDACITY |= _NONE_OF_OURS
_BLOG |= _NONE_OF_OURS

# The default model's recipe (models/fashion-mnist-cnn/2), chosen on validation (its card's selection log):
# bn-cnn for 30 epochs with decoupled weight decay, weight averaging, label smoothing and random erasing.
_DEFAULT_MODEL = {
    "arch": "bn-cnn",
    "epochs": 30,
    "weight_decay_per_step": 5e-5,
    "ema_momentum": 0.999,
    "label_smoothing": 0.1,
    "random_erasing": 0.25,
}

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "fashion-mnist-cnn",
            "this project's default model (version 2): bn-cnn, 30 epochs, AdamW 2e-3 warm-up + cosine, decoupled "
            "weight decay 5e-5 per step, weight averaging 0.999, label smoothing 0.1, flips, 1-px shifts, "
            "random erasing 0.25",
            "not a document's network: see the README's Results",
            _DEFAULT_MODEL,
        ),
        Recipe(
            "udacity-mlp",
            "Udacity (Intro to TensorFlow): Flatten → Dense 128 ReLU → Dense 10 softmax; Adam 1e-3, batch 32, 5 epochs",
            "87.82% test",
            {"arch": "mlp", "epochs": 5, **_UDACITY},
        ),
        Recipe(
            "udacity-cnn",
            "Udacity: conv 32 3×3 same → pool → conv 64 3×3 same → pool → Dense 128 → Dense 10; same recipe, 10 epochs",
            "91% test (97% training)",
            {"arch": "seed-cnn", "epochs": 10, **_UDACITY},
        ),
        Recipe(
            "blog-mlp",
            "Polish blog: its MLP (taken as Flatten → Dense 128 ReLU → Dense 10), 45k/15k split, early "
            "stopping (patience 5 on validation loss); faults fixed (see module)",
            "error almost 13% (accuracy about 87%)",
            {"arch": "mlp", **_BLOG},
        ),
        Recipe(
            "blog-1conv",
            "Polish blog: conv 64 valid → pool → dropout 0.25 → Dense 128 → Dense 10; 45k/15k, early "
            "stopping; faults fixed",
            "error below 10%",
            {"arch": "blog-1conv", **_BLOG},
        ),
        Recipe(
            "blog-2conv",
            "Polish blog: conv 64 → pool → dropout → conv 128 → pool → dropout → Dense 128 → Dense 10, valid "
            "padding, 485,514 parameters; 45k/15k, early stopping; faults fixed",
            "no accuracy quoted here (the blog gives about 486 K parameters)",
            {"arch": "blog-2conv", **_BLOG},
        ),
        Recipe(
            "blog-4conv",
            "Polish blog: conv 64, 64 → pool → dropout → conv 128, 128 → pool → dropout → Dense 128 → Dense 10, "
            "valid padding; 45k/15k, early stopping (patience 5) but capped at a FIXED 8 epochs here (2 CPU "
            "cores); faults fixed",
            "no accuracy quoted here (the blog's deepest network)",
            {"arch": "blog-4conv", **{**_BLOG, "epochs": 8}},
        ),
    )
}
RECIPE_NAMES = tuple(RECIPES)


def get(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}") from None
