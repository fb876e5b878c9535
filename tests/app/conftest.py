"""The app tier's fixture: the app in-process, through its real lifespan."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.support import make_settings


@pytest.fixture(scope="session")
def client() -> Iterator[TestClient]:
    """The app in-process, model loaded through its real lifespan; shared by read-only tests."""
    with TestClient(create_app(make_settings()), raise_server_exceptions=False) as c:
        yield c
