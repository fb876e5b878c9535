"""The README's commands run as written, against a real server: every ```sh and ```python block, from a
folder laid out like the repository root (examples/ and models/), with only these substitutions:

    http://127.0.0.1:8000, 127.0.0.1:8000   the test server's address (the README's is `make serve`'s)
    .venv-serve/bin/                        this interpreter's bin folder (make serve's venv is not made here)
    curl                                    curl --fail-with-body -sS (an HTTP error fails the block)

A ```json block after `<!-- readme-test: output of the block above -->` must be what that block printed
(numbers to 1e-5). A block after `<!-- readme-test: skip (why) -->` is not run; SKIPPED lists those, so a
new skip is a visible decision rather than a README drifting again."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT, Server, running_server

README = ROOT / "README.md"
RUNNABLE = {"sh", "python"}
ANNOTATION = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->")
# The blocks not run, by their first line, and why (the README says the same beside each).
SKIPPED = {
    "make serve   # http://127.0.0.1:8000: the default model, the web page, the API and its documentation": (
        "make serve starts the server, which the test starts itself; make test is the whole suite"
    ),
    "docker-compose up -d --build          # http://127.0.0.1:8000, healthcheck on /readyz, restart unless-stopped": (
        "needs a Docker engine and builds an image: tests/container/ does that"
    ),
    ".venv/bin/fashion-train train --recipe fashion-mnist-cnn --out models   # the default model's recipe: writes "
    "models/fashion-mnist-cnn/3": (
        "training takes about 12 minutes on 2 cores; tests/training/ trains a small model instead"
    ),
    "kubectl create namespace fashion": "needs a Kubernetes cluster: tests render and validate the manifests instead",
    "pip install 'fashion-serve[ray]'    # on every node, and where the job is submitted from": (
        "needs a Ray cluster: tests/process/test_ray_scoring.py makes one"
    ),
}
BLOCK_TIMEOUT_S = 180


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    annotation: str | None  # the readme-test comment just before it, if any

    @property
    def first_line(self) -> str:
        return self.text.strip().splitlines()[0].strip()


def blocks(text: str) -> list[Block]:
    found: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)", lines[i])
        if not fence:
            i += 1
            continue
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        annotation = ANNOTATION.search(previous)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        found.append(Block(i + 1, fence.group(1), "\n".join(lines[i + 1 : end]) + "\n", annotation and annotation[1]))
        i = end + 1
    return found


BLOCKS = blocks(README.read_text())
TO_RUN = [b for b in BLOCKS if b.lang in RUNNABLE and not (b.annotation or "").startswith("skip")]


def approx_equal(got: Any, want: Any) -> bool:
    if isinstance(want, float) or isinstance(got, float):
        return math.isclose(float(got), float(want), rel_tol=1e-5, abs_tol=1e-9)
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(approx_equal(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(approx_equal, got, want))
    return bool(got == want)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("readme-server")) as running:
        yield running


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like the repository root for the commands: examples/ and models/ (links), and nothing else to litter."""
    folder = tmp_path_factory.mktemp("readme-root")
    for name in ("examples", "models"):
        (folder / name).symlink_to(ROOT / name)
    return folder


def substituted(text: str, url: str) -> str:
    bin_dir = Path(sys.executable).parent
    text = text.replace("http://127.0.0.1:8000", url).replace("127.0.0.1:8000", url.removeprefix("http://"))
    text = text.replace(".venv-serve/bin/", f"{bin_dir}/")
    return re.sub(r"(?m)(^|[|;&(]\s*|\s)curl ", r"\1curl --fail-with-body -sS ", text)


def run_block(block: Block, url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    code = substituted(block.text, url)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env = {k: v for k, v in env.items() if not k.upper().startswith("FASHION_SERVE_")}
    command = ["bash", "-euo", "pipefail", "-c", code] if block.lang == "sh" else [sys.executable, "-c", code]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)


def test_skipped_blocks_are_the_listed_ones() -> None:
    skipped = {b.first_line: (b.annotation or "") for b in BLOCKS if (b.annotation or "").startswith("skip")}
    for first, annotation in skipped.items():
        print(f"not run: {first!r}: {annotation}")
        assert re.fullmatch(r"skip \(.+\)", annotation), f"say why a block is skipped: {annotation!r}"
    assert {k: v.removeprefix("skip (").removesuffix(")") for k, v in skipped.items()} == SKIPPED
    assert len(TO_RUN) >= 5, "the README's commands were not found"


@pytest.mark.parametrize("block", TO_RUN, ids=[f"line{b.line}" for b in TO_RUN])
def test_readme_block_runs_as_written(block: Block, server: Server, workdir: Path) -> None:
    result = run_block(block, server.url, workdir)
    assert result.returncode == 0, (
        f"README.md line {block.line} failed (exit {result.returncode}):\n{block.text}\n"
        f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    )
    index = BLOCKS.index(block)
    follower = BLOCKS[index + 1] if index + 1 < len(BLOCKS) else None
    if follower is not None and follower.annotation == "output of the block above":
        shown = json.loads(follower.text)
        answered = json.loads(result.stdout)
        assert approx_equal(answered, shown), (
            f"README.md line {follower.line}: the sample output is not what the command prints:\n{result.stdout}"
        )
