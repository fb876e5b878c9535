"""python -m scoring (fashion-score): every input kind, both output formats, labels from every source, failures,
bad arguments, --url against a stand-in server; answers checked against onnxruntime run directly."""

from __future__ import annotations

import csv
import gzip
import http.server
import importlib
import json
import re
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import numpy as np
import pytest

from scoring import inputs, outputs
from scoring.__main__ import main
from service.model import Card
from tests.support import (
    ROOT,
    accuracy_line,
    model_args,
    model_folder,
    png_bytes,
    read_jsonl,
    reference_probabilities,
    write_class_folders,
)
from tests.support import run_score as run
from training.data import CLASS_NAMES, find_data_dir

CLASSES = list(CLASS_NAMES)  # the card's, checked in the accuracy test; read here without loading a model


def test_class_from_folder_is_lenient() -> None:
    want = {
        "T-shirt_top": 0, "tshirt-top": 0, "T-Shirt Top": 0, "top": 0, "0": 0, "trousers": 1, "PULLOVER": 2,
        "dresses": 3, "3": 3, "Coats": 4, "sandal": 5, "Shirt": 6, "sneakers": 7, "bag": 8, "9_ankle_boot": 9,
        "ankle boot": 9, "Ankle-Boots": 9,
    }  # fmt: skip
    for name, class_id in want.items():
        assert inputs.class_from_folder(name, CLASSES) == class_id, name
    for name in ("images", "10", "misc", "", "boots2"):
        assert inputs.class_from_folder(name, CLASSES) is None, name


def test_real_test_set_accuracy_equals_the_cards(capsys, tmp_path, test_split, reference_session) -> None:  # type: ignore[no-untyped-def]
    images_path = find_data_dir(download=False) / "t10k-images-idx3-ubyte.gz"
    out = tmp_path / "results.csv"
    # 1000 per run, as the trainer's evaluation batched them: the very same onnxruntime calls.
    code, _, err = run(capsys, images_path, "--out", out, "--batch-size", "1000")
    assert code == 0, err
    card = Card.read(model_folder())
    assert list(card.classes) == CLASSES  # the card is typed: its classes are a tuple
    card_accuracy = card.metrics["test_accuracy"]
    reported = accuracy_line(err)
    assert abs(reported - card_accuracy) <= 0.0005, (reported, card_accuracy)
    assert "(fashion-mnist" in err and "10000 images, 0 failed" in err

    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10000
    assert rows[0]["source"] == f"{images_path}#0" and rows[-1]["source"] == f"{images_path}#9999"
    # Labels were found beside the images by their standard name.
    correct = sum(r["class_id"] == r["true_class_id"] for r in rows)
    assert f"{correct / 10000:.4f}" == f"{reported:.4f}"
    want = reference_probabilities(reference_session, test_split.images[:100])
    got = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows[:100]])
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert [int(r["class_id"]) for r in rows[:100]] == want.argmax(1).tolist()


def test_uncompressed_idx_with_labels_option(capsys, tmp_path, test_split, reference_session) -> None:  # type: ignore[no-untyped-def]
    images, labels = test_split.images[:300], test_split.labels[:300]
    idx = tmp_path / "sample.idx3"
    idx.write_bytes(bytes([0, 0, 8, 3]) + np.array([300, 28, 28], ">u4").tobytes() + images.tobytes())
    label_file = tmp_path / "answers.idx1.gz"
    label_file.write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + np.array([300], ">u4").tobytes() + labels.tobytes()))
    out = tmp_path / "r.jsonl"
    code, _, err = run(capsys, idx, "--labels", label_file, "--out", out, "--batch-size", "64")
    assert code == 0, err
    want = reference_probabilities(reference_session, images).argmax(1)
    assert accuracy_line(err) == pytest.approx(float(np.mean(want == labels)), abs=5e-5)
    rows = read_jsonl(out)
    assert [r["true_class_id"] for r in rows] == labels.tolist()
    assert [r["source"] for r in rows[:2]] == [f"{idx}#0", f"{idx}#1"]


