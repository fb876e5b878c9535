"""The model repository: which models and versions are served, and how they change without dropping a request.

Every model under the repository folder (`<name>/<version>/card.json`) is served, each with the versions its
version policy chooses: `latest:N` (the default, N = 1), `all`, or `specific:V1,V2`, from the model's own
`config.json` (`{"version_policy": {"latest": 2}}`), else the `version_policy` setting. A version is named by
its folder; so is a model.

Each loaded version is a `Served`: its Model (sessions verified against the card's SHA-256 and warmed up),
its own Batcher, the count of requests inside it, and its statistics. The routing table (`Table`) is an
immutable snapshot the request path reads without a lock: a change builds a new table and swaps it in one
assignment. What changes it:

* polling (`poll_interval_s`) and the repository API (`load`, `unload`, modelled on Triton's);
* a version is loaded, verified and warmed in a worker thread, then swapped in; the version it replaces
  stops taking new requests, and is released (its batcher stopped, the repository's reference to its model
  dropped) only once its in-flight count is zero;
* a version that fails to load changes nothing that is served: its failure (and the fingerprint of its
  files) is kept, reported by the index, the log and a metric, and tried again when its files change;
* while any version a policy wants is failing, no version of that model is retired.

With several worker processes, each has its own repository. Polling converges by itself; what the API asks
is written to a small state file in a folder the workers share (`repository_state_dir`), which each worker
reads every STATE_WATCH_S.

Framework-free: no FastAPI or Starlette here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from service.batching import Batcher
from service.errors import BadInput, ModelLoadError, NotFound, NotReady, ServiceError
from service.model import PREFERRED_DEFAULT, Model, version_key
from service.settings import Settings

log = logging.getLogger("service.repository")

CONFIG_FILE = "config.json"
STATE_FILE = "repository-state.json"
STATE_WATCH_S = 0.5  # how often each worker reads the shared state file (when there is one)
INPUT_SHAPE = (28, 28, 1)  # what the data plane feeds every model: float32 [N, 28, 28, 1]

# Triton's model states, as its repository index reports them.
READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"

Fingerprint = tuple[tuple[str, int, int, int, int], ...]


# --------------------------------------------------------------------------------- version policy


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model are served (TF Serving's and Triton's version policies)."""

    kind: str  # "latest", "all" or "specific"
    count: int = 1
    versions: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """The setting's form: `latest`, `latest:N`, `all`, `specific:V1,V2`."""
        kind, _, argument = text.strip().partition(":")
        if kind == "latest":
            return cls.latest(int(argument) if argument else 1)
        if kind == "all" and not argument:
            return cls("all")
        if kind == "specific" and argument:
            return cls.specific(argument.split(","))
        raise ValueError(f"unknown version policy {text!r}: latest:N, all or specific:V1,V2")

    @classmethod
    def latest(cls, count: object) -> VersionPolicy:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"latest needs a whole number of versions ≥ 1, got {count!r}")
        return cls("latest", count=count)

    @classmethod
    def specific(cls, versions: object) -> VersionPolicy:
        if not isinstance(versions, list) or not versions:
            raise ValueError(f"specific needs a list of versions, got {versions!r}")
        names = tuple(str(v).strip() for v in versions)
        if not all(names) or any(isinstance(v, bool | float | dict | list) for v in versions):
            raise ValueError(f"specific needs version names, got {versions!r}")
        return cls("specific", versions=names)

    @classmethod
    def from_config(cls, raw: object) -> VersionPolicy:
        """config.json's `version_policy`, in TF Serving's short form or Triton's: `{"latest": 2}` or
        `{"latest": {"num_versions": 2}}`; `"all"` or `{"all": {}}`; `{"specific": ["1", "3"]}` or
        `{"specific": {"versions": [1, 3]}}`. Raises ValueError saying what is wrong."""
        if raw == "all":
            return cls("all")
        if isinstance(raw, str):
            return cls.parse(raw)
        if not isinstance(raw, dict) or len(raw) != 1:
            raise ValueError(f"version_policy must have one of latest, all, specific; got {raw!r}")
        ((kind, value),) = raw.items()
        if kind == "latest":
            return cls.latest(value.get("num_versions") if isinstance(value, dict) else value)
        if kind == "all":
            return cls("all")
        if kind == "specific":
            return cls.specific(value.get("versions") if isinstance(value, dict) else value)
        raise ValueError(f"unknown version policy {kind!r}: latest, all or specific")

    def choose(self, available: Sequence[str]) -> list[str]:
        """The versions served out of `available` (highest first), highest first."""
        if self.kind == "latest":
            return list(available[: self.count])
        if self.kind == "all":
            return list(available)
        return [v for v in available if v in self.versions]

    def missing(self, available: Sequence[str]) -> list[str]:
        """Versions a specific policy names that are not in the repository."""
        return [v for v in self.versions if v not in available]

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest:{self.count}"
        return "all" if self.kind == "all" else "specific:" + ",".join(self.versions)


