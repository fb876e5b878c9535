"""Prove the CUDA execution provider for real, on a machine with a GPU and onnxruntime-gpu:

1. service.model.Model with providers cuda,cpu and strict providers: the session really uses CUDA;
2. the 10,000 test images through CUDA and through CPU: same predictions, probabilities within 5e-3 (TF32);
3. `python -m service --providers cuda,cpu --strict-providers` answers /readyz and real uploads;
4. batch inference time on CUDA and on CPU.

Usage: python scripts/gpu_check.py [MODEL_DIR] [DATA_DIR]
"""

from __future__ import annotations

import gzip
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from service.model import Model  # noqa: E402

MODEL_DIR = Path(sys.argv[1] if len(sys.argv) > 1 else "models/fashion-mnist-cnn/1")
DATA_DIR = Path(sys.argv[2] if len(sys.argv) > 2 else "/usr/share/datasets/fashion-mnist")


def idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def timed(model: Model, x: np.ndarray, repeats: int = 20) -> float:
    model.run(x, ["probabilities"])
    start = time.perf_counter()
    for _ in range(repeats):
        model.run(x, ["probabilities"])
    return (time.perf_counter() - start) / repeats


def main() -> None:
    print("onnxruntime", ort.__version__, "available:", ort.get_available_providers())
    images = idx(DATA_DIR / "t10k-images-idx3-ubyte.gz")
    labels = idx(DATA_DIR / "t10k-labels-idx1-ubyte.gz")
    x = (images.astype(np.float32) / 255.0)[..., None]

    gpu = Model(MODEL_DIR, providers=["cuda", "cpu"], strict_providers=True)
    gpu.load()
    print("CUDA session providers:", gpu.providers_in_use, "warnings:", gpu.provider_warnings)
    assert gpu.providers_in_use[0] == "CUDAExecutionProvider"
    cpu = Model(MODEL_DIR, providers=["cpu"])
    cpu.load()

    p_gpu = np.concatenate(
        [gpu.run(x[i : i + 1000], ["probabilities"])["probabilities"] for i in range(0, 10_000, 1000)]
    )
    p_cpu = np.concatenate(
        [cpu.run(x[i : i + 1000], ["probabilities"])["probabilities"] for i in range(0, 10_000, 1000)]
    )
    diff = float(np.abs(p_gpu - p_cpu).max())
    agree = float((p_gpu.argmax(1) == p_cpu.argmax(1)).mean())
    acc_gpu = float((p_gpu.argmax(1) == labels).mean())
    card_acc = json.loads((MODEL_DIR / "card.json").read_text())["metrics"]["test_accuracy"]
    print(
        f"10,000 test images: max |CUDA-CPU| {diff:.2e}, argmax agreement {agree:.4f}, "
        f"accuracy on CUDA {acc_gpu:.4f} (card {card_acc})"
    )
    # cuDNN convolutions run in TF32 on Ampere and later: ~1e-3 differences, the same decisions.
    assert diff < 5e-3 and agree >= 0.9999 and abs(acc_gpu - card_acc) <= 0.001

    for n in (1, 256, 4096):
        t_gpu, t_cpu = timed(gpu, x[:n]), timed(cpu, x[:n])
        print(
            f"batch {n:5d}: CUDA {t_gpu * 1e3:8.3f} ms ({n / t_gpu:10.0f} img/s)   "
            f"CPU(1 thread) {t_cpu * 1e3:8.3f} ms ({n / t_cpu:9.0f} img/s)"
        )

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service",
            "--port",
            str(port),
            "--models",
            str(MODEL_DIR.parent.parent),
            "--providers",
            "cuda,cpu",
            "--strict-providers",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        start = time.perf_counter()
        while True:
            try:
                ready = json.load(urllib.request.urlopen(url + "/readyz", timeout=1))
                break
            except Exception:
                if server.poll() is not None or time.perf_counter() - start > 60:
                    raise RuntimeError(server.stdout.read().decode() if server.stdout else "server died") from None
                time.sleep(0.1)
        print(f"server ready in {time.perf_counter() - start:.2f} s:", ready)
        assert ready["providers"][0] == "CUDAExecutionProvider"
        correct = 0
        for i in range(200):
            buffer = io.BytesIO()
            Image.fromarray(images[i]).save(buffer, format="PNG")
            boundary = "xXx"
            body = (
                (
                    f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{i}.png"\r\n'
                    f"Content-Type: image/png\r\n\r\n"
                ).encode()
                + buffer.getvalue()
                + f"\r\n--{boundary}--\r\n".encode()
            )
            req = urllib.request.Request(
                url + "/v1/predict", body, {"content-type": f"multipart/form-data; boundary={boundary}"}
            )
            answer = json.load(urllib.request.urlopen(req, timeout=10))
            # batch 1 over HTTP vs batches of 1,000 above: cuDNN picks other TF32 kernels
            assert np.allclose(answer["probabilities"], p_gpu[i], atol=5e-3)
            assert answer["class_id"] == int(p_gpu[i].argmax())
            correct += answer["class_id"] == labels[i]
        meta = json.load(urllib.request.urlopen(url + "/v1/models", timeout=5))["models"][0]["providers"]
        print(f"200 PNG uploads over HTTP on CUDA: {correct}/200 correct; /v1/models providers: {meta}")
    finally:
        server.terminate()
        server.wait(timeout=20)
    print("CUDA CHECK PASSED")


if __name__ == "__main__":
    main()
