"""Hostile memory, against the real container with a 1 GiB memory limit (`docker run --memory 1g`, default
settings: one worker per core): every class of request that exhausted memory or killed a worker (issue 21)
is sent, concurrently, while a normal client keeps classifying real test images.

- huge canvases (25-megapixel images of every mode and container, ~1-160 KB on the wire), 16 at once as
  single requests and in batches;
- inflation bombs: an .npz whose bzip2 member inflates to 1 GiB, a deflate member that lies about its size
  (256 MiB behind a declared 2 KB),
  gzip V2 bodies of 64 KiB that inflate to 64 MiB of `[],` and `{},`;
- malformed containers (an encrypted, an unknown-method and a corrupt .npz member, truncated .npy headers) and
  a 12,500,000 x 2 PNG;
- slow clients: connections that send their bodies, or their headers, a byte a second.

It must show: no OOM kill and no worker replaced (same worker pids before and after), every bad request a 4xx
with the JSON error shape (huge but valid images: 200, or 413/503/504 JSON), the normal client's requests all
answered 200 (their p99 during the attack is printed), and the memory back near its idle figure afterwards.
Bounded in time (about two minutes of attack); loopback only. Never skipped: without Docker it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest

from tests.support import (
    CANVAS_KINDS,
    MODEL,
    canvas,
    container_run,
    free_port,
    gzip_json_bomb,
    npy_of,
    npz_corrupt_deflate,
    npz_encrypted,
    npz_inflation_bomb,
    npz_unknown_method,
    png_bytes,
    png_strip,
)

pytestmark = pytest.mark.slow

MEMORY_LIMIT = "1g"
READY_TIMEOUT_S = 120
PREDICT, BATCH, INFER = "/v1/predict", "/v1/predict/batch", f"/v2/models/{MODEL}/infer"
# The figure the issue asks for: RSS summed over the container's processes, back within this of idle.
SETTLE_MIB = 100
SETTLE_TIMEOUT_S = 30
NORMAL_CLIENTS = 2
# Slow clients, by kind (see slow_connections), for SLOW_S seconds: past the 30 s request limit.
SLOW_CONNECTIONS = {"body": 200, "pause": 100, "headers": 100}
SLOW_S = 34


@dataclass
class Hostile:
    name: str
    container: str
    url: str

    def exec(self, *args: str, timeout: float = 30) -> str:
        return container_run(["docker", "exec", self.container, *args], timeout=timeout).stdout

    def memory(self) -> dict[str, Any]:
        """RSS summed over the container's processes (KiB), the worker pids, the CPU seconds they have used,
        and the cgroup's counters (v2 or v1)."""
        probe = (
            "import os, json\n"
            "rss, pids, ticks = 0, [], 0\n"
            "for p in os.listdir('/proc'):\n"
            "    if not p.isdigit(): continue\n"
            "    try: status, stat = open(f'/proc/{p}/status').read(), open(f'/proc/{p}/stat').read()\n"
            "    except OSError: continue\n"
            "    ticks += sum(int(v) for v in stat.rsplit(')', 1)[1].split()[11:13])\n"
            "    fields = dict(l.split(':', 1) for l in status.splitlines() if ':' in l)\n"
            "    if 'VmRSS' in fields: rss += int(fields['VmRSS'].split()[0])\n"
            "    if fields.get('PPid', '').strip() == '1': pids.append(int(p))\n"
            "def read(*names):\n"
            "    for name in names:\n"
            "        try: return open('/sys/fs/cgroup/' + name).read()\n"
            "        except OSError: pass\n"
            "    return ''\n"
            "def number(*names):\n"
            "    text = read(*names).strip()\n"
            "    return int(text) if text.isdigit() else -1\n"
            "text = read('memory.events') or read('memory/memory.oom_control')\n"
            "events = dict(l.split()[:2] for l in text.splitlines() if l.strip())\n"
            "print(json.dumps({'rss_kib': rss, 'pids': sorted(pids), 'oom_kill': int(events.get('oom_kill', -1)),\n"
            "  'cpu_s': ticks / os.sysconf('SC_CLK_TCK'),\n"
            "  'current': number('memory.current', 'memory/memory.usage_in_bytes'),\n"
            "  'peak': number('memory.peak', 'memory/memory.max_usage_in_bytes'),\n"
            "  'limit': number('memory.max', 'memory/memory.limit_in_bytes')}))\n"
        )
        return json.loads(self.exec("python", "-c", probe))

    def state(self) -> dict[str, Any]:
        out = container_run(["docker", "inspect", "-f", "{{json .State}}", self.container], timeout=30).stdout
        return json.loads(out)