def read_config(model_dir: Path) -> VersionPolicy | None:
    """The version policy of a model's own config.json (None: it has none); ValueError when unreadable."""
    path = model_dir / CONFIG_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror})") from None
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f'{path}: expected an object such as {{"version_policy": {{"latest": 1}}}}')
    if "version_policy" not in raw:
        return None
    try:
        return VersionPolicy.from_config(raw["version_policy"])
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


# ------------------------------------------------------------------------------ the file system


def fingerprint(folder: Path) -> Fingerprint:
    """What tells that a version's files changed: each file's relative name, size, modification time, change
    time and inode. The change time and inode catch what names, sizes and modification times miss: a file
    rewritten in place with the same size and its old mtime restored (`cp -p`, `shutil.copy2`), or replaced
    by a rename."""
    entries = []
    for directory, subdirectories, files in os.walk(folder):
        subdirectories.sort()
        for name in files:
            path = os.path.join(directory, name)
            try:
                info = os.stat(path)
            except OSError:  # gone while we looked: the next scan sees the folder as it ends up
                continue
            entries.append(
                (os.path.relpath(path, folder), info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)
            )
    return tuple(sorted(entries))


@dataclass
class ModelScan:
    """One model folder as a scan found it."""

    name: str
    versions: dict[str, Fingerprint]  # version folders holding a card.json, highest first
    policy: VersionPolicy | None = None  # its config.json's; None: none (the setting's applies)
    config_error: str | None = None


def is_version(folder: Path) -> bool:
    return folder.is_dir() and not folder.name.startswith(".") and (folder / "card.json").is_file()


def scan_model(model_dir: Path) -> ModelScan:
    scan = ModelScan(model_dir.name, {})
    try:
        found = [p for p in model_dir.iterdir() if is_version(p)]
    except FileNotFoundError:  # removed (or never there): no versions; unreadable: the scan fails
        return scan
    for folder in sorted(found, key=lambda p: version_key(p.name), reverse=True):
        scan.versions[folder.name] = fingerprint(folder)
    try:
        scan.policy = read_config(model_dir)
    except ValueError as exc:
        scan.config_error = str(exc)
    return scan


def scan_repository(root: Path, names: Iterable[str] | None = None) -> dict[str, ModelScan]:
    """Every model folder under `root` (or only `names`), with its versions' fingerprints. Folders whose name
    starts with a dot are skipped (copy a version in under a hidden name, then rename it). Raises OSError
    when the repository itself cannot be read: an unmounted volume must not look like an empty repository."""
    if names is None:
        names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return {name: scan_model(root / name) for name in names}


# ------------------------------------------------------------------------------ what is served


@dataclass
class VersionStats:
    """Triton's statistics extension for one loaded version, from what its batcher reports. Per process."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    inference_count: int = 0  # images
    execution_count: int = 0  # session runs
    last_inference_ms: int = 0
    batches: dict[int, list[int]] = field(default_factory=dict)  # batch size -> [runs, ns]

    def observe(self, size: int, queue_seconds: list[float], run_seconds: float) -> None:
        """A batcher observer: one session run of `size` images for len(queue_seconds) callers."""
        callers, run_ns = len(queue_seconds), int(run_seconds * 1e9)
        queue_ns = int(sum(queue_seconds) * 1e9)
        self.success_count += callers
        self.success_ns += queue_ns + run_ns * callers
        self.queue_ns += queue_ns
        self.compute_ns += run_ns * callers
        self.inference_count += size
        self.execution_count += 1
        self.last_inference_ms = int(time.time() * 1000)
        entry = self.batches.setdefault(size, [0, 0])
        entry[0] += 1
        entry[1] += run_ns

    def triton(self, name: str, version: str) -> dict[str, Any]:
        """Triton's ModelStatistics object."""

        def duration(count: int, ns: int = 0) -> dict[str, int]:
            return {"count": count, "ns": ns}

        n = self.success_count
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": duration(n, self.success_ns),
                "fail": duration(self.fail_count),
                "queue": duration(n, self.queue_ns),
                "compute_input": duration(n),
                "compute_infer": duration(n, self.compute_ns),
                "compute_output": duration(n),
                "cache_hit": duration(0),
                "cache_miss": duration(0),
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": duration(runs),
                    "compute_infer": duration(runs, ns),
                    "compute_output": duration(runs),
                }
                for size, (runs, ns) in sorted(self.batches.items())
            ],
            "memory_usage": [],
        }


