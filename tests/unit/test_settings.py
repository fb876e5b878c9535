"""Settings: from arguments and FASHION_SERVE_* variables (mistyped ones refused, *_FILE read), the flags and
the README's table made from the same fields, and the worker count from the usable cores."""

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
    settings = Settings(port=9002)
    assert settings.port == 9002  # arguments over the environment
    assert settings.workers == 3 and settings.providers == ["cuda", "cpu"]
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "k1,k2"
    assert Settings().port == 9001
    monkeypatch.setenv("FASHION_SERVE_BATCH_MAX_SIZE", "0")
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert caught.value.errors()[0]["loc"] == ("batch_max_size",)


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No FASHION_SERVE_* variable from the caller's shell."""
    for key in list(os.environ):
        if key.upper().startswith("FASHION_SERVE_"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_a_mistyped_variable_is_an_error_naming_the_real_one(clean_environment: pytest.MonkeyPatch) -> None:
    from service.settings import NOT_SETTINGS, Settings, SettingsError

    clean_environment.setenv("FASHION_SERVE_APIKEY", "s3cret")
    with pytest.raises(
        SettingsError, match=r"unknown setting FASHION_SERVE_APIKEY: did you mean FASHION_SERVE_API_KEY\?"
    ):
        Settings()
    clean_environment.delenv("FASHION_SERVE_APIKEY")
    clean_environment.setenv("fashion_serve_batch_max_sise", "16")
    with pytest.raises(SettingsError, match="did you mean FASHION_SERVE_BATCH_MAX_SIZE"):
        Settings()
    clean_environment.delenv("fashion_serve_batch_max_sise")
    clean_environment.setenv("FASHION_SERVE_ZZZZZZZZ", "1")
    with pytest.raises(SettingsError, match="unknown setting FASHION_SERVE_ZZZZZZZZ: \\(every setting"):
        Settings()
    clean_environment.delenv("FASHION_SERVE_ZZZZZZZZ")
    # docker-compose's own variables are known, not settings: they pass.
    for name in NOT_SETTINGS:
        clean_environment.setenv(f"FASHION_SERVE_{name}", "x")
    assert Settings().port == 8000


def test_a_setting_can_come_from_a_file(clean_environment: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from service.settings import Settings, SettingsError

    secret = tmp_path / "api_key"
    secret.write_text("from-a-secret\n")
    clean_environment.setenv("FASHION_SERVE_API_KEY_FILE", str(secret))
    settings = Settings()
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "from-a-secret"
    clean_environment.setenv("FASHION_SERVE_API_KEY", "other")
    with pytest.raises(SettingsError, match="both .* one way only"):
        Settings()
    clean_environment.delenv("FASHION_SERVE_API_KEY")
    clean_environment.setenv("FASHION_SERVE_API_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(SettingsError, match=r"FASHION_SERVE_API_KEY_FILE=.*missing: cannot read the file"):
        Settings()
    clean_environment.setenv("FASHION_SERVE_PORT_FILE", str(secret))  # any setting: then validated as usual
    clean_environment.delenv("FASHION_SERVE_API_KEY_FILE")
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        Settings()


def test_every_setting_is_a_documented_flag(clean_environment: pytest.MonkeyPatch) -> None:
    import argparse

    from service.__main__ import Parser, parse_args, use_flags
    from service.settings import Settings, add_arguments, setting_docs

    parser = Parser()
    add_arguments(parser)
    flags = {action.dest: action for action in parser._actions if action.option_strings}
    for name, field in Settings.model_fields.items():
        assert field.description, f"setting {name} has no description: add Field(..., description=...)"
        assert name in flags, name
        assert f"FASHION_SERVE_{name.upper()}" in flags[name].help and "default:" in flags[name].help
    assert [d.name for d in setting_docs()] == list(Settings.model_fields)
    # The flags the issue found missing work, and reach the settings through the environment.
    given = parse_args(["--batch-max-size", "16", "--strict-providers", "--max-in-flight", "7", "--port", "9"])
    assert given == {"batch_max_size": "16", "strict_providers": "true", "max_in_flight": "7", "port": "9"}
    clean_environment.setenv("fashion_serve_port", "1234")  # another spelling of the same variable gives way
    for name in given:  # registered with monkeypatch first, so that what use_flags writes is undone afterwards
        clean_environment.setenv(f"FASHION_SERVE_{name.upper()}", "")
    use_flags(given)
    settings = Settings()
    assert (settings.batch_max_size, settings.strict_providers, settings.max_in_flight, settings.port) == (
        16,
        True,
        7,
        9,
    )
    with pytest.raises(SystemExit):
        parse_args(["--batch-max-sise", "16"])
    assert isinstance(parser, argparse.ArgumentParser)


def test_a_field_added_later_is_a_flag_a_variable_and_a_row(clean_environment: pytest.MonkeyPatch) -> None:
    """What the other settings' authors rely on: add a field, and everything else follows."""
    import argparse

    from pydantic import Field

    from service.settings import Settings, add_arguments, environment_values, settings_table

    class Later(Settings):
        poll_interval_s: float = Field(5.0, ge=0, description="How often to look for new versions.")

    parser = argparse.ArgumentParser()
    add_arguments(parser, Later)
    assert parser.parse_args(["--poll-interval-s", "2"]).poll_interval_s == "2"
    assert "| `--poll-interval-s` | `FASHION_SERVE_POLL_INTERVAL_S` | 5 | How often" in settings_table(Later)
    assert environment_values({"FASHION_SERVE_POLL_INTERVAL_S": "3"}, Later) == {"poll_interval_s": "3"}


def test_the_readme_table_is_the_generated_one() -> None:
    from service.settings import settings_table
    from tests.support import ROOT

    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- settings-table: start -->\n", "<!-- settings-table: end -->"
    assert start in readme and end in readme, "README.md lost its settings-table markers"
    table = readme.split(start, 1)[1].split(end, 1)[0]
    assert table == settings_table(), "README.md's settings table is out of date: run `make readme`"