@pytest.fixture(scope="module")
def hostile(service_image: str) -> Iterator[Hostile]:
    """The image run with a 1 GiB memory limit (swap included), default settings, port on 127.0.0.1 only."""
    port = free_port()
    name = f"fs-hostile-{port}"
    container_run(
        [
            "docker", "run", "-d", "--name", name, "--memory", MEMORY_LIMIT, "--memory-swap", MEMORY_LIMIT,
            "-p", f"127.0.0.1:{port}:8000", service_image,
        ],
        timeout=60,
        what="docker run --memory 1g",
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            logs = container_run(["docker", "logs", "--tail", "40", name], timeout=30, check=False)
            pytest.fail(f"not ready within {READY_TIMEOUT_S} s:\n{logs.stdout}\n{logs.stderr}")
        yield Hostile(name, name, url)
    finally:
        logs = container_run(["docker", "logs", "--tail", "30", name], timeout=30, check=False)
        print(f"[hostile] last logs:\n{logs.stdout[-3000:]}\n{logs.stderr[-3000:]}")
        container_run(["docker", "rm", "-f", name], timeout=60, check=False)


# ------------------------------------------------------------------------------------- the clients


@dataclass
class Tally:
    """What each request class got: statuses, and every answer that was not the JSON error shape or was 5xx
    where a 4xx was due."""

    statuses: dict[str, dict[int, int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def record(self, what: str, response: httpx.Response | None, allowed: set[int], error: str = "") -> None:
        status = response.status_code if response is not None else 0
        counts = self.statuses.setdefault(what, {})
        counts[status] = counts.get(status, 0) + 1
        if response is None:
            self.problems.append(f"{what}: no answer ({error})")
            return
        if status not in allowed:
            self.problems.append(f"{what}: {status} {response.text[:200]}")
        if status >= 400:
            try:
                body = response.json()
                assert isinstance(body.get("error"), str)
            except Exception:
                self.problems.append(f"{what}: {status} without the JSON error shape: {response.text[:200]}")


VALID_BUT_HEAVY = {200, 413, 503, 504}  # a huge valid image: served, too large for the budget, busy, or too slow
BAD = {400, 413}


async def post(client: httpx.AsyncClient, tally: Tally, what: str, allowed: set[int], path: str, **kwargs: Any) -> None:
    try:
        response = await client.post(path, **kwargs)
    except httpx.HTTPError as exc:
        tally.record(what, None, allowed, repr(exc))
        return
    tally.record(what, response, allowed)


async def huge_canvases(client: httpx.AsyncClient, tally: Tally) -> None:
    """16 single-image requests at once, twice over every kind; then batches of every kind."""
    kinds = [kind for kind, *_ in CANVAS_KINDS]
    for start in range(0, 2 * len(kinds), 16):
        wave = [kinds[i % len(kinds)] for i in range(start, start + 16)]
        await asyncio.gather(
            *(post(client, tally, f"canvas {k}", VALID_BUT_HEAVY, PREDICT, content=canvas(k)) for k in wave)
        )
    batch = [("files", (f"{k}.img", canvas(k), "application/octet-stream")) for k in kinds * 3]
    await asyncio.gather(*(post(client, tally, "canvas batch", VALID_BUT_HEAVY, BATCH, files=batch) for _ in range(4)))


async def bombs_and_broken(client: httpx.AsyncClient, tally: Tally) -> None:
    npz = {"Content-Type": "application/x-npz"}
    npy = npy_of(np.zeros((2, 28, 28), np.uint8))
    gz = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    cases: list[tuple[str, set[int], str, dict[str, Any]]] = [
        (
            "npz bzip2 bomb (1 GiB)",
            BAD,
            BATCH,
            {"content": npz_inflation_bomb(inflated=1 << 30, method=12), "headers": npz},
        ),
        (
            "npz deflate member lying",
            {200, 400, 413},
            BATCH,
            {"content": npz_inflation_bomb(), "headers": npz},
        ),  # noqa: E501
        ("npz encrypted", BAD, BATCH, {"content": npz_encrypted(), "headers": npz}),
        ("npz method 99", BAD, BATCH, {"content": npz_unknown_method(), "headers": npz}),
        ("npz corrupt deflate", BAD, BATCH, {"content": npz_corrupt_deflate(), "headers": npz}),
        ("npy header cut", BAD, BATCH, {"content": npy[:40], "headers": {"Content-Type": "application/x-npy"}}),
        ("gzip [], bomb", BAD, INFER, {"content": gzip_json_bomb(b"[],"), "headers": gz}),
        ("gzip {}, bomb", BAD, INFER, {"content": gzip_json_bomb(b"{},"), "headers": gz}),
        ("png 12500000x2", {200}, PREDICT, {"content": png_strip(), "headers": {"Content-Type": "image/png"}}),
    ]
    for _ in range(3):
        await asyncio.gather(
            *(post(client, tally, what, allowed, path, **kw) for what, allowed, path, kw in cases for _ in range(4))
        )


def slow_connections(url: str, count: int, seconds: float, mode: str, results: list[str]) -> None:
    """`count` connections that send a request slowly for `seconds`: "body" a byte of its body a second,
    "pause" a few body bytes and then nothing, "headers" a byte of its headers a second. Then what the server
    did to each: its answer's status line, "closed", or "open, no answer"."""
    host, port = url.removeprefix("http://").split(":")
    head = b"POST /v1/predict HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
    socks = []
    for _ in range(count):
        sock = socket.create_connection((host, int(port)), timeout=5)
        sock.setblocking(False)
        if mode != "headers":
            sock.sendall(head + (b"\x89PNG" if mode == "pause" else b""))
        socks.append(sock)
    trickle = head if mode == "headers" else bytes(1000)
    deadline = time.monotonic() + seconds
    position = 0
    while time.monotonic() < deadline:
        if mode != "pause":
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.send(trickle[position : position + 1])
            position = min(position + 1, len(trickle) - 1)
        time.sleep(1.0)
    for sock in socks:
        try:
            data = sock.recv(4096)
            results.append(data.split(b"\r\n", 1)[0].decode(errors="replace") or "closed")
        except BlockingIOError:
            results.append("open, no answer")
        except OSError as exc:
            results.append(type(exc).__name__)
        finally:
            sock.close()


async def normal_client(
    url: str, images: list[bytes], stop: asyncio.Event, latencies: list[float], tally: Tally
) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        i = 0
        while not stop.is_set():
            start = time.perf_counter()
            try:
                response = await client.post(
                    PREDICT, content=images[i % len(images)], headers={"Content-Type": "image/png"}
                )
            except httpx.HTTPError as exc:
                tally.record("normal", None, {200}, repr(exc))
            else:
                latencies.append(time.perf_counter() - start)
                tally.record("normal", response, {200})
            i += 1


def settle(hostile: Hostile, idle_kib: int) -> tuple[int, float]:
    """Wait until the RSS is back within SETTLE_MIB of idle; (the RSS, seconds waited)."""
    start = time.monotonic()
    while True:
        rss = hostile.memory()["rss_kib"]
        waited = time.monotonic() - start
        if rss - idle_kib <= SETTLE_MIB * 1024 or waited > SETTLE_TIMEOUT_S:
            return rss, waited
        time.sleep(2)


def test_hostile_memory_in_a_1_gib_container(hostile: Hostile) -> None:
    from training.data import load_test

    images = [png_bytes(pixels) for pixels in load_test().images[:200]]
    for kind, *_ in CANVAS_KINDS:  # made before the clock starts (seconds of encoding each)
        canvas(kind)
    (
        npz_inflation_bomb(inflated=1 << 30, method=12),
        npz_inflation_bomb(),
        gzip_json_bomb(b"[],"),
        gzip_json_bomb(b"{},"),
    )

    with httpx.Client(base_url=hostile.url, timeout=30) as warm:
        for data in images[:50]:
            assert warm.post(PREDICT, content=data, headers={"Content-Type": "image/png"}).status_code == 200
    time.sleep(2)
    before = hostile.memory()
    tally, normal_tally = Tally(), Tally()
    latencies: list[float] = []
    slow: dict[str, list[str]] = {"body": [], "pause": [], "headers": []}
    peaks: list[int] = []

    async def main() -> float:
        stop = asyncio.Event()
        normal = [
            asyncio.create_task(normal_client(hostile.url, images, stop, latencies, normal_tally))
            for _ in range(NORMAL_CLIENTS)
        ]
        sampler_stop = threading.Event()

        def sample() -> None:
            while not sampler_stop.is_set():
                peaks.append(hostile.memory()["rss_kib"])
                sampler_stop.wait(1.0)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        trickles = [
            threading.Thread(target=slow_connections, args=(hostile.url, count, SLOW_S, mode, slow[mode]))
            for mode, count in SLOW_CONNECTIONS.items()
        ]
        started = time.monotonic()
        for thread in trickles:
            thread.start()
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=hostile.url, timeout=90, limits=limits) as client:
            await asyncio.gather(huge_canvases(client, tally), bombs_and_broken(client, tally))
        await asyncio.to_thread(lambda: [t.join(60) for t in trickles])
        attack_seconds = time.monotonic() - started
        stop.set()
        await asyncio.gather(*normal)
        sampler_stop.set()
        sampler.join(10)
        return attack_seconds

    attack_seconds = asyncio.run(main())
    after_attack = hostile.memory()
    time.sleep(3)  # every client is gone: the server's CPU use now is work nobody waits for
    idle_cores = (hostile.memory()["cpu_s"] - after_attack["cpu_s"]) / 3
    settled, waited = settle(hostile, before["rss_kib"])
    state = hostile.state()
    p50 = statistics.median(latencies) * 1000 if latencies else float("nan")
    p99 = float(np.percentile(latencies, 99)) * 1000 if latencies else float("nan")
    print(
        f"\n[hostile] attack {attack_seconds:.0f} s; RSS idle {before['rss_kib'] / 1024:.0f} MiB, peak sampled "
        f"{max(peaks, default=0) / 1024:.0f} MiB (the cgroup's peak, page cache included, "
        f"{after_attack['peak'] / 2**20:.0f} MiB of {after_attack['limit'] / 2**20:.0f}), "
        f"right after {after_attack['rss_kib'] / 1024:.0f} MiB, settled {settled / 1024:.0f} MiB after {waited:.0f} s; "
        f"oom_kill {after_attack['oom_kill']}; workers {before['pids']} -> {after_attack['pids']}; "
        f"CPU once the clients had gone {idle_cores:.2f} cores\n"
        f"[hostile] normal client: {len(latencies)} requests, p50 {p50:.0f} ms, p99 {p99:.0f} ms, "
        f"{normal_tally.statuses}\n[hostile] attack statuses: {json.dumps(tally.statuses)}\n"
        f"[hostile] slow clients: {json.dumps({mode: _counts(got) for mode, got in slow.items()})}"
    )
    assert not state.get("OOMKilled") and state.get("Running"), state
    assert after_attack["limit"] == 1 << 30, after_attack  # the limit is in force (cgroup v2 or v1)
    assert after_attack["oom_kill"] == 0, after_attack
    assert after_attack["pids"] == before["pids"], f"a worker was replaced: {before['pids']} -> {after_attack['pids']}"
    assert idle_cores < 0.3, f"{idle_cores:.2f} cores busy after every client had gone: cancelled work went on"
    assert not tally.problems, tally.problems[:10]
    assert not normal_tally.problems, normal_tally.problems[:10]
    assert latencies and normal_tally.statuses["normal"].get(200, 0) == len(latencies)
    # Slow clients were answered by the server, none left hanging: 408 for pauses and headers (10 s), 504 for
    # bodies a byte a second (the 30 s request limit); the normal client was answered meanwhile.
    assert set(slow["pause"]) | set(slow["headers"]) <= {"HTTP/1.1 408 Request Timeout"}, slow
    assert set(slow["body"]) <= {"HTTP/1.1 504 Gateway Timeout"}, slow
    assert settled - before["rss_kib"] <= SETTLE_MIB * 1024, (before, settled)


def _counts(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out
