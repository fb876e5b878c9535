"""What every engine of python -m scoring shares, without starting Ray: the units of work (the same batches
for every engine, which is why the Ray engine's answers equal the in-process scorer's to the bit), the
Parquet output, and the --engine ray options. The Ray engine itself, on a real cluster, is in
tests/process/test_ray_scoring.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from scoring.inputs import ArraySource, BrokenSource, ImageSource, units
from tests.support import read_jsonl, write_class_folders
from tests.support import run_score as run


def test_units_are_the_in_process_batches_in_input_order() -> None:
    images = [ImageSource(Path(f"{i}.png")) for i in range(5)]
    array = ArraySource(Path("a.npy"), np.zeros((7, 28, 28), np.uint8))
    broken = BrokenSource(Path("b.npy"), "unreadable")
    planned = list(units([*images[:3], array, broken, *images[3:]], batch_size=2))
    assert [u.names() for u in planned] == [
        ["0.png", "1.png"], ["2.png"],  # a run of files ends at the array
        ["a.npy#0", "a.npy#1"], ["a.npy#2", "a.npy#3"], ["a.npy#4", "a.npy#5"], ["a.npy#6"],
        ["b.npy"],
        ["3.png", "4.png"],
    ]  # fmt: skip
    assert sum(len(u) for u in planned) == 5 + 7 + 1


def test_parquet_rows_are_the_jsonl_rows(capsys: pytest.CaptureFixture[str], tmp_path: Path, test_split) -> None:  # type: ignore[no-untyped-def]
    import pyarrow.parquet as pq

    write_class_folders(tmp_path / "data", test_split.images[:12], test_split.labels[:12])
    (tmp_path / "data" / "broken.png").write_bytes(b"not an image")
    for out in ("rows.jsonl", "rows.parquet"):
        code, _, err = run(capsys, tmp_path / "data", "--out", tmp_path / out, "--top-k", "3", "--allow-failures")
        assert code == 0, err
    expected = read_jsonl(tmp_path / "rows.jsonl")
    table = pq.read_table(tmp_path / "rows.parquet")
    assert table.schema.field("probabilities").type.value_type == "float"  # float32, as the model gives them
    got = table.to_pylist()
    assert [r["source"] for r in got] == [r["source"] for r in expected]
    for a, b in zip(got, expected, strict=True):
        assert (a["label"], a["class_id"], a["true_label"], a["error"]) == (
            b["label"],
            b["class_id"],
            b["true_label"],
            b["error"],
        )
        if b["probabilities"] is None:
            assert a["probabilities"] is None and a["top_k"] is None
            continue
        assert np.float32(a["probability"]) == np.float32(b["probability"])
        assert np.array_equal(np.float32(a["probabilities"]), np.float32(b["probabilities"]))
        assert [t["class_id"] for t in a["top_k"]] == [t["class_id"] for t in b["top_k"]]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--engine", "ray", "--url", "http://127.0.0.1:1"], "exclude each other"),
        (["--address", "127.0.0.1:6379"], "are for --engine ray"),
        (["--engine", "ray", "--actors", "0"], "--actors must be at least 1"),
        (["--engine", "ray", "--actor-cpus", "0"], "--actor-cpus must be above 0"),
        (["--out", "rows.parquet.txt"], "must end in .csv or .jsonl, or .parquet"),
    ],
)
def test_bad_engine_options_are_usage_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    code, _, err = run(capsys, tmp_path / "a.png", *args)
    assert code == 2 and message in err, err


def test_the_server_never_imports_ray_and_the_scorer_only_for_engine_ray() -> None:
    import ast
    import subprocess
    import sys

    from tests.support import ROOT

    for path in (ROOT / "service").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "ray" or n.startswith("ray.") for n in names), f"{path} imports {names}"
    probe = "import sys, service.app, scoring.__main__, scoring.engines; print('ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr[-2000:]
