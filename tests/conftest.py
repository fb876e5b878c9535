"""Shared fixtures (the real test set, onnxruntime on the committed model) and the tiers.

Each folder under tests/ is one tier, and every test in it gets that tier's marker (registered and described
in pyproject.toml): `pytest -m unit` runs tests/unit, `pytest -m "not container"` everything but Docker.
A test file outside the tier folders is an error. With -m, a tier folder whose marker rules all its tests
out is not even imported (tests/training would import TensorFlow only to be deselected). Helpers that are
not fixtures are in tests/support.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import pytest

from tests.support import model_folder
from training.data import Split, load_test

TIERS = ("unit", "app", "process", "container", "training")
HERE = Path(__file__).resolve().parent


def tier_of(path: Path) -> str | None:
    """The tier folder `path` is in; None for anything not under tests/."""
    try:
        parts = path.resolve().relative_to(HERE).parts
    except ValueError:
        return None
    return parts[0] if len(parts) > 1 else ""


def could_match(expression: str, tier: str) -> bool:
    """Whether a test in `tier` could satisfy the -m `expression`, whatever its other markers are."""
    try:
        from _pytest.mark.expression import Expression  # pytest's own parser; private, hence the fallback

        compiled = Expression.compile(expression)
    except Exception:
        return True  # collect as usual: pytest reports a bad expression itself
    others: list[tuple[str, tuple[tuple[str, object], ...]]] = []  # other markers the expression asks about

    def matcher(assignment: dict[tuple[str, tuple[tuple[str, object], ...]], bool]) -> Callable[..., bool]:
        def match(name: str, /, **kwargs: object) -> bool:
            if name in TIERS and not kwargs:
                return name == tier
            key = (name, tuple(sorted(kwargs.items())))
            if key not in assignment and key not in others:
                others.append(key)
            return assignment.get(key, False)

        return match

    while len(others) <= 8:  # every combination of the other markers found so far
        known = len(others)
        for values in itertools.product((False, True), repeat=known):
            if compiled.evaluate(matcher(dict(zip(others, values, strict=True)))):
                return True
        if len(others) == known:
            return False
    return True


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    expression = config.getoption("markexpr")
    if not expression or collection_path.parent != HERE or collection_path.name not in TIERS:
        return None
    return None if could_match(expression, collection_path.name) else True


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = tier_of(item.path)
        if tier is None:
            continue
        if tier not in TIERS:
            folders = ", ".join(f"tests/{t}/" for t in TIERS)
            raise pytest.UsageError(f"{item.nodeid}: every test belongs in one tier folder: {folders}")
        item.add_marker(tier)


@pytest.fixture(scope="session")
def test_split() -> Split:
    return load_test()


@pytest.fixture(scope="session")
def reference_session() -> ort.InferenceSession:
    """onnxruntime run directly on the committed model: what every answer must equal."""
    return ort.InferenceSession(str(model_folder() / "model.onnx"), providers=["CPUExecutionProvider"])