def test_folder_per_class_gives_accuracy(capsys, tmp_path, test_split, reference_session) -> None:  # type: ignore[no-untyped-def]
    images, labels = test_split.images[:300], test_split.labels[:300]
    write_class_folders(tmp_path / "data", images, labels)
    out = tmp_path / "results.jsonl"
    code, _, err = run(capsys, tmp_path / "data", "--out", out, "--batch-size", "128")
    assert code == 0, err
    rows = read_jsonl(out)
    assert len(rows) == 300 and all(r["error"] is None for r in rows)
    by_index = {int(Path(r["source"]).stem): r for r in rows}
    want = reference_probabilities(reference_session, images)
    for i in range(300):
        assert by_index[i]["true_class_id"] == int(labels[i])
        assert by_index[i]["true_label"] == CLASSES[int(labels[i])]
        np.testing.assert_allclose(by_index[i]["probabilities"], want[i], atol=1e-6)
        assert by_index[i]["class_id"] == int(want[i].argmax())
    assert accuracy_line(err) == pytest.approx(float(np.mean(want.argmax(1) == labels)), abs=5e-5)
    assert "scored 300 images, 0 failed" in err
    for name in CLASSES:  # the per-class table
        assert re.search(rf"^  {re.escape(name)} +\d+ +\d+ +[\d.-]+$", err, re.M), err


def test_npy_and_npz(capsys, tmp_path, test_split, reference_session) -> None:  # type: ignore[no-untyped-def]
    images, labels = test_split.images[:40], test_split.labels[:40]
    np.save(tmp_path / "plain.npy", images)  # uint8 [N, 28, 28], no labels
    floats = (images.astype(np.float32) / 255.0)[..., None]  # float [N, 28, 28, 1] with labels
    np.savez(tmp_path / "labelled.npz", images=floats, labels=labels)
    out = tmp_path / "r.jsonl"
    code, _, err = run(capsys, tmp_path / "plain.npy", tmp_path / "labelled.npz", "--out", out, "--batch-size", "16")
    assert code == 0, err
    rows = read_jsonl(out)
    assert len(rows) == 80
    assert [r["source"] for r in rows[:2]] == [f"{tmp_path / 'plain.npy'}#0", f"{tmp_path / 'plain.npy'}#1"]
    assert rows[40]["source"] == f"{tmp_path / 'labelled.npz'}#0"
    want = reference_probabilities(reference_session, images)
    np.testing.assert_allclose([r["probabilities"] for r in rows[:40]], want, atol=1e-6)
    np.testing.assert_allclose([r["probabilities"] for r in rows[40:]], want, atol=1e-6)
    assert all(r["true_class_id"] is None for r in rows[:40])
    assert [r["true_class_id"] for r in rows[40:]] == labels.tolist()
    correct = int(np.sum(want.argmax(1) == labels))
    assert f"accuracy {correct / 40:.4f} ({correct}/40 labelled images correct)" in err


def test_broken_files_are_reported_and_fail_the_run(capsys, tmp_path, test_split) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(5):
        (folder / f"good{i}.png").write_bytes(png_bytes(test_split.images[i]))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is no png")
    (folder / "notes.jpg").write_bytes(b"plain text")
    (folder / "cut.npy").write_bytes(b"\x93NUMPY\x01\x00")
    (folder / "README.txt").write_text("not an image")
    (folder / "scores.csv").write_text("a,b\n")
    out = tmp_path / "r.csv"
    code, _, err = run(capsys, folder, "--out", out)
    assert code == 1, err  # files failed: a script running the scorer must notice
    assert "error: 3 of 8 images failed" in err and "--allow-failures" in err
    assert "skipped 2 files (not images or arrays)" in err
    code, _, accepted = run(capsys, folder, "--out", out, "--allow-failures")
    assert code == 0, accepted
    assert "error:" not in accepted and "skipped 2 files (not images or arrays)" in accepted
    with out.open(newline="") as f:
        rows = {Path(r["source"]).name: r for r in csv.DictReader(f)}
    assert len(rows) == 8
    for name in ("broken.png", "notes.jpg", "cut.npy"):
        assert rows[name]["error"] and not rows[name]["label"], rows[name]
        assert f"failed: {folder / name}: " in err
    assert "corrupt PNG" in rows["broken.png"]["error"]
    assert all(rows[f"good{i}.png"]["label"] in CLASSES and not rows[f"good{i}.png"]["error"] for i in range(5))
    assert "scored 5 images, 3 failed" in err


