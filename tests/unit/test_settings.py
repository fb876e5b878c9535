"""Settings: from arguments and FASHION_SERVE_* variables, and the worker count from the usable cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def test_default_workers_are_one_per_usable_core(tmp_path: Path) -> None:
    from service.settings import Settings, usable_cores, worker_count

    affinity = len(os.sched_getaffinity(0))
    assert worker_count(Settings(workers=0)) == usable_cores() >= 1
    assert worker_count(Settings(workers=3)) == 3
    cpu_max = tmp_path / "cpu.max"
    assert usable_cores(cpu_max) == affinity  # no cgroup file: the affinity mask
    cpu_max.write_text("max 100000\n")
    assert usable_cores(cpu_max) == affinity
    cpu_max.write_text("150000 100000\n")  # docker --cpus 1.5
    assert usable_cores(cpu_max) == min(affinity, 2)
    cpu_max.write_text("50000 100000\n")
    assert usable_cores(cpu_max) == 1


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from service.settings import Settings

    monkeypatch.setenv("FASHION_SERVE_PORT", "9001")
    monkeypatch.setenv("fashion_serve_workers", "3")  # names in any case, as pydantic-settings read them
    monkeypatch.setenv("FASHION_SERVE_PROVIDERS", "CUDA, cpu")  # comma-separated, not JSON
    monkeypatch.setenv("FASHION_SERVE_API_KEY", "k1,k2")
    monkeypatch.setenv("FASHION_SERVE_NO_SUCH_SETTING", "x")  # ignored, as before
    settings = Settings(port=9002)
    assert settings.port == 9002  # arguments over the environment
    assert settings.workers == 3 and settings.providers == ["cuda", "cpu"]
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "k1,k2"
    assert Settings().port == 9001
    monkeypatch.setenv("FASHION_SERVE_BATCH_MAX_SIZE", "0")
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert caught.value.errors()[0]["loc"] == ("batch_max_size",)
