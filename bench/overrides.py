"""Ablations and trials as the service's own settings: `--set NAME=VALUE` (repeatable).

Each NAME must be a field of service.settings.Settings and each VALUE valid for it, checked before
anything starts: a misspelt name is an error, never a run that silently measures the default. For a
server process NAME=VALUE becomes FASHION_SERVE_NAME=VALUE; in-process, Settings(name=value). E.g.

    --set inline_decode_max_bytes=0     every image decoded in a worker thread
    --set batch_max_size=1              no batching across requests
    --set graph_optimization=basic      less of onnxruntime's graph optimisation
"""

from __future__ import annotations

from pydantic import ValidationError

from service.settings import ENV_PREFIX, Settings

# What the benchmark itself chooses (where to listen, which model): its own options, not settings.
RESERVED = {
    "host": "the benchmark picks the address",
    "port": "the benchmark picks free ports",
    "models": "use --models",
    "model": "use --model",
    "model_version": "the benchmark serves the highest version",
    "api_key": "the load generator sends no key (every request would be a 401)",
}


class SettingError(ValueError):
    pass


def parse(items: list[str]) -> dict[str, str]:
    """["name=value", ...] -> {name: value}, each name a Settings field (any case) and each value valid."""
    fields = set(Settings.model_fields)
    found: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if not sep or not name:
            raise SettingError(f"--set {item!r}: expected NAME=VALUE")
        if name.upper().startswith(ENV_PREFIX):
            name = name[len(ENV_PREFIX) :]
        if name not in fields:
            known = ", ".join(sorted(fields - set(RESERVED)))
            raise SettingError(f"--set {item!r}: no setting {name!r}; settings: {known}")
        if name in RESERVED:
            raise SettingError(f"--set {item!r}: {RESERVED[name]}")
        found[name] = value
    try:
        Settings.model_validate(found)  # strings, validated and converted as the environment's are
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SettingError(f"--set: invalid value: {problems}") from None
    return found


def environment(settings: dict[str, str]) -> dict[str, str]:
    """{name: value} -> the server's environment variables."""
    return {f"{ENV_PREFIX}{name.upper()}": value for name, value in settings.items()}


def describe(settings: dict[str, str]) -> str:
    return ",".join(f"{name}={value}" for name, value in settings.items()) or "defaults"