def test_csv_and_jsonl_hold_the_same_rows(capsys, tmp_path, test_split) -> None:  # type: ignore[no-untyped-def]
    np.save(tmp_path / "a.npy", test_split.images[:12])
    code, _, _ = run(capsys, tmp_path / "a.npy", "--out", tmp_path / "r.csv", "--top-k", "3")
    assert code == 0
    code, _, _ = run(capsys, tmp_path / "a.npy", "--out", tmp_path / "r.jsonl", "--top-k", "3")
    assert code == 0
    code, stdout, _ = run(capsys, tmp_path / "a.npy", "--out", "-", "--top-k", "3")
    assert code == 0
    with (tmp_path / "r.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames
        table = list(reader)
    assert columns == [
        "source", "label", "class_id", "probability", "ood_score", "in_distribution", "true_label", "true_class_id",
        "error", "top2_label", "top2_probability", "top3_label", "top3_probability", *(f"p_{c}" for c in CLASSES),
    ]  # fmt: skip
    lines = read_jsonl(tmp_path / "r.jsonl")
    assert lines == [json.loads(line) for line in stdout.splitlines()]
    assert len(table) == len(lines) == 12
    assert sum(line["in_distribution"] for line in lines) >= 10
    for row, line in zip(table, lines, strict=True):
        assert set(line) == {
            "source", "label", "class_id", "probability", "top_k", "probabilities", "true_label", "true_class_id",
            "error", "ood_score", "in_distribution",
        }  # fmt: skip
        # The same OOD fields in both files (service/ood.py); test images mostly pass (95 % by construction).
        assert row["in_distribution"] == str(line["in_distribution"]) and isinstance(line["in_distribution"], bool)
        assert float(row["ood_score"]) == line["ood_score"] > 0
        assert row["source"] == line["source"] and row["label"] == line["label"]
        assert int(row["class_id"]) == line["class_id"] and float(row["probability"]) == line["probability"]
        assert [float(row[f"p_{c}"]) for c in CLASSES] == line["probabilities"]
        assert sum(line["probabilities"]) == pytest.approx(1.0, abs=1e-5)
        assert [t["label"] for t in line["top_k"]] == [line["label"], row["top2_label"], row["top3_label"]]
        probs = [t["probability"] for t in line["top_k"]]
        assert probs == sorted(probs, reverse=True) and probs[0] == line["probability"]
        assert row["true_label"] == "" and line["true_label"] is None and line["error"] is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "the following arguments are required: INPUT"),
        (["{tmp}/missing.png"], "no such file or folder"),
        (["{tmp}/a.npy", "--out", "{tmp}/r.txt"], "must end in .csv or .jsonl"),
        (["{tmp}/a.npy", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["{tmp}/a.npy", "--top-k", "11"], "--top-k must be 1-10"),
        (["{tmp}/a.npy", "--batch-size", "many"], "invalid int value"),
        (["{tmp}", "--labels", "{tmp}/a.npy"], "--labels needs exactly one input"),
        (["{tmp}/a.npy", "--labels", "{tmp}/labels.npy"], "--labels {tmp}/labels.npy: 3 labels for 4 images"),
        (["{tmp}/a.npy", "--url", "localhost:8000"], "--url must start with http"),
        (["{tmp}/a.npy", "--no-such-option"], "unrecognized arguments"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(capsys, tmp_path, args, message) -> None:  # type: ignore[no-untyped-def]
    np.save(tmp_path / "a.npy", np.zeros((4, 28, 28), np.uint8))
    np.save(tmp_path / "labels.npy", np.zeros(3, np.int64))
    code, out, err = run(capsys, *(a.format(tmp=tmp_path) for a in args))
    assert code == 2
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert message.format(tmp=tmp_path) in err


def test_nothing_scored_or_no_model_exit_1_with_one_line(capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "junk.png").write_bytes(b"junk")
    code, _, err = run(capsys, tmp_path / "junk.png", "--out", tmp_path / "r.jsonl")
    assert code == 1
    junk = tmp_path / "junk.png"
    assert err.startswith(f"error: nothing could be scored (all 1 failed; {junk}: data is not a recognised image")
    assert err.endswith(")\n") and len(err.splitlines()) == 1
    assert read_jsonl(tmp_path / "r.jsonl")[0]["error"]

    code = main([str(tmp_path / "junk.png"), "--models", str(tmp_path / "nowhere"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and err.startswith("error: no model found in ")

    code = main([str(tmp_path / "junk.png"), "--url", "http://127.0.0.1:9", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "cannot use the server at" in err


def test_runs_as_a_module_with_progress(tmp_path, test_split) -> None:  # type: ignore[no-untyped-def]
    np.save(tmp_path / "a.npy", test_split.images[:20])
    result = subprocess.run(
        [sys.executable, "-m", "scoring", str(tmp_path / "a.npy"), "--batch-size", "8", *model_args()],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 20  # JSONL on stdout by default
    assert "scoring [" in result.stderr and "20/20 100%" in result.stderr  # the progress bar, on stderr
    assert "scored 20 images, 0 failed" in result.stderr
    bad = subprocess.run([sys.executable, "-m", "scoring", "--out", "x.txt"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_console_script_fashion_score(capsys) -> None:  # type: ignore[no-untyped-def]
    """pyproject declares `fashion-score`; its entry point returns the exit code (2 for usage errors)."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fashion-score"] == "scoring.__main__:main"
    module, _, name = scripts["fashion-score"].partition(":")
    entry = getattr(importlib.import_module(module), name)
    assert entry is main
    for argv in ([], ["--no-such-option"], ["--top-k", "0", str(ROOT / "pyproject.toml")]):
        assert entry(argv) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1 and "error:" in err and "(see --help)" in err, err
    with pytest.raises(SystemExit) as exited:  # argparse's --help exits 0 itself, as a console script wants
        entry(["--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("usage: python -m scoring ")


def test_summary_reads_well() -> None:
    stats = outputs.Stats(CLASSES)
    stats.add(outputs.Row("a", np.eye(10, dtype=np.float32)[3], truth=3))
    stats.add(outputs.Row("b", np.eye(10, dtype=np.float32)[3], truth=4))
    stats.add(outputs.Row("c", error="bad"))
    text = stats.summary(0.5, "test model")
    assert text.splitlines()[0] == "scored 2 images, 1 failed, in 0.50 s: 4 images/s (test model)"
    assert "accuracy 0.5000 (1/2 labelled images correct)" in text
    assert re.search(r"^  Dress +2 +1 +1\.0000$", text, re.M) and re.search(r"^  Coat +0 +1 +0\.0000$", text, re.M)
    assert text.splitlines()[-1] == "failed: c: bad"
    assert len(text.splitlines()) == 14  # count line, accuracy, table head, 10 classes, 1 failure


class FakeKeyedServer(http.server.BaseHTTPRequestHandler):
    """A stand-in for a server with API keys: 401 {"error"} without `Authorization: Bearer secret`."""

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        if self.headers.get("Authorization") == "Bearer secret":
            return True
        self._answer(401, {"error": "missing API key"})
        return False

    def do_GET(self) -> None:  # noqa: N802 - the handler's interface
        if self._authorised():
            self._answer(200, {"models": [{"name": "fake", "version": "7", "classes": CLASSES}]})

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        if self._authorised():
            rows = [{"index": i, "probabilities": np.eye(10)[i].tolist()} for i in range(3)]
            self._answer(200, {"results": rows})

    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass


def test_url_sends_the_api_key(capsys, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    np.save(tmp_path / "a.npy", np.zeros((3, 28, 28), np.uint8))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeKeyedServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        monkeypatch.delenv("FASHION_SERVE_API_KEY", raising=False)
        code = main([str(tmp_path / "a.npy"), "--url", url, "--quiet"])
        err = capsys.readouterr().err
        assert code == 1
        assert err.strip() == f"error: cannot use the server at {url}: server answered 401: missing API key"

        code = main([str(tmp_path / "a.npy"), "--url", url, "--api-key", "secret", "--quiet"])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert [json.loads(line)["class_id"] for line in out.splitlines()] == [0, 1, 2]
        assert f"(fake version 7 at {url})" in err

        monkeypatch.setenv("FASHION_SERVE_API_KEY", "secret,older-key")  # the server's variable: its first key
        assert main([str(tmp_path / "a.npy"), "--url", url, "--quiet"]) == 0
        capsys.readouterr()
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_labels_beside_images_in_a_folder_label_them(capsys, tmp_path, test_split) -> None:  # type: ignore[no-untyped-def]
    """A folder with images.npy and labels.npy (as examples/ has): the labels are read with the images,
    never scored as an input of their own."""
    np.save(tmp_path / "images.npy", test_split.images[:10])
    np.save(tmp_path / "labels.npy", test_split.labels[:10].astype(np.int64))
    code, out, err = run(capsys, tmp_path, "--out", "-")
    assert code == 0, err
    assert len(out.splitlines()) == 10 and "labels.npy" not in out
    assert "10 images, 0 failed" in err and "/10 labelled images correct)" in err
    assert "skipped" not in err
