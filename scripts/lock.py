"""Pin the serving dependencies: `make lock` (= python scripts/lock.py) rewrites

    requirements.lock       pyproject.toml's dependencies, every package pinned with its SHA-256 hashes
    requirements-gpu.lock   the same with onnxruntime-gpu in place of onnxruntime (the GPU image)

with `uv pip compile --universal` for Python 3.11 and later on any platform, so one lock installs on this
machine, in the Debian bookworm image (Python 3.11) and in the CUDA image (Ubuntu's Python 3.12).
`make serve` and the Dockerfile install from them with `pip install --require-hashes`; pyproject.toml keeps
its version ranges for people who install the package into their own environment.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = ["--universal", "--python-version", "3.11", "--generate-hashes", "--custom-compile-command", "make lock"]


def uv() -> str:
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if not found:
        raise SystemExit("uv not found: it comes with the dev extra (pip install -e '.[dev]')")
    return found


def gpu_requirements() -> str:
    """pyproject's dependencies with onnxruntime-gpu for onnxruntime (same version range)."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    swapped = [re.sub(r"^onnxruntime(?=[\s<>=!~;\[]|$)", "onnxruntime-gpu", d) for d in dependencies]
    if swapped == dependencies:
        raise SystemExit("pyproject.toml has no onnxruntime dependency to swap for onnxruntime-gpu")
    return "\n".join(swapped) + "\n"


def main() -> int:
    compile_ = [uv(), "pip", "compile", "--quiet", *OPTIONS]
    subprocess.run([*compile_, "pyproject.toml", "-o", "requirements.lock"], cwd=ROOT, check=True)
    # From standard input: no temporary file name in the lock's comments, so the same input gives the same lock.
    subprocess.run(
        [*compile_, "-", "-o", "requirements-gpu.lock"], cwd=ROOT, check=True, input=gpu_requirements(), text=True
    )
    for name in ("requirements.lock", "requirements-gpu.lock"):
        pins = sum(1 for line in (ROOT / name).read_text().splitlines() if re.match(r"^[A-Za-z0-9].*==", line))
        print(f"{name}: {pins} packages pinned with hashes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
