"""python -m scoring --engine ray on a real multi-node Ray cluster made here: a head and a second node, each a
separate `ray start` with one CPU (bench/raycluster.py), everything on loopback and stopped by process id in a
finalizer, failures included.

The job: the real 10,000 test images (IDX, with the label file beside them), a folder of PNG files in class
folders with a corrupt file among them, and an .npz, scored by the cluster and by the in-process scorer; the
rows must be the same, in the same order, the probabilities to the bit (the out-of-distribution score to
1e-6: below). Both nodes must have done work (the actors report their
node id, summed per node in the summary); the corrupt file is an error row, not a failed job. Then the second
node is killed (SIGKILL of its raylet and everything it started) in the middle of a job, which must still end
with every image scored exactly once."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bench.raycluster import LocalRayCluster
from tests.support import ROOT, model_args, read_jsonl, write_class_folders

pytestmark = pytest.mark.slow

IDX = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")) / "t10k-images-idx3-ubyte.gz"
JOB_TIMEOUT_S = 420  # 10,000 images on two 1-CPU nodes of a loaded 2-core machine, with node loss: ~1-2 min


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRayCluster]:
    if importlib.util.find_spec("ray") is None:
        pytest.fail("Ray is not installed: pip install -e '.[ray]' (make test installs it)")
    with LocalRayCluster(nodes=2, cpus=1) as made:
        yield made


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, test_split) -> list[Path]:  # type: ignore[no-untyped-def]
    if not IDX.is_file():
        pytest.fail(f"{IDX} is missing: the real test images (Debian's dataset-fashion-mnist; make test installs it)")
    root = tmp_path_factory.mktemp("ray-inputs")
    write_class_folders(root / "photos", test_split.images[:150], test_split.labels[:150])
    (root / "photos" / "batch-a" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    np.savez(root / "more.npz", images=test_split.images[150:250], labels=test_split.labels[150:250])
    return [root / "photos", IDX, root / "more.npz"]


def score_command(inputs: list[Path], out: Path, *options: str) -> list[str]:
    return [
        sys.executable, "-m", "scoring", *map(str, inputs), "--out", str(out), *model_args(),
        "--batch-size", "128", "--allow-failures", *options,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def expected(inputs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The in-process scorer's rows: what the cluster must give."""
    out = tmp_path_factory.mktemp("ray-expected") / "local.jsonl"
    done = subprocess.run(score_command(inputs, out, "--quiet"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_jsonl(out)
    assert len(rows) == 10_000 + 151 + 100
    return rows


def images_per_node(err: str) -> dict[str, int]:
    match = re.search(r"images per node: ([^;)\n]*)", err)
    assert match, err[-3000:]
    return {node: int(n) for node, n in (part.rsplit(" ", 1) for part in match.group(1).split(", "))}


def check_same_rows(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected), f"{len(got)} rows, {len(expected)} expected"
    sources = [row["source"] for row in got]
    assert len(set(sources)) == len(sources), "some image was scored more than once"
    assert sources == [row["source"] for row in expected], "rows are not in input order"
    # Everything the model answers, to the bit; the out-of-distribution score (service/ood.py: a float32
    # matrix product in numpy) to its last bit or two, which depend on the BLAS threads of the process that
    # computes it: Ray's workers have OMP_NUM_THREADS=1 (their CPUs), this machine's in-process scorer two.
    different = [a["source"] for a, b in zip(got, expected, strict=True) if without_ood(a) != without_ood(b)]
    assert not different, f"{len(different)} rows differ from the in-process scorer's, e.g. {different[:5]}"
    for a, b in zip(got, expected, strict=True):
        if b.get("ood_score") is None:
            assert a.get("ood_score") is None, a["source"]
        else:
            assert a["ood_score"] == pytest.approx(b["ood_score"], rel=1e-6), a["source"]


def without_ood(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "ood_score"}


def test_two_nodes_score_like_the_in_process_scorer(
    cluster: LocalRayCluster, inputs: list[Path], expected: list[dict], tmp_path: Path
) -> None:
    out = tmp_path / "ray.jsonl"
    command = score_command(inputs, out, "--engine", "ray", "--address", cluster.address)
    done = subprocess.run(command, cwd=ROOT, env=cluster.env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    got = read_jsonl(out)
    check_same_rows(got, expected)
    # The corrupt file: an error row, reported in the summary, and the job went on.
    broken = [row for row in got if row["source"].endswith("corrupt.png")]
    assert len(broken) == 1 and broken[0]["error"] and broken[0]["probabilities"] is None
    assert "1 failed" in done.stderr and "corrupt.png" in done.stderr
    assert "accuracy " in done.stderr
    # Both nodes did work: the actors' node ids, summed per node by the driver.
    per_node = images_per_node(done.stderr)
    print(f"[ray] images per node: {per_node}")
    assert len(per_node) == 2 and all(n > 0 for n in per_node.values()), per_node
    assert sum(per_node.values()) == len(got)  # every row came back from one actor or another
    assert "2 nodes" in done.stderr


def test_a_node_lost_mid_job_still_scores_every_image_exactly_once(
    cluster: LocalRayCluster, inputs: list[Path], expected: list[dict], tmp_path: Path
) -> None:
    out = tmp_path / "ray-node-lost.jsonl"
    log = tmp_path / "scoring.log"
    command = score_command(inputs, out, "--engine", "ray", "--address", cluster.address)
    with log.open("w") as err:
        job = subprocess.Popen(command, cwd=ROOT, env=cluster.env(), stdout=subprocess.DEVNULL, stderr=err)
    try:
        # Kill the second node once the job is under way: rows are being written, far from all of them.
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline and job.poll() is None and (not out.exists() or out.stat().st_size < 1):
            time.sleep(0.1)
        assert job.poll() is None, f"the job ended before a node could be killed:\n{log.read_text()[-3000:]}"
        rows_before = len(out.read_text().splitlines())
        pid = cluster.kill_node(cluster.nodes[1])
        print(f"[ray] killed the raylet of node 1 (pid {pid}) with {rows_before} of {len(expected)} rows written")
        assert rows_before < len(expected) // 2
        code = job.wait(timeout=JOB_TIMEOUT_S)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    err = log.read_text()
    assert code == 0, err[-4000:]
    check_same_rows(read_jsonl(out), expected)
    print(f"[ray] after the loss: {images_per_node(err)}")
