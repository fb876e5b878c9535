"""The process tier's fixture: one real server shared by the tests that only read from it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import running_server


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `python -m service` process on a free port, polled until ready; its output is in the
    live_server temporary folder."""
    with running_server(tmp_path_factory.mktemp("live_server")) as server:
        yield server.url
