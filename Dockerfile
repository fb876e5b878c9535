# Fashion-MNIST serving image: FastAPI + onnxruntime, the committed model baked in.
#
# CPU (default):
#   docker build -t fashion-serve .
#   docker run -p 8000:8000 fashion-serve
# Without a registry, on a local base image made by scripts/docker-engine.sh:
#   docker build --build-arg BASE_IMAGE=fashion-serve/python-base:bookworm -t fashion-serve .
# GPU (onnxruntime-gpu on a CUDA + cuDNN runtime; run with --gpus all):
#   docker build -t fashion-serve:gpu \
#     --build-arg BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04 \
#     --build-arg ONNXRUNTIME_PACKAGE=onnxruntime-gpu \
#     --build-arg PROVIDERS=cuda,cpu .
#
# The variant is chosen by build arguments, not by a stage target: the legacy builder (no BuildKit)
# builds every stage before the target, so a CUDA stage in this file would be pulled even for CPU.
# Legacy-builder safe: no `# syntax=` line, no `RUN --mount`, no heredocs.
#
# The image never depends on where Python lives: the builder makes a venv with the base's python3
# and everything runs from /opt/venv. Builder and runtime share BASE_IMAGE, so the venv's link to
# its interpreter is valid in both.

ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder

# onnxruntime for CPU, onnxruntime-gpu for CUDA: it chooses the lock file, requirements.lock or
# requirements-gpu.lock (the same pins with onnxruntime-gpu; both made by `make lock`).
ARG ONNXRUNTIME_PACKAGE=onnxruntime

# ARG, not ENV: build-time only, never baked into an image.
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# Bases without Python (the CUDA runtime images) get the distribution's python3 and venv.
RUN if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv

WORKDIR /src

# Dependencies first, in their own layer: it is rebuilt only when a lock file changes. Exactly the pinned
# versions, each checked against its SHA-256 (--require-hashes): the image installs the same packages
# whatever day it is built. The serving side only (no TensorFlow); the service's own code is copied into
# the runtime stage below rather than installed, so that training and scoring code stay out of the image.
# The venv then loses pip/setuptools and the packages' own test suites (not needed to serve, ~20 MB).
COPY requirements.lock requirements-gpu.lock ./
RUN case "$ONNXRUNTIME_PACKAGE" in \
        onnxruntime) lock=requirements.lock ;; \
        onnxruntime-gpu) lock=requirements-gpu.lock ;; \
        *) echo "ONNXRUNTIME_PACKAGE must be onnxruntime or onnxruntime-gpu, not $ONNXRUNTIME_PACKAGE" >&2; exit 1 ;; \
    esac \
    && echo "--- installing $lock" \
    && /opt/venv/bin/pip install --no-cache-dir --require-hashes -r "$lock" \
    && { /opt/venv/bin/pip uninstall -y pip setuptools wheel >/dev/null 2>&1 || true; } \
    && find /opt/venv -depth -type d -name tests -path '*/site-packages/*' -exec rm -rf {} + \
    && ! /opt/venv/bin/python -c 'import tensorflow' 2>/dev/null

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

# cpu, or cuda,cpu for the GPU variant (the service falls back in the order given).
ARG PROVIDERS=cpu
ARG APP_UID=10001
ARG DEBIAN_FRONTEND=noninteractive

# The same Python the venv was made with (present already on Python bases; installed on CUDA ones).
# Then an unprivileged account, created without useradd (minimal bases may lack it).
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && if ! getent group app >/dev/null; then echo "app:x:${APP_UID}:" >>/etc/group; fi \
    && if ! getent passwd app >/dev/null; then \
        echo "app:x:${APP_UID}:${APP_UID}:fashion-serve:/nonexistent:/usr/sbin/nologin" >>/etc/passwd; \
    fi

COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY service/ /app/service/
# Bytecode compiled now, as pip did for the dependencies: the container never writes any
# (PYTHONDONTWRITEBYTECODE, and /app is not the app user's), so without it every start compiles the
# service's modules from source again, ~0.1 s of the time to ready.
RUN /opt/venv/bin/python -m compileall -q /app/service
# The default model, baked in (the seed networks beside it in models/ are for comparison on a
# workstation, not for the image: each would cost every pod memory and start-up time); mount a folder
# on /models (or point FASHION_SERVE_MODELS elsewhere) to serve other models without rebuilding.
COPY models/fashion-mnist-cnn/ /models/fashion-mnist-cnn/

# ORT_DISABLE_TELEMETRY: recent onnxruntime wheels upload usage telemetry on Linux and try to keep
# a device id under $HOME (none here); a serving container opts out. Override with -e if wanted.
# MALLOC_*: glibc gives freed memory back after a burst of large images (two heaps, not 8 per core; blocks of
# 1 MiB and more mapped on their own); each worker also sets them itself (service/memory.py).
ENV PATH=/opt/venv/bin:$PATH \
    MALLOC_ARENA_MAX=2 \
    MALLOC_MMAP_THRESHOLD_=1048576 \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FASHION_SERVE_HOST=0.0.0.0 \
    FASHION_SERVE_PORT=8000 \
    FASHION_SERVE_MODELS=/models \
    FASHION_SERVE_PROVIDERS=${PROVIDERS} \
    ORT_DISABLE_TELEMETRY=1

USER ${APP_UID}:${APP_UID}
EXPOSE 8000

# No curl in slim images: the venv's Python asks /readyz (200 only once the model is loaded).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('FASHION_SERVE_PORT', '8000'), timeout=4)"]

# Exec form, no shell in between: the server is PID 1 and gets SIGTERM from `docker stop`.
ENTRYPOINT ["python", "-m", "service"]