@dataclass(eq=False)
class Served:
    """One loaded version: its model, its batcher, the requests inside it, its statistics."""

    model: Model
    fingerprint: Fingerprint | None
    batcher: Batcher | None = None
    in_flight: int = 0
    state: str = READY
    # While it is retired: set when in_flight drops to zero (by DataPlane.infer).
    drained: asyncio.Event | None = None
    stats: VersionStats = field(default_factory=VersionStats)

    @property
    def key(self) -> tuple[str, str]:
        return self.model.name, self.model.version


@dataclass(frozen=True)
class Failure:
    """Why a version (or a model's config.json, version "") could not be loaded, and the fingerprint of the
    files that failed: the same files are not tried again by polling."""

    reason: str
    fingerprint: Fingerprint | None = None
    since: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Table:
    """The routing table: an immutable snapshot, replaced whole by one assignment (the atomic swap)."""

    versions: dict[str, dict[str, Served]] = field(default_factory=dict)  # name -> version -> served, highest first
    default: Served | None = None  # the default model's highest version
    default_name: str | None = None
    known: tuple[str, ...] = ()  # the models in the repository, served or not (for messages)
    open: bool = False

    def missing_default(self) -> ServiceError:
        """What a request for the default model gets when there is none to serve."""
        if not self.open:
            return NotReady("model not loaded yet")
        if self.default_name is not None:
            return NotReady(f"the default model {self.default_name!r} is not loaded")
        if not self.versions:
            return NotReady("no model loaded")
        names = ", ".join(self.versions)
        return NotFound(
            f"no default model: several are served ({names}); ask one by name, /v1/models/<name>/predict, "
            "or set default_model"
        )

    def unknown(self, name: str) -> ServiceError:
        if not self.open:
            return NotReady("model not loaded yet")
        if name in self.known:
            return NotFound(f"model {name!r} is not loaded (see POST /v2/repository/index)")
        return NotFound(f"unknown model {name!r}; serving {', '.join(self.versions) or 'none'}")

    def ready(self) -> bool:
        """The default model is ready; with no default, at least one model is."""
        if self.default_name is not None:
            served = self.default
            return served is not None and served.batcher is not None and served.model.ready
        return any(s.batcher is not None and s.model.ready for vs in self.versions.values() for s in vs.values())


class Observer(Protocol):
    """What the repository tells (service.metrics.Metrics is one)."""

    def batch_observer(self, model: str, version: str) -> Callable[[int, list[float], float], None]: ...

    def version_served(self, model: str, version: str, providers: list[str]) -> None: ...

    def version_released(self, model: str, version: str, providers: list[str]) -> None: ...

    def load_failed(self, model: str, version: str, reason: str) -> None: ...


# ---------------------------------------------------------------------------- the API's state


class Control:
    """What the repository API asked for: models unloaded, version policies given with a load, and a
    generation per model that each request moves on. With a folder (several workers), it lives in a JSON
    file there, changed under an exclusive lock and replaced atomically; each worker acts on the models
    whose generation moved past the one it last acted on. Without one, in this process only."""

    def __init__(self, folder: Path | None) -> None:
        self.path = folder / STATE_FILE if folder is not None else None
        self.unloaded: frozenset[str] = frozenset()
        self.policies: dict[str, VersionPolicy] = {}
        self.generations: dict[str, int] = {}
        self.applied: dict[str, int] = {}  # generation this process has acted on, per model
        self._stamp: tuple[int, int, int] | None = None

    @staticmethod
    def reset(folder: Path) -> None:
        """A new run starts with nothing asked (python -m service, before its workers start)."""
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(folder / STATE_FILE, {"models": {}})

    def change(self, name: str, *, unloaded: bool, policy: VersionPolicy | None) -> None:
        """Record a load (unloaded=False, with its policy or none) or an unload of `name`. Blocking: call
        it from a worker thread."""
        if self.path is None:
            raw = self._raw()
            self._update(raw, name, unloaded, policy)
            self._apply(raw)
            return
        import fcntl  # POSIX only, as the multi-worker server is

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            raw = self._read()
            self._update(raw, name, unloaded, policy)
            _write_atomically(self.path, raw)
            self._apply(raw)
            self._stamp = self._stat()

    def refresh(self) -> set[str]:
        """Re-read the shared file if it changed; the models whose requests this process has not acted on
        yet. Blocking: call it from a worker thread."""
        if self.path is not None:
            stamp = self._stat()
            if stamp != self._stamp:
                self._apply(self._read())
                self._stamp = stamp
        return {n for n, g in self.generations.items() if g > self.applied.get(n, 0)}

    def acted_on(self, names: Iterable[str]) -> None:
        for name in names:
            self.applied[name] = max(self.applied.get(name, 0), self.generations.get(name, 0))

    def _raw(self) -> dict[str, Any]:
        models: dict[str, Any] = {}
        for name, generation in self.generations.items():
            policy = self.policies.get(name)
            models[name] = {
                "unloaded": name in self.unloaded,
                "version_policy": str(policy) if policy else None,
                "generation": generation,
            }
        return {"models": models}

    @staticmethod
    def _update(raw: dict[str, Any], name: str, unloaded: bool, policy: VersionPolicy | None) -> None:
        entry = raw.setdefault("models", {}).setdefault(name, {"generation": 0})
        entry.update(unloaded=unloaded, version_policy=str(policy) if policy else None)
        entry["generation"] = int(entry.get("generation", 0)) + 1

    def _apply(self, raw: dict[str, Any]) -> None:
        models = raw.get("models") or {}
        policies = {}
        for name, entry in models.items():
            if entry.get("version_policy"):
                with contextlib.suppress(ValueError):
                    policies[name] = VersionPolicy.parse(entry["version_policy"])
        # New objects, assigned whole: readers in other threads see the old state or the new one.
        self.policies = policies
        self.unloaded = frozenset(n for n, e in models.items() if e.get("unloaded"))
        self.generations = {n: int(e.get("generation", 0)) for n, e in models.items()}

    def _read(self) -> dict[str, Any]:
        assert self.path is not None
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"models": {}}
        except ValueError:
            log.warning("%s: not JSON; taking it as empty", self.path)
            return {"models": {}}
        return raw if isinstance(raw, dict) else {"models": {}}

    def _stat(self) -> tuple[int, int, int] | None:
        assert self.path is not None
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return None
        return info.st_mtime_ns, info.st_size, info.st_ino


