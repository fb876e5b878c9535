"""python -m scoring --url against a real server process: the same answers as in process."""

from __future__ import annotations

import numpy as np

from tests.support import accuracy_line, read_jsonl, write_class_folders
from tests.support import run_score as run


def test_url_gives_the_same_answers_as_in_process(capsys, tmp_path, test_split, live_server) -> None:  # type: ignore[no-untyped-def]
    images, labels = test_split.images[:30], test_split.labels[:30]
    write_class_folders(tmp_path / "data", images[:20], labels[:20])
    (tmp_path / "data" / "broken.png").write_bytes(b"not an image at all")
    np.savez(tmp_path / "rest.npz", images=images[20:], labels=labels[20:])
    inputs = [tmp_path / "data", tmp_path / "rest.npz"]
    # A batch size that splits both the images and the array into several requests; the broken file is
    # reported, and accepted as a failure.
    options = ("--batch-size", "7", "--allow-failures")
    code, _, err_local = run(capsys, *inputs, "--out", tmp_path / "local.jsonl", *options)
    assert code == 0, err_local
    code, _, err_remote = run(capsys, *inputs, "--out", tmp_path / "remote.jsonl", *options, "--url", live_server)
    assert code == 0, err_remote
    local, remote = read_jsonl(tmp_path / "local.jsonl"), read_jsonl(tmp_path / "remote.jsonl")
    assert len(local) == len(remote) == 31
    for a, b in zip(local, remote, strict=True):
        assert (a["source"], a["label"], a["true_label"]) == (b["source"], b["label"], b["true_label"])
        if a["error"]:
            assert b["error"] and b["probabilities"] is None
            continue
        np.testing.assert_allclose(a["probabilities"], b["probabilities"], atol=1e-6)
    assert live_server in err_remote
    assert accuracy_line(err_local) == accuracy_line(err_remote)
