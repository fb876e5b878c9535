"""Training, evaluation and ONNX export of the Fashion-MNIST classifier (needs the `train` extra)."""

# Names live here, free of TensorFlow, so the CLI can check its arguments before a slow import.
ARCHITECTURE_NAMES = ("mlp", "seed-cnn", "double-conv", "bn-cnn")
DEFAULT_ARCH = "bn-cnn"
