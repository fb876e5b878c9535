"""Reading the real Fashion-MNIST files, and a clear error for each kind of damage."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from training import data
from training.data import DataError


def test_real_files_load_with_expected_shapes_and_split() -> None:
    ds = data.load(download=False, validation_size=5_000, seed=0)
    assert ds.train.images.shape == (55_000, 28, 28) and ds.train.images.dtype == np.uint8
    assert ds.validation.images.shape == (5_000, 28, 28)
    assert ds.test.images.shape == (10_000, 28, 28)
    assert set(np.unique(ds.test.labels)) == set(range(10))
    assert np.bincount(ds.test.labels).tolist() == [1000] * 10  # the test set is balanced
    assert set(ds.sha256) == set(data.FILES.values())


def test_validation_split_is_fixed_by_seed_and_disjoint_from_training() -> None:
    a = data.load(download=False, seed=0)
    b = data.load(download=False, seed=0)
    c = data.load(download=False, seed=1)
    assert np.array_equal(a.validation.images, b.validation.images)
    assert not np.array_equal(a.validation.images, c.validation.images)
    # 60,000 rows split without overlap: every original row lands in exactly one part.
    full = data.load_split(data.find_data_dir(download=False), "train")
    assert len(a.train.labels) + len(a.validation.labels) == len(full.labels)
    assert (
        np.bincount(np.concatenate([a.train.labels, a.validation.labels])).tolist() == np.bincount(full.labels).tolist()
    )


def test_debian_payload_matches_the_canonical_content_hashes() -> None:
    folder = data.find_data_dir(download=False)
    for name, digest in data.CONTENT_SHA256.items():
        assert data.content_sha256(folder / name) == digest


def _copy_data(tmp_path: Path) -> Path:
    src = data.find_data_dir(download=False)
    for name in data.FILES.values():
        shutil.copy(src / name, tmp_path / name)
    return tmp_path


def _rewrite(path: Path, payload: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(payload)


def test_explicit_folder_is_used_first(tmp_path: Path) -> None:
    folder = _copy_data(tmp_path)
    assert data.find_data_dir(folder, download=False) == folder
    assert len(data.load_test(folder).labels) == 10_000


def test_environment_variable_is_searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _copy_data(tmp_path)
    monkeypatch.setenv(data.ENV_VAR, str(folder))
    assert data.candidate_dirs()[0] == folder


def test_missing_files_in_explicit_folder_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        data.find_data_dir(tmp_path, download=False)


def test_nothing_found_without_download_says_where_it_looked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "a")
    monkeypatch.setattr(data, "KERAS_CACHE", tmp_path / "b")
    monkeypatch.setattr(data, "DOWNLOAD_CACHE", tmp_path / "c")
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        data.find_data_dir(download=False)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncated_gzip", "not a readable gzip file"),
        ("not_gzip", "not a readable gzip file"),
        ("bad_magic", "bad magic number"),
        ("short_data", "data bytes, expected"),
        ("wrong_count", "holds 9999 items, expected 10000"),
        ("wrong_size", "images are 32x32"),
        ("empty", "too short for an IDX header"),
    ],
)
def test_corrupt_image_file_gives_a_clear_error(tmp_path: Path, damage: str, message: str) -> None:
    folder = _copy_data(tmp_path)
    path = folder / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    if damage == "truncated_gzip":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif damage == "not_gzip":
        path.write_bytes(b"hello, not a gzip file")
    elif damage == "bad_magic":
        _rewrite(path, struct.pack(">i", 1234) + raw[4:])
    elif damage == "short_data":
        _rewrite(path, raw[:-100])
    elif damage == "wrong_count":
        _rewrite(path, raw[:4] + struct.pack(">i", 9999) + raw[8:16] + raw[16 : 16 + 9999 * 784])
    elif damage == "wrong_size":
        _rewrite(path, raw[:8] + struct.pack(">ii", 32, 32) + raw[16:])
    elif damage == "empty":
        _rewrite(path, b"")
    with pytest.raises(DataError, match=message) as info:
        data.load_test(folder)
    assert "t10k-images-idx3-ubyte.gz" in str(info.value)


def test_labels_out_of_range_are_rejected(tmp_path: Path) -> None:
    folder = _copy_data(tmp_path)
    path = folder / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[8] = 42
    _rewrite(path, bytes(raw))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: label 42 out of range"):
        data.load_test(folder)


def test_download_verifies_and_writes_atomically(tmp_path: Path) -> None:
    """The download path against a local file:// mirror (tests never reach the internet)."""
    (tmp_path / "mirror").mkdir()
    mirror = _copy_data(tmp_path / "mirror")
    dest = tmp_path / "cache"
    data.download_files(dest, base_url=mirror.as_uri() + "/")
    assert sorted(p.name for p in dest.iterdir()) == sorted(data.FILES.values())  # no temp files left
    # A mirror serving damaged data is refused and leaves nothing behind.
    bad = tmp_path / "bad"
    bad.mkdir()
    _rewrite(bad / "t10k-labels-idx1-ubyte.gz", b"\x00" * 10)
    dest2 = tmp_path / "cache2"
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: downloaded data has SHA-256"):
        data.download_files(dest2, base_url=bad.as_uri() + "/", names=["t10k-labels-idx1-ubyte.gz"])
    assert list(dest2.iterdir()) == []
