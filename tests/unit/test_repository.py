"""The model repository's pure parts: version policies (the setting's and config.json's forms), what a scan
finds, the fingerprint that tells a version's files changed, the API's state shared between workers, the
statistics Triton's client reads, and what a request gets when there is no model to answer it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from service.errors import NotFound, NotReady
from service.repository import (
    Control,
    Table,
    VersionPolicy,
    VersionStats,
    fingerprint,
    read_config,
    scan_repository,
)

# ------------------------------------------------------------------------------------ policies


@pytest.mark.parametrize(
    ("text", "policy"),
    [
        ("latest", VersionPolicy("latest", 1)),
        ("latest:3", VersionPolicy("latest", 3)),
        ("all", VersionPolicy("all")),
        ("specific:1,3", VersionPolicy("specific", versions=("1", "3"))),
    ],
)
def test_the_settings_form_of_a_policy(text: str, policy: VersionPolicy) -> None:
    assert VersionPolicy.parse(text) == policy
    assert VersionPolicy.parse(str(policy)) == policy  # what the API's state file stores


@pytest.mark.parametrize("text", ["latest:0", "latest:x", "oldest", "all:2", "specific", "specific:"])
def test_a_bad_policy_in_the_settings_form_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        VersionPolicy.parse(text)


@pytest.mark.parametrize(
    ("raw", "policy"),
    [
        ({"latest": 2}, VersionPolicy("latest", 2)),  # TF Serving's short form
        ({"latest": {"num_versions": 2}}, VersionPolicy("latest", 2)),  # Triton's
        ("all", VersionPolicy("all")),
        ({"all": {}}, VersionPolicy("all")),
        ({"specific": ["1", "3"]}, VersionPolicy("specific", versions=("1", "3"))),
        ({"specific": {"versions": [1, 3]}}, VersionPolicy("specific", versions=("1", "3"))),
        ("latest:4", VersionPolicy("latest", 4)),
    ],
)
def test_the_config_forms_of_a_policy(raw: object, policy: VersionPolicy) -> None:
    assert VersionPolicy.from_config(raw) == policy


@pytest.mark.parametrize(
    "raw",
    [
        {"latest": 0},
        {"latest": "2"},
        {"latest": True},
        {"oldest": 1},
        {"latest": 1, "all": {}},
        {"specific": []},
        {"specific": "1"},
        {"specific": [1.5]},
        [],
        7,
    ],
)
def test_a_bad_config_policy_says_what_is_wrong(raw: object) -> None:
    with pytest.raises(ValueError, match=r"latest|all|specific|version"):
        VersionPolicy.from_config(raw)


def test_policies_choose_from_the_versions_highest_first() -> None:
    available = ["10", "2", "1"]
    assert VersionPolicy("latest", 1).choose(available) == ["10"]
    assert VersionPolicy("latest", 2).choose(available) == ["10", "2"]
    assert VersionPolicy("latest", 5).choose(available) == available
    assert VersionPolicy("all").choose(available) == available
    specific = VersionPolicy("specific", versions=("1", "3"))
    assert specific.choose(available) == ["1"]
    assert specific.missing(available) == ["3"]
    assert VersionPolicy("latest", 1).choose([]) == []


def test_config_json(tmp_path: Path) -> None:
    assert read_config(tmp_path) is None  # none: the setting's policy applies
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"description": "no policy here"}))
    assert read_config(tmp_path) is None
    config.write_text(json.dumps({"version_policy": {"latest": 2}}))
    assert read_config(tmp_path) == VersionPolicy("latest", 2)
    config.write_text("{ not json")
    with pytest.raises(ValueError, match=r"config\.json: not JSON"):
        read_config(tmp_path)
    config.write_text(json.dumps({"version_policy": {"newest": 1}}))
    with pytest.raises(ValueError, match=r"config\.json: unknown version policy 'newest'"):
        read_config(tmp_path)


# ----------------------------------------------------------------------------------- scanning


def _version(root: Path, name: str, version: str, card: str = "{}") -> Path:
    folder = root / name / version
    folder.mkdir(parents=True)
    (folder / "card.json").write_text(card)
    (folder / "model.onnx").write_bytes(b"graph")
    return folder


def test_a_scan_finds_models_and_versions_highest_first(tmp_path: Path) -> None:
    for version in ("1", "2", "10"):
        _version(tmp_path, "a", version)
    _version(tmp_path, "b", "1")
    (tmp_path / "a" / "notes").mkdir()  # no card.json: not a version
    _version(tmp_path, "a", ".11-copying")  # hidden: copy in under a dot name, then rename
    _version(tmp_path, ".staging", "1")
    (tmp_path / "b" / "config.json").write_text('{"version_policy": "all"}')
    (tmp_path / "c").mkdir()  # a model folder with no version yet
    scans = scan_repository(tmp_path)
    assert list(scans) == ["a", "b", "c"]
    assert list(scans["a"].versions) == ["10", "2", "1"]
    assert scans["a"].policy is None and scans["b"].policy == VersionPolicy("all")
    assert scans["c"].versions == {}
    assert list(scan_repository(tmp_path, ["b", "gone"])) == ["b", "gone"]
    assert scan_repository(tmp_path, ["gone"])["gone"].versions == {}
    (tmp_path / "b" / "config.json").write_text("[")
    assert "not JSON" in (scan_repository(tmp_path, ["b"])["b"].config_error or "")
    with pytest.raises(OSError):  # an unreadable repository is not an empty one: nothing gets unloaded
        scan_repository(tmp_path / "unmounted")


def test_the_fingerprint_changes_with_any_change_to_the_files(tmp_path: Path) -> None:
    folder = _version(tmp_path, "m", "1")
    model = folder / "model.onnx"
    first = fingerprint(folder)
    assert fingerprint(folder) == first  # nothing changed, nothing to do
    assert [entry[0] for entry in first] == ["card.json", "model.onnx"]

    time.sleep(0.02)  # past the file system's timestamp granularity
    model.write_bytes(b"graph, longer")
    assert fingerprint(folder) != first

    # Rewritten in place with the same size and its old modification time put back (cp -p, copy2): the
    # change time still moves.
    before = fingerprint(folder)
    stat = model.stat()
    time.sleep(0.02)
    model.write_bytes(b"GRAPH, LONGER")
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = fingerprint(folder)
    assert after != before
    assert [e[1:3] for e in after] == [e[1:3] for e in before]  # sizes and mtimes alone would miss it

    # Replaced by a rename (an atomic update): another inode.
    before = fingerprint(folder)
    (folder / "new.onnx").write_bytes(b"GRAPH, LONGER")
    os.utime(folder / "new.onnx", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(folder / "new.onnx", model)
    assert fingerprint(folder) != before

    before = fingerprint(folder)
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("x")
    assert fingerprint(folder) != before
    (folder / "extra" / "notes.txt").unlink()
    assert fingerprint(folder) == before  # an empty folder is no file


# -------------------------------------------------------------------------------- the API's state


def test_workers_share_what_the_api_asked_through_the_state_file(tmp_path: Path) -> None:
    Control.reset(tmp_path)
    first, second = Control(tmp_path), Control(tmp_path)  # two workers
    assert first.refresh() == set() and second.refresh() == set()

    first.change("m", unloaded=True, policy=None)
    assert first.unloaded == {"m"}
    assert second.refresh() == {"m"} and second.unloaded == {"m"}
    second.acted_on({"m"})
    assert second.refresh() == set()

    # A load with a policy: the other worker sees both; its own change leaves it pending until acted on.
    second.change("m", unloaded=False, policy=VersionPolicy("specific", versions=("2",)))
    assert first.refresh() == {"m"} and first.unloaded == set()
    assert first.policies == {"m": VersionPolicy("specific", versions=("2",))}
    first.acted_on({"m"})
    assert second.refresh() == {"m"}
    second.acted_on({"m"})

    # Two workers changing different models: neither misses the other's.
    first.change("a", unloaded=True, policy=None)
    second.change("b", unloaded=True, policy=None)
    assert first.refresh() >= {"b"} and second.refresh() >= {"a"}
    assert first.unloaded == second.unloaded == {"a", "b"}

    # A worker started later (or restarted) reads what was asked before it.
    late = Control(tmp_path)
    late.refresh()
    assert late.unloaded == {"a", "b"} and late.policies == {"m": VersionPolicy("specific", versions=("2",))}
    Control.reset(tmp_path)  # a new run starts with nothing asked
    fresh = Control(tmp_path)
    fresh.refresh()
    assert fresh.unloaded == set() and fresh.policies == {}


def test_without_a_shared_folder_the_state_is_this_process_s(tmp_path: Path) -> None:
    control = Control(None)
    control.change("m", unloaded=True, policy=None)
    assert control.unloaded == {"m"} and control.refresh() == {"m"}
    control.acted_on({"m"})
    assert control.refresh() == set()
    control.change("m", unloaded=False, policy=VersionPolicy("all"))
    assert control.unloaded == set() and control.policies["m"] == VersionPolicy("all")
    assert list(tmp_path.iterdir()) == []


def test_a_broken_state_file_counts_as_empty(tmp_path: Path) -> None:
    Control.reset(tmp_path)
    (tmp_path / "repository-state.json").write_text("{ broken")
    control = Control(tmp_path)
    assert control.refresh() == set() and control.unloaded == set()
    control.change("m", unloaded=True, policy=None)  # and is written whole again
    assert json.loads((tmp_path / "repository-state.json").read_text())["models"]["m"]["unloaded"] is True


# ------------------------------------------------------------------------- statistics and routing


def test_statistics_in_triton_s_shape() -> None:
    stats = VersionStats()
    stats.observe(3, [0.001, 0.002, 0.0], 0.004)
    stats.observe(1, [0.0005], 0.002)
    body = stats.triton("m", "2")
    assert (body["name"], body["version"]) == ("m", "2")
    assert body["inference_count"] == 4 and body["execution_count"] == 2
    success = body["inference_stats"]["success"]
    assert success["count"] == 4
    assert body["inference_stats"]["queue"] == {"count": 4, "ns": 3_500_000}
    assert body["inference_stats"]["compute_infer"] == {"count": 4, "ns": 3 * 4_000_000 + 2_000_000}
    assert success["ns"] == 3_500_000 + 14_000_000
    assert [b["batch_size"] for b in body["batch_stats"]] == [1, 3]
    assert body["batch_stats"][1]["compute_infer"] == {"count": 1, "ns": 4_000_000}
    assert body["last_inference"] > 0
    assert set(body["inference_stats"]) >= {"success", "fail", "queue", "compute_input", "compute_infer"}


def test_what_a_request_gets_when_no_model_can_answer_it() -> None:
    closed = Table()
    assert isinstance(closed.missing_default(), NotReady) and isinstance(closed.unknown("m"), NotReady)
    empty = Table(open=True)
    assert isinstance(empty.missing_default(), NotReady) and not empty.ready()
    named = Table(default_name="m", known=("m",), open=True)
    assert "'m' is not loaded" in named.missing_default().message
    served: dict = {"a": {}, "b": {}}
    several = Table(served, known=("a", "b", "c"), open=True)
    error = several.missing_default()
    assert isinstance(error, NotFound) and "several are served (a, b)" in error.message
    assert "not loaded" in several.unknown("c").message  # in the repository, not loaded
    assert "unknown model 'z'" in several.unknown("z").message
