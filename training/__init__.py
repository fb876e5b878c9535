"""Training, evaluation and ONNX export of the Fashion-MNIST classifier (needs the `train` extra)."""

# Names live here, free of TensorFlow, so the CLI can check its arguments before a slow import.
ARCHITECTURE_NAMES = (
    "mlp",
    "seed-cnn",
    "double-conv-same",
    "bn-cnn",
    "blog-1conv",
    "blog-2conv",
    "blog-4conv",
    "bn-cnn-wide",
)
# Old names that still build: `double-conv` was renamed for what it is (same padding, not the blog's).
ARCHITECTURE_ALIASES = {"double-conv": "double-conv-same"}
DEFAULT_ARCH = "bn-cnn"
SCHEDULES = ("warmup-cosine", "constant")
CHECKPOINTS = ("best-val-accuracy", "best-val-loss", "last")
OPTIMIZERS = ("AdamW", "Adam")