def _write_atomically(path: Path, raw: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(raw, indent=1, sort_keys=True))
    os.replace(temporary, path)


# -------------------------------------------------------------------------------- the repository


@dataclass
class Prepared:
    """A reconciliation worked out and its versions loaded, in a worker thread; not yet served."""

    scans: dict[str, ModelScan]
    full: bool  # the whole repository was scanned (models not found are gone)
    desired: dict[str, list[str] | None] = field(default_factory=dict)  # None: leave the model as it is
    loaded: dict[tuple[str, str], tuple[Model, Fingerprint]] = field(default_factory=dict)
    failures: dict[tuple[str, str], Failure] = field(default_factory=dict)


@dataclass
class Outcome:
    failures: dict[tuple[str, str], Failure]
    retiring: list[asyncio.Task[None]]


class Repository:
    """The models and versions served, and the changes to them (see the module's doc)."""

    def __init__(self, settings: Settings, model: Model | None = None, observers: list[Observer] | None = None) -> None:
        self.settings = settings
        self.root = settings.models
        self.observers: list[Observer] = observers if observers is not None else []
        self.default_policy = VersionPolicy.parse(settings.version_policy)
        self.fixed = model  # create_app(model=...): this model is served alone, no repository behind it
        self.table = Table()
        if model is not None:  # known (its card read) before it is loaded: metadata answers, inference 503s
            served = Served(model, None, state=READY if model.ready else LOADING)
            self.table = Table({model.name: {model.version: served}}, served, model.name, (model.name,))
        # Every version with a batcher, by id(model): the routing table's and those draining. DataPlane.infer
        # finds a request's version here (an id stays unique while the model it names is alive, and an entry
        # goes when its version is released).
        self.live: dict[int, Served] = {}
        self.control = Control(settings.repository_state_dir)
        self._failures: dict[tuple[str, str], Failure] = {}
        self._loading: set[tuple[str, str]] = set()
        self._retiring: set[Served] = set()
        self._released: dict[tuple[str, str], str] = {}  # no longer served, and why (for the index)
        self._known: set[str] = set()
        self._preloaded: Prepared | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()

    # ----------------------------------------------------------------------------------- lifecycle

    def preload(self) -> None:
        """Scan the repository and load what it serves, now, in this thread (python -m service: a one-line
        reason and exit 1 when nothing can be served, before uvicorn starts). open() then serves it."""
        if self.fixed is None:
            self._preloaded = self._initial()

    def _initial(self) -> Prepared:
        """The first scan and load. What the settings name is checked before anything is loaded, and the
        default model is loaded first: a start that fails says one thing, its reason."""
        self.control.acted_on(self.control.refresh())  # what the API asked before this process started
        self._check_settings()
        only = self.settings.model
        try:
            scans = scan_repository(self.root, [only] if only is not None else None)
        except OSError as exc:
            raise ModelLoadError(self._no_models(f"cannot read it: {exc.strerror}")) from None
        default = self._check_before_loading(scans)
        if default in self.control.unloaded:  # a worker restarted after the API unloaded it: not required
            default = None
        prepared = self._prepare(None, force=True, scans=scans, first=default)
        self._check_loaded(prepared, default)
        return prepared

    async def open(self) -> None:
        if self.fixed is not None:
            model = self.fixed
            if not model.ready:
                await asyncio.to_thread(model.load)
            served = Served(model, None)
            await self._start(served)
            self.table = Table({model.name: {model.version: served}}, served, model.name, (model.name,), True)
            return
        prepared, self._preloaded = self._preloaded, None
        if prepared is None:
            prepared = await asyncio.to_thread(self._initial)
        await self._commit(prepared)
        if self.settings.poll_interval_s > 0:
            self._spawn(self._poll(), "repository-poll")
        if self.control.path is not None:
            self._spawn(self._watch(), "repository-watch")

    async def close(self) -> None:
        tasks, self._tasks = list(self._tasks), set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        serving = [s for vs in self.table.versions.values() for s in vs.values()] + list(self._retiring)
        self.table = Table()
        self.live.clear()
        self._retiring.clear()
        for served in serving:
            batcher, served.batcher = served.batcher, None
            if batcher is not None:
                await batcher.stop()

    def _spawn(self, work: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -------------------------------------------------------------------------- the explicit API

    async def load(self, name: str, policy: VersionPolicy | None = None) -> None:
        """Triton's load: (re)read the model's folder now and serve what its policy (or `policy`, which then
        stays until the next load) chooses; versions that failed are tried again even if unchanged. Returns
        once the new versions serve and the versions they replace are drained. 400 when a version fails."""
        self._check_api("load", name)
        if not await asyncio.to_thread(lambda: scan_model(self.root / name).versions):
            raise NotFound(f"no model {name!r} in the repository {self.root} (expected {name}/<version>/card.json)")
        await asyncio.to_thread(self.control.change, name, unloaded=False, policy=policy)
        outcome = await self._act_on({name}, wait=True)
        failed = [f"version {v or '(config.json)'}: {f.reason}" for (n, v), f in outcome.failures.items() if n == name]
        if failed:
            raise BadInput(f"failed to load model {name!r}: " + "; ".join(failed))

    async def unload(self, name: str) -> None:
        """Triton's unload: the model's versions stop taking requests, and are released once drained
        (returns then). It stays unloaded, through polls, until it is loaded again."""
        self._check_api("unload", name)
        on_disk = await asyncio.to_thread(lambda: bool(scan_model(self.root / name).versions))
        if name not in self.table.versions and not on_disk:
            raise NotFound(f"unknown model {name!r}")
        await asyncio.to_thread(self.control.change, name, unloaded=True, policy=None)
        await self._act_on({name}, wait=True)

    def _check_api(self, action: str, name: str) -> None:
        if not self.settings.repository_api:
            raise ServiceError(f"the repository API is turned off (setting repository_api): cannot {action}", 403)
        if self.fixed is not None:
            raise ServiceError(f"this app serves one model given to it, with no repository to {action} from", 409)
        if self.settings.model is not None and name != self.settings.model:
            raise ServiceError(f"this server serves only the model {self.settings.model!r} (setting model)", 409)

    async def _act_on(self, names: set[str], *, wait: bool) -> Outcome:
        """Reconcile `names` after the API's state changed for them (here or in another worker)."""
        generations = {n: self.control.generations.get(n, 0) for n in names}
        # Shielded: a request that gives up (its timeout) does not abandon a load half done.
        work = self._spawn(self._reconcile(names, force=True), "repository-reconcile")
        try:
            outcome = await asyncio.shield(work)
        except OSError as exc:  # the repository's folders cannot be read: nothing changed
            raise NotReady(f"cannot read the model repository {self.root}: {exc}") from None
        for name, generation in generations.items():
            self.control.applied[name] = max(self.control.applied.get(name, 0), generation)
        if wait and outcome.retiring:
            await asyncio.wait(outcome.retiring)
        return outcome

    # ----------------------------------------------------------------------------- what is known

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Triton's repository index: one entry per model version known, {name, version, state, reason};
        a model with no version known gets one entry without a version."""
        table, failures = self.table, dict(self._failures)
        states: dict[str, dict[str, tuple[str, str]]] = {
            name: {} for name in {*self._known, *self.control.unloaded, *table.versions}
        }

        def put(name: str, version: str, state: str, reason: str = "") -> None:
            states.setdefault(name, {}).setdefault(version, (state, reason))

        for name, versions in table.versions.items():
            config = failures.get((name, ""))
            for version, served in versions.items():
                failure = failures.get((name, version))
                reason = (
                    f"serving the files loaded earlier; the new ones failed: {failure.reason}"
                    if failure
                    else f"serving as before; {config.reason}"
                    if config
                    else ""
                )
                put(name, version, READY if served.model.ready and served.batcher is not None else LOADING, reason)
        for name, version in tuple(self._loading):
            put(name, version, LOADING)
        for served in list(self._retiring):
            put(*served.key, UNLOADING, f"draining {served.in_flight} request(s)")
        for (name, version), failure in failures.items():
            if version:
                put(name, version, UNAVAILABLE, failure.reason)
            else:
                states.setdefault(name, {})
        for (name, version), reason in list(self._released.items()):
            put(name, version, UNAVAILABLE, reason)
        entries = []
        for name in sorted(states):
            known = states[name]
            if not known:
                config = failures.get((name, ""))
                reason = "unloaded" if name in self.control.unloaded else "no version loaded"
                entries.append({"name": name, "state": UNAVAILABLE, "reason": config.reason if config else reason})
            for version in sorted(known, key=version_key, reverse=True):
                state, reason = known[version]
                entries.append({"name": name, "version": version, "state": state, "reason": reason})
        return [e for e in entries if e["state"] == READY] if ready_only else entries

    def statistics(self, name: str | None = None, version: str | None = None) -> list[dict[str, Any]]:
        table = self.table
        if name is None:
            chosen = [s for vs in table.versions.values() for s in vs.values()]
        elif name not in table.versions:
            raise table.unknown(name)
        elif version is None:
            chosen = list(table.versions[name].values())
        elif version not in table.versions[name]:
            raise NotFound(f"model {name!r} has no version {version!r} loaded")
        else:
            chosen = [table.versions[name][version]]
        return [s.stats.triton(*s.key) for s in chosen]

    # -------------------------------------------------------------------------------- changing

    async def _reconcile(self, names: set[str] | None, *, force: bool) -> Outcome:
        """Bring what is served in line with the repository (all of it, or the models `names`)."""
        if self.fixed is not None:
            return Outcome({}, [])
        async with self._lock:  # one change at a time; never taken by a request
            prepared = await asyncio.to_thread(self._prepare, names, force)
            return await self._commit(prepared)

    async def _poll(self) -> None:
        """Scan every poll_interval_s; a failure (a version, a scan, anything) is logged and the next poll
        comes as usual: polling never stops."""
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                await self._reconcile(None, force=False)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                log.warning("cannot scan the model repository %s (%s); serving as before", self.root, exc)
            except Exception:
                log.exception("polling the model repository failed; serving as before")

    async def _watch(self) -> None:
        """Act on what the repository API asked in other workers (the shared state file)."""
        while True:
            await asyncio.sleep(STATE_WATCH_S)
            try:
                pending = await asyncio.to_thread(self.control.refresh)
                if pending:
                    await self._act_on(pending, wait=False)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("applying the repository API's state failed; will try again")

    def _policy(self, scan: ModelScan, pinned_model: str | None) -> VersionPolicy:
        override = self.control.policies.get(scan.name)
        if override is not None:
            return override
        if scan.config_error is not None:
            raise ValueError(scan.config_error)
        pinned = self.settings.model_version
        if pinned is not None and scan.name == pinned_model:
            return VersionPolicy("specific", versions=(pinned,))
        return scan.policy or self.default_policy

    def _prepare(
        self,
        names: set[str] | None,
        force: bool,
        scans: dict[str, ModelScan] | None = None,
        first: str | None = None,
    ) -> Prepared:
        """In a worker thread: scan (unless given `scans`), decide, and load (verify, warm) each version to be
        served anew. `first` (at startup, the default model) is loaded first, and when none of its versions
        loads, nothing else is."""
        only = self.settings.model
        if only is not None:  # the setting model: nothing else is ever scanned or served
            names = {only} if names is None else names & {only}
        if scans is None:
            scans = scan_repository(self.root, sorted(names) if names is not None else None)
        prepared = Prepared(scans, full=names is None or (only is not None and names == {only}))
        current = self.table.versions
        # model_version pins the default model: named by a setting, or found as _default_name finds it.
        pinned_model = self._default_name(sorted({*self._known, *(n for n, s in scans.items() if s.versions)}))
        for name in sorted(scans, key=lambda n: n != first):
            if first is not None and name != first and not any(n == first for n, _ in prepared.loaded):
                break
            scan = scans[name]
            if name in self.control.unloaded:
                prepared.desired[name] = []
                continue
            try:
                policy = self._policy(scan, pinned_model)
            except ValueError as exc:
                prepared.desired[name] = None  # a broken config.json changes nothing that is served
                prepared.failures[name, ""] = self._failure((name, ""), str(exc), None, force)
                continue
            available = list(scan.versions)
            chosen = policy.choose(available)
            prepared.desired[name] = chosen
            for version in policy.missing(available):
                prepared.failures[name, version] = self._failure(
                    (name, version),
                    f"the version policy {policy} names it, but {name}/{version} is not in the repository",
                    None,
                    force,
                )
            for version in chosen:
                print_ = scan.versions[version]
                served = current.get(name, {}).get(version)
                if served is not None and served.fingerprint == print_:
                    continue
                earlier = self._failures.get((name, version))
                if earlier is not None and earlier.fingerprint == print_ and not force:
                    prepared.failures[name, version] = earlier  # the same files: not tried again
                    continue
                self._loading.add((name, version))
                try:
                    prepared.loaded[name, version] = (self._load_version(self.root / name / version), print_)
                except Exception as exc:  # whatever a broken version raises, it fails alone
                    reason = str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
                    prepared.failures[name, version] = Failure(reason.splitlines()[0] if reason else "", print_)
                finally:
                    self._loading.discard((name, version))
        return prepared

    def _failure(self, key: tuple[str, str], reason: str, print_: Fingerprint | None, force: bool) -> Failure:
        earlier = self._failures.get(key)
        if earlier is not None and earlier.reason == reason and not force:
            return earlier
        return Failure(reason, print_)

    def _load_version(self, folder: Path) -> Model:
        model = Model(
            folder,
            providers=self.settings.providers,
            strict_providers=self.settings.strict_providers,
            intra_op_threads=self.settings.intra_op_threads,
            graph_optimization=self.settings.graph_optimization,
        )
        spec = model.card.input
        if tuple(spec.shape[1:]) != INPUT_SHAPE or spec.dtype != "float32":
            raise ModelLoadError(
                f"{folder}: the card's input is {spec.dtype} {list(spec.shape)}; this service feeds float32 "
                f"[-1, {', '.join(map(str, INPUT_SHAPE))}]"
            )
        model.load()  # verifies each file against its card's SHA-256, builds the sessions, warms them up
        return model

    async def _start(self, served: Served) -> None:
        model = served.model
        batcher = Batcher(model, self.settings.batch_max_size, self.settings.batch_max_delay_ms)
        batcher.observers.append(served.stats.observe)
        for observer in self.observers:
            batcher.observers.append(observer.batch_observer(model.name, model.version))
        await batcher.start()
        served.batcher, served.state = batcher, READY
        self.live[id(model)] = served
        for observer in self.observers:
            observer.version_served(model.name, model.version, model.providers_in_use)

    async def _commit(self, prepared: Prepared) -> Outcome:
        """On the event loop: start the new versions, swap the routing table, retire what it no longer
        routes to."""
        versions = {name: dict(served) for name, served in self.table.versions.items()}
        retire: list[Served] = []
        for (name, version), (model, print_) in prepared.loaded.items():
            served = Served(model, print_)
            await self._start(served)
            current = versions.setdefault(name, {})
            if version in current:
                retire.append(current[version])  # the same version, new files
            current[version] = served
            self._released.pop((name, version), None)
            log.info("serving model %s version %s", name, version)
            for warning in model.card_warnings:
                log.warning("model %s version %s: %s", name, version, warning)
        touched = set(prepared.scans) | (set(versions) if prepared.full else set())
        for name in touched:
            wanted = prepared.desired.get(name, [])
            for key in [k for k in self._failures if k[0] == name and k not in prepared.failures]:
                del self._failures[key]  # fixed, removed, or no longer wanted
            if wanted is None:
                continue
            current = versions.get(name, {})
            # A version wanted but failing keeps the model as it is: nothing it serves is retired.
            if all(v in current for v in wanted):
                for version in [v for v in current if v not in wanted]:
                    retire.append(current.pop(version))
                    reason = "unloaded" if name in self.control.unloaded else "not chosen by the version policy"
                    self._released[name, version] = reason
            if current:
                versions[name] = dict(sorted(current.items(), key=lambda item: version_key(item[0]), reverse=True))
            else:
                versions.pop(name, None)
        for key, failure in prepared.failures.items():
            earlier = self._failures.get(key)
            self._failures[key] = failure
            if failure is not earlier:
                self._report(key, failure, earlier)
        found = {name for name, scan in prepared.scans.items() if scan.versions or scan.config_error}
        for name, version in list(self._released):  # versions gone from the repository are forgotten
            if name in prepared.scans and version not in prepared.scans[name].versions:
                del self._released[name, version]
        self._known = found if prepared.full else (self._known - set(prepared.scans)) | found
        self.table = self._table(versions)  # the swap: requests from now on see only the new table
        return Outcome(dict(prepared.failures), [self._spawn(self._retire(s), "repository-retire") for s in retire])

    def _report(self, key: tuple[str, str], failure: Failure, earlier: Failure | None) -> None:
        if earlier is not None and earlier.reason == failure.reason and earlier.fingerprint == failure.fingerprint:
            return
        name, version = key
        serving = ", ".join(self.table.versions.get(name, {})) or "nothing"
        what = f"model {name} version {version}" if version else f"model {name}"
        log.warning("%s failed to load: %s (still serving: %s)", what, failure.reason, serving)
        for observer in self.observers:
            observer.load_failed(name, version, failure.reason)

    def _table(self, versions: dict[str, dict[str, Served]]) -> Table:
        known = tuple(sorted(set(versions) | self._known))
        default_name = self._default_name(known)
        default_versions = versions.get(default_name) if default_name else None
        default = next(iter(default_versions.values())) if default_versions else None
        return Table(versions, default, default_name, known, True)

    def _default_name(self, known: Sequence[str]) -> str | None:
        """The setting default_model, else model; else the default so far while it is in the repository (a
        second model arriving does not take the short routes away); else the only model; else
        fashion-mnist-cnn when present."""
        chosen = self.settings.default_model or self.settings.model
        if chosen is not None:
            return chosen
        previous = self.table.default_name
        if previous is not None and previous in known:
            return previous
        if len(known) == 1:
            return known[0]
        return PREFERRED_DEFAULT if PREFERRED_DEFAULT in known else None

    async def _retire(self, served: Served) -> None:
        """Drain, then release: the version takes no new requests (it is out of the table), the requests
        inside it finish, and then its batcher stops and the repository lets go of its model (its sessions
        are freed with the last reference: a request that looked the version up before the swap and has not
        reached it yet still holds one, and is answered by that model alone, see DataPlane.infer)."""
        served.state = UNLOADING
        served.drained = asyncio.Event()
        self._retiring.add(served)
        name, version = served.key
        try:
            while served.in_flight:
                served.drained.clear()
                await served.drained.wait()
        finally:
            # No await between the last check and these lines: no request can slip into the batcher.
            batcher, served.batcher = served.batcher, None
            self.live.pop(id(served.model), None)
            self._retiring.discard(served)
            if batcher is not None:
                await batcher.stop()
            replaced = version in self.table.versions.get(name, {})
            if not replaced:
                for observer in self.observers:
                    observer.version_released(name, version, served.model.providers_in_use)
            log.info("model %s version %s %s, released", name, version, "replaced" if replaced else "drained")

    # --------------------------------------------------------------------------- startup checks

    def _check_settings(self) -> None:
        model, default = self.settings.model, self.settings.default_model
        if model is not None and default is not None and model != default:
            raise ModelLoadError(f"default_model {default!r} is not served: model restricts serving to {model!r}")

    def _no_models(self, why: str = "") -> str:
        return (
            f"no model found in {self.root.absolute()} (expected <name>/<version>/card.json there"
            + (f"; {why}" if why else "")
            + "): choose the model repository with --models or FASHION_SERVE_MODELS"
        )

    def _check_before_loading(self, scans: dict[str, ModelScan]) -> str | None:
        """Startup fails, with its reason, when there is no model at all, or the model that model,
        default_model or model_version name is missing. Returns the default model's name."""
        found = [name for name, scan in scans.items() if scan.versions]
        try:
            on_disk = sorted(p.name for p in self.root.iterdir() if p.is_dir() and is_model_dir(p))
        except OSError as exc:
            raise ModelLoadError(self._no_models(f"cannot read it: {exc.strerror}")) from None
        if not on_disk:
            raise ModelLoadError(self._no_models())
        for setting in ("model", "default_model"):
            name = getattr(self.settings, setting)
            if name is not None and name not in on_disk:
                raise ModelLoadError(f"model {name!r} not found in {self.root} (found: {', '.join(on_disk)})")
        default = self._default_name(found)
        pinned = self.settings.model_version
        if pinned is not None:
            if default is None:
                raise ModelLoadError("model_version needs a model: several are served, set model or default_model")
            available = list(scans[default].versions)
            if pinned not in available:
                raise ModelLoadError(f"model {default!r} has no version {pinned!r} (found: {', '.join(available)})")
        return default

    def _check_loaded(self, prepared: Prepared, default: str | None) -> None:
        """Startup fails, with the first reason, when the default model (or, with none, every model) has no
        version that loads. Other failures are reported and served around."""
        found = [n for n, scan in prepared.scans.items() if scan.versions and n not in self.control.unloaded]
        loaded = {name for name, _ in prepared.loaded}
        for must in ([default] if default is not None else []) + ([] if loaded else found):
            if must not in loaded:
                reasons = [f.reason for (n, v), f in prepared.failures.items() if n == must]
                raise ModelLoadError(reasons[0] if reasons else f"model {must!r}: no version to serve")


def is_model_dir(folder: Path) -> bool:
    return not folder.name.startswith(".") and any(is_version(p) for p in folder.iterdir())
