"""The baseline: a plain FastAPI + onnxruntime wrapper, exactly as people first write one.

One session, a sync `def` endpoint taking `UploadFile`, PIL decoding, /255, session.run, JSON.
Run under uvicorn's defaults:  python -m bench.reference --model models/.../model.onnx --port 8001
"""

from __future__ import annotations

import argparse
import io
import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, File, UploadFile
from PIL import Image

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

app = FastAPI()
_session: ort.InferenceSession | None = None


def session() -> ort.InferenceSession:
    global _session
    if _session is None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        _session = ort.InferenceSession(os.environ["BENCH_MODEL"], options, providers=["CPUExecutionProvider"])
    return _session


@app.post("/v1/predict")
def predict(file: UploadFile = File(...)) -> dict[str, object]:  # noqa: B008 - FastAPI's idiom
    image = Image.open(io.BytesIO(file.file.read())).convert("L")
    x = (np.asarray(image, dtype=np.float32) / 255.0)[None, :, :, None]
    probabilities = session().run(["probabilities"], {"image": x})[0][0]
    best = int(probabilities.argmax())
    return {"label": CLASSES[best], "class_id": best, "probabilities": probabilities.tolist()}


@app.get("/readyz")
def readyz() -> dict[str, str]:
    session()
    return {"status": "ready"}


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m bench.reference")
    parser.add_argument("--model", required=True, help="model.onnx")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    os.environ["BENCH_MODEL"] = args.model
    uvicorn.run(app, host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
