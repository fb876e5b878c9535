"""How good are the explanations and the out-of-distribution flag? `python -m training explain-eval MODEL_DIR`.

Everything goes through the service's own code: service.model.Model (the exported graphs, onnxruntime),
service.explain (Grad-CAM, occlusion), service.ood (the score), service.imaging.preprocess (uploads).

* Faithfulness (a deletion test): for each of N real test images, the predicted class's probability is
  measured again after the 10 % most-attributed pixels are set to the background (0), and after 10 % of
  pixels chosen at random; an attribution is faithful when deleting what it points at costs the class
  more than deleting at random. Random pixels of the whole image are mostly background already (deleting
  them changes nothing), so a stricter baseline is reported too: 10 % random pixels of the garment.
* Out-of-distribution: AUROC and FPR at 95 % TPR of each set of training/ood_sets.py against the 10,000
  test images (uploaded as 28×28 PNGs); the pass rate of the test images rendered as product photos.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from service import explain, imaging
from service.model import Model
from training import ood_sets

DELETE_FRACTION = 0.1
FAITHFULNESS_IMAGES = 1000


def to_tensor(images: np.ndarray) -> np.ndarray:
    return (images.astype(np.float32) / 255.0)[..., None]


def run(model: Model, x: np.ndarray, outputs: list[str], chunk: int = 512) -> dict[str, np.ndarray]:
    parts = [model.run(x[i : i + chunk], outputs) for i in range(0, len(x), chunk)]
    return {name: np.concatenate([p[name] for p in parts]) for name in outputs}


# ------------------------------------------------------------------------------------- attributions


def gradient_maps(method: explain.Method) -> Callable[[Model, np.ndarray, np.ndarray], np.ndarray]:
    """Grad-CAM or LayerCAM maps of a batch, from the graph's outputs and the exported head."""

    def maps(model: Model, x: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
        head = model.head
        if head is None:
            raise ValueError(f"{model.folder}: no explanation head (the card lists no `explain` file)")
        out = run(model, x, [head.layer, head.embedding])
        return explain.GRADIENT_MAPS[method](head, out[head.layer], out[head.embedding], class_ids)

    return maps


gradcam_maps = gradient_maps(explain.Method.gradcam)
layercam_maps = gradient_maps(explain.Method.layercam)


def occlusion_maps(
    model: Model,
    x: np.ndarray,
    class_ids: np.ndarray,
    patch: int = explain.DEFAULT_PATCH,
    stride: int = explain.DEFAULT_STRIDE,
    per_run: int = 8,
) -> np.ndarray:
    """Occlusion maps, the occluded copies of `per_run` images scored in one run."""
    maps = []
    probabilities = model.probabilities_output
    for start in range(0, len(x), per_run):
        images = x[start : start + per_run]
        copies = [explain.occluded(image, patch, stride) for image in images]
        scores = model.run(np.concatenate([images, *copies]), [probabilities])[probabilities]
        base, rest = scores[: len(images)], scores[len(images) :].reshape(len(images), len(copies[0]), -1)
        for i, c in enumerate(class_ids[start : start + per_run]):
            maps.append(explain.occlusion_map(base[i, c], rest[i, :, c], patch, stride))
    return np.stack(maps)


# ------------------------------------------------------------------------------------- faithfulness


def deleted(x: np.ndarray, pixels: list[np.ndarray]) -> np.ndarray:
    """Copies of `x` [N, 28, 28, 1] with each image's `pixels` (flat indices) set to 0."""
    out = x.reshape(len(x), -1).copy()
    for i, chosen in enumerate(pixels):
        out[i, chosen] = 0.0
    return out.reshape(x.shape)


def top_pixels(maps: np.ndarray, count: int) -> list[np.ndarray]:
    """Each map's `count` highest pixels (ties by position)."""
    flat = maps.reshape(len(maps), -1)
    return list(np.argsort(-flat, axis=1, kind="stable")[:, :count])


def sign_test_p(wins: int, losses: int) -> float:
    """One-sided p-value of a sign test (ties left out): the chance of at least `wins` of wins + losses
    fair coin tosses, by the normal approximation with continuity correction."""
    n = wins + losses
    if n == 0:
        return 1.0
    z = (wins - 0.5 - n / 2) / math.sqrt(n / 4)
    return 0.5 * math.erfc(z / math.sqrt(2))


def faithfulness(
    model: Model,
    images: np.ndarray,
    fraction: float = DELETE_FRACTION,
    seed: int = 0,
    methods: dict[str, Callable[[Model, np.ndarray, np.ndarray], np.ndarray]] | None = None,
) -> dict[str, Any]:
    """The deletion test on uint8 [N, 28, 28] `images` (see the module's doc)."""
    methods = methods or {"gradcam": gradcam_maps, "layercam": layercam_maps, "occlusion": occlusion_maps}
    x = to_tensor(images)
    name = model.probabilities_output
    p0 = run(model, x, [name])[name]
    class_ids = p0.argmax(axis=1)
    rows = np.arange(len(x))
    count = round(fraction * x[0].size)
    rng = np.random.default_rng(seed)

    def drop(pixels: list[np.ndarray]) -> np.ndarray:
        p = run(model, deleted(x, pixels), [name])[name]
        return p0[rows, class_ids] - p[rows, class_ids]  # type: ignore[no-any-return]

    random_pixels = [rng.choice(x[0].size, count, replace=False) for _ in rows]
    garment_pixels = []
    for image in x.reshape(len(x), -1):
        garment = np.flatnonzero(image > 0)
        garment_pixels.append(rng.choice(garment, min(count, len(garment)), replace=False))
    baselines = {"random pixels": drop(random_pixels), "random garment pixels": drop(garment_pixels)}
    result: dict[str, Any] = {
        "images": len(x),
        "deleted_pixels": count,
        "baselines": {k: {"mean_drop": float(v.mean())} for k, v in baselines.items()},
        "methods": {},
    }
    for method, maps_of in methods.items():
        start = time.perf_counter()
        maps = maps_of(model, x, class_ids)
        seconds = time.perf_counter() - start
        drops = drop(top_pixels(maps, count))
        entry: dict[str, Any] = {"mean_drop": float(drops.mean()), "seconds_per_image": seconds / len(x)}
        for baseline, other in baselines.items():
            wins, losses = int(np.sum(drops > other)), int(np.sum(drops < other))
            entry[f"vs {baseline}"] = {
                "beats_fraction": wins / len(x),
                "ties": len(x) - wins - losses,
                "sign_test_p": sign_test_p(wins, losses),
            }
        result["methods"][method] = entry
    return result


# ------------------------------------------------------------------------------- out of distribution


def ood_scores(model: Model, files: list[bytes]) -> np.ndarray:
    """The OOD scores of image files, through the service's preprocessing, as uploads."""
    if model.ood is None:
        raise ValueError(f"{model.folder}: no out-of-distribution parameters (the card lists no `ood` file)")
    x = np.stack([imaging.preprocess(data) for data in files])
    return model.ood.score(run(model, x, [model.ood_output])[model.ood_output])


def ood_evaluation(model: Model, test_images: np.ndarray, renders: int | None = None) -> dict[str, Any]:
    """Per out-of-distribution set: AUROC and FPR at 95 % TPR against the test images; per product-photo
    rendering of the test images (the first `renders` of them): the fraction that passes."""
    if model.ood is None:
        raise ValueError(f"{model.folder}: no out-of-distribution parameters")
    test = ood_scores(model, ood_sets.as_uploads(test_images))
    threshold = model.ood.threshold
    result: dict[str, Any] = {
        "threshold": threshold,
        "test_images": len(test),
        "test_pass_rate": float(np.mean(test <= threshold)),
        "sets": {},
        "renderings": {},
    }
    for name, make in ood_sets.OOD_SETS.items():
        scores = ood_scores(model, make())
        result["sets"][name] = {
            "images": len(scores),
            "auroc": ood_sets.auroc(test, scores),
            "fpr_at_95_tpr": ood_sets.fpr_at_tpr(test, scores),
            "flagged_at_threshold": float(np.mean(scores > threshold)),
            "median_score": float(np.median(scores)),
        }
    chosen = test_images[:renders]
    for name, how in ood_sets.RENDERINGS.items():
        scores = ood_scores(model, ood_sets.render(chosen, how))
        result["renderings"][name] = {"images": len(scores), "pass_rate": float(np.mean(scores <= threshold))}
    return result


# ------------------------------------------------------------------------------------------ picture


def overlays_picture(model: Model, images: np.ndarray, path: Path, scale: int = 4) -> None:
    """A few test images side by side: the input, its LayerCAM, Grad-CAM and occlusion overlays (a row each),
    each column headed by the predicted label (the README shows it)."""
    from PIL import Image, ImageDraw

    x = to_tensor(images)
    name = model.probabilities_output
    class_ids = run(model, x, [name])[name].argmax(axis=1)
    side, gap, header, margin = 28 * scale, 4, 14, 64
    maps = {
        "input": np.zeros((len(x), 28, 28)),
        "LayerCAM": layercam_maps(model, x, class_ids),
        "Grad-CAM": gradcam_maps(model, x, class_ids),
        "occlusion": occlusion_maps(model, x, class_ids),
    }
    rows = {
        title: [explain.overlay(image, m, scale) for image, m in zip(x, of, strict=True)] for title, of in maps.items()
    }
    width = margin + len(x) * (side + gap)
    picture = Image.new("RGB", (width, header + len(rows) * (side + gap)), "white")
    draw = ImageDraw.Draw(picture)
    for column, class_id in enumerate(class_ids):
        draw.text((margin + column * (side + gap) + 2, 1), model.card.classes[int(class_id)], fill="black")
    for row, (title, tiles) in enumerate(rows.items()):
        top = header + row * (side + gap)
        draw.text((2, top + side // 2 - 5), title, fill="black")
        for column, tile in enumerate(tiles):
            picture.paste(Image.fromarray(tile), (margin + column * (side + gap), top))
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)


# ---------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    from training.data import load_test

    parser = argparse.ArgumentParser(prog="python -m training.explain_eval", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    parser.add_argument("--images", type=int, default=FAITHFULNESS_IMAGES, help="test images for faithfulness")
    parser.add_argument("--test-images", type=int, help="test images the OOD sets are told from (default all)")
    parser.add_argument("--renders", type=int, help="test images rendered as product photos (default all)")
    parser.add_argument("--out", type=Path, help="write the figures here as JSON (default: print them)")
    parser.add_argument("--picture", type=Path, help="write a picture of a few overlays here (PNG)")
    parser.add_argument("--data-dir", type=Path, help="folder with the four Fashion-MNIST IDX gz files")
    args = parser.parse_args(argv)
    model = Model(args.model_dir, providers=["cpu"])
    model.load()
    test = load_test(args.data_dir)
    start = time.perf_counter()
    figures: dict[str, Any] = {
        "model": f"{model.name}/{model.version}",
        "faithfulness": faithfulness(model, test.images[: args.images]),
        "out_of_distribution": ood_evaluation(model, test.images[: args.test_images], args.renders),
    }
    figures["seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(figures, indent=2, ensure_ascii=False)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    else:
        print(text)
    if args.picture:
        overlays_picture(model, test.images[:PICTURE_IMAGES], args.picture)
    return 0


PICTURE_IMAGES = 6

if __name__ == "__main__":
    import sys

    sys.exit(main())
