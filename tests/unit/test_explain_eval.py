"""The measured claims: explanations are faithful (a deletion test on real test images), and the
out-of-distribution flag tells non-garments from garments (AUROC on every set of training/ood_sets.py) while
product-photo renderings of garments still pass. `python -m training.explain_eval` computes the README's
figures on the full sets (1,000 images for faithfulness); these tests check the same on fewer where it takes
long, and keep a picture of a few overlays in test-artifacts/explanations.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.model import Model
from tests.support import ROOT, model_folder
from training import explain_eval

ARTIFACTS = ROOT / "test-artifacts"
FAITHFULNESS_IMAGES = 1000  # the figure; Grad-CAM's margin needs them all


@pytest.fixture(scope="module")
def model() -> Model:
    loaded = Model(model_folder(), providers=["cpu"])
    loaded.load()
    return loaded


@pytest.fixture(scope="module")
def faithfulness(model: Model, test_split) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    result = explain_eval.faithfulness(model, test_split.images[:FAITHFULNESS_IMAGES])
    print(result)
    return result


def test_occlusion_is_faithful(faithfulness: dict[str, Any]) -> None:
    """Deleting the 10 % most-attributed pixels costs the predicted class much more probability than deleting
    10 % random pixels (the whole image's, or the garment's), on most images, with p far below 0.001."""
    occlusion = faithfulness["methods"]["occlusion"]
    for baseline in ("random pixels", "random garment pixels"):
        assert occlusion["mean_drop"] > 2 * faithfulness["baselines"][baseline]["mean_drop"]
        assert occlusion[f"vs {baseline}"]["beats_fraction"] >= 0.75
        assert occlusion[f"vs {baseline}"]["sign_test_p"] < 1e-6


def test_layercam_is_faithful(faithfulness: dict[str, Any]) -> None:
    """The gradient method the page shows: deleting its top 10 % costs the class more than deleting 10 %
    random pixels, on most images, with p below 0.001 (the issue's test)."""
    layercam = faithfulness["methods"]["layercam"]
    assert layercam["mean_drop"] > 1.5 * faithfulness["baselines"]["random pixels"]["mean_drop"]
    assert layercam["vs random pixels"]["beats_fraction"] > 0.6
    assert layercam["vs random pixels"]["sign_test_p"] < 0.001


def test_gradcam_is_faithful(faithfulness: dict[str, Any]) -> None:
    """Grad-CAM passes on the default model, by a thin margin (README): its spatial average at conv3's 7×7
    also lights background beside the garment, where deleting changes nothing. (On version 1 it failed:
    beat random deletion on 44 % of the images.)"""
    gradcam = faithfulness["methods"]["gradcam"]
    assert gradcam["mean_drop"] > faithfulness["baselines"]["random pixels"]["mean_drop"]
    assert gradcam["vs random pixels"]["sign_test_p"] < 0.001


def test_overlays_picture_is_kept(model: Model, test_split) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    path = ARTIFACTS / "explanations.png"
    explain_eval.overlays_picture(model, test_split.images[: explain_eval.PICTURE_IMAGES], path)
    picture = Image.open(path)
    assert picture.size[0] > 6 * 112 and picture.size[1] > 3 * 112
    # The committed copy that the README shows is the same picture.
    assert np.array_equal(np.asarray(picture), np.asarray(Image.open(ROOT / "docs" / "explanations.png")))


@pytest.mark.slow
def test_ood_flag_separates_every_set_and_passes_product_photos(model: Model, test_split) -> None:  # type: ignore[no-untyped-def]
    """Against all 10,000 test images: AUROC ≥ 0.95 on every out-of-distribution set; the first 2,000 test
    images rendered as product photos pass at close to the 95 % the threshold was chosen for."""
    result = explain_eval.ood_evaluation(model, test_split.images, renders=2000)
    print(result)
    assert 0.94 <= result["test_pass_rate"] <= 0.96
    for name, figures in result["sets"].items():
        assert figures["auroc"] >= 0.95, name
    for name, figures in result["renderings"].items():
        assert 0.93 <= figures["pass_rate"] <= 0.98, name


def test_evaluation_command_writes_its_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """python -m training.explain_eval on a handful of images (the sets made smaller)."""
    from training import ood_sets

    small = {name: (lambda make=make: make()[:40]) for name, make in ood_sets.OOD_SETS.items()}
    monkeypatch.setattr(ood_sets, "OOD_SETS", small)
    out = tmp_path / "figures.json"
    args = [str(model_folder()), "--images", "20", "--test-images", "500", "--renders", "50", "--out", str(out)]
    assert explain_eval.main([*args, "--picture", str(tmp_path / "p.png")]) == 0
    import json

    figures = json.loads(out.read_text())
    assert set(figures["faithfulness"]["methods"]) == {"gradcam", "layercam", "occlusion"}
    assert set(figures["out_of_distribution"]["sets"]) == set(small)
    assert (tmp_path / "p.png").stat().st_size > 1000
