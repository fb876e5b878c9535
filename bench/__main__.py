"""python -m bench: every benchmark in one go, with figures and ratios against the targets.

1. the in-process limit: PIL decoding + onnxruntime on core 0, one at a time and 256 at a time;
2. the plain FastAPI wrapper (bench/reference.py) on core 0, /v1/predict at concurrency 32;
3. the service (`python -m service`, 1 worker, 1 thread) on core 0: time to ready, /v1/predict at
   concurrency 32, then the Open Inference Protocol's /v2/models/<model>/infer at the same concurrency
   with one image per request as binary tensor data, as an FP32 tensor and as a PNG file (BYTES), each
   against /v1/predict's requests/s in the same run; /v1/predict/batch with 256 PNGs per request, RSS
   after the load;
4. head to head: the plain wrapper and the service both up on core 0, the load alternating between
   them in short slices, so that both see the same minutes of this machine (whose speed drifts by tens
   of percent from one minute to the next) and the requests/s ratio does not drift with it;
5. unpinned, the way it ships: workers × onnxruntime threads × batcher settings, on both cores.
The load generator (bench/loadgen.py) runs on core 1 for 1-4, unpinned for 5. Servers are started
and stopped here; nothing is left running.

Ablations and trials are the service's own settings (bench/overrides.py): `--set NAME=VALUE`
(repeatable) runs every service of the benchmark with FASHION_SERVE_NAME=VALUE, e.g.
`--only service --set inline_decode_max_bytes=0` (every image decoded in a worker thread). A name that
is not a field of service.settings.Settings, or a value it refuses, stops the benchmark before it starts.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench import overrides

ROOT = Path(__file__).resolve().parent.parent
SERVER_CORE, CLIENT_CORE = "0", "1"
TARGET_RPS_RATIO = 2.0
TARGET_P99_MS = 20.0
TARGET_BATCH_RATIO = 0.7
TARGET_READY_S = 1.0
TARGET_RSS_MB = 150.0
TARGET_V2_RATIO = 0.9  # V2 binary-data requests/s over /v1/predict's, one image per request, same run
V2_KINDS = {"v2_fp32": "v2-fp32", "v2_png": "v2-png"}  # result key -> load kind
MATRIX_SETTINGS = ("workers", "intra_op_threads", "batch_max_size", "batch_max_delay_ms")  # what a matrix row sets


@dataclass
class Options:
    python: str
    models: Path
    model: str | None
    model_name: str  # the served model's name (the V2 route's)
    seconds: float
    warmup: float
    concurrency: int
    batch_concurrency: int
    matrix: list[tuple[int, int, int, float]]  # workers, intra-op threads, batch max size, batch max delay ms
    env: dict[str, str]
    settings: dict[str, str]  # --set: Settings field -> value, for every service started here
    slices: int  # head to head: slices per server
    slice_seconds: float
    expected: list[int]  # class ids of the first test images, to check answers against


def pinned(core: str | None, command: list[str]) -> list[str]:
    return ["taskset", "-c", core, *command] if core is not None else command


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> float:
    """Seconds from now until GET /readyz answers 200 (polled every 10 ms)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1.0) as response:
                if response.status == 200:
                    return time.perf_counter() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.01)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def process_tree(pid: int) -> list[int]:
    """A process and its descendants (uvicorn's workers)."""
    found: list[int] = []
    todo = [pid]
    while todo and len(found) < 256:  # bounded walk
        current = todo.pop()
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        found.append(current)
        todo.extend(int(c) for c in children)
    return found


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its children, in MB."""
    total = 0
    for current in process_tree(pid):
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return total / 1024


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children, all threads."""
    ticks = 0
    for current in process_tree(pid):
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    ready_s: float


@contextmanager
def serve(command: list[str], env: dict[str, str], port: int) -> Iterator[Server]:
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=log)
        try:
            url = f"http://127.0.0.1:{port}"
            try:
                wait_ready(url, process)
            except (RuntimeError, TimeoutError):
                log.seek(0)
                sys.stderr.write(log.read().decode(errors="replace")[-3000:])
                raise
            yield Server(url, process, time.perf_counter() - start)
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def expected_classes(onnx: Path, count: int = 8) -> list[int]:
    """What onnxruntime says about the first test images, in-process."""
    import numpy as np
    import onnxruntime as ort

    from bench import data
    from bench.inprocess import decode

    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    batch = np.stack([decode(png) for png in data.pngs()[:count]])[..., None]
    return [int(i) for i in session.run(["probabilities"], {"image": batch})[0].argmax(axis=1)]


def check_answers(url: str, want: list[int], batch: bool) -> None:
    """A few requests before timing anything: a fast wrong answer is no result."""
    import http.client

    from bench import data

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    content_type = {"Content-Type": f"multipart/form-data; boundary={data.BOUNDARY}"}
    try:
        got = []
        for i, png in enumerate(data.pngs()[: len(want)]):
            connection.request("POST", "/v1/predict", data.multipart("file", [(f"{i}.png", png)]), content_type)
            got.append(json.loads(connection.getresponse().read())["class_id"])
        if batch:
            files = [(f"{i}.png", png) for i, png in enumerate(data.pngs()[: len(want)])]
            connection.request("POST", "/v1/predict/batch", data.multipart("files", files), content_type)
            results = json.loads(connection.getresponse().read())["results"]
            got += [r["class_id"] for r in results]
    finally:
        connection.close()
    expected = want + want if batch else want
    if got != expected:
        raise SystemExit(f"{url} answers {got}, onnxruntime in-process says {expected}")


def check_v2_answers(url: str, model: str, want: list[int], kind: str) -> None:
    """As check_answers, for a V2 load kind: the same requests the load generator sends, the
    probabilities read out of the binary response."""
    import http.client

    from bench import data

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    got = []
    try:
        for body, length in data.v2_bodies(kind)[: len(want)]:
            headers = {"Content-Type": "application/octet-stream", data.V2_HEADER: str(length)}
            connection.request("POST", data.v2_path(model), body, headers)
            response = connection.getresponse()
            content = response.read()
            answered = response.getheader(data.V2_HEADER)
            if response.status != 200 or answered is None:
                raise SystemExit(f"{url} {kind}: {response.status}, {content[:300]!r}")
            got.append(int(data.v2_probabilities(content, int(answered)).argmax()))
    finally:
        connection.close()
    if got != want:
        raise SystemExit(f"{url} {kind} answers {got}, onnxruntime in-process says {want}")


def service_command(opts: Options, port: int, core: str | None) -> tuple[list[str], dict[str, str]]:
    command = [opts.python, "-m", "service", "--port", str(port), "--models", str(opts.models)]
    if opts.model:
        command += ["--model", opts.model]
    return pinned(core, command), {**opts.env, **overrides.environment(opts.settings)}


def run_load(
    opts: Options,
    server: Server,
    kind: str,
    concurrency: int,
    core: str | None,
    seconds: float | None = None,
    warmup: float | None = None,
) -> dict[str, Any]:
    """One load run; adds the server's CPU time per request, which contention on a shared machine
    disturbs far less than requests/s."""
    url = server.url
    seconds = seconds or opts.seconds
    warmup = opts.warmup if warmup is None else warmup
    command = [opts.python, "-m", "bench.loadgen", "--url", url, "--kind", kind]
    command += ["--concurrency", str(concurrency), "--seconds", str(seconds), "--warmup", str(warmup)]
    command += ["--model", opts.model_name]
    limit = seconds + warmup + 60
    cpu = tree_cpu_seconds(server.process.pid)
    out = subprocess.run(pinned(core, command), cwd=ROOT, capture_output=True, check=True, timeout=limit)
    cpu = tree_cpu_seconds(server.process.pid) - cpu
    result: dict[str, Any] = json.loads(out.stdout)
    result["server_cpu_s"] = cpu
    result["server_cpu_ms_per_request"] = 1000 * cpu / max(1, result["completed"])
    return result


def in_process(opts: Options, onnx: Path) -> dict[str, Any]:
    command = pinned(SERVER_CORE, [opts.python, "-m", "bench.inprocess", "--model", str(onnx), "--seconds", "3"])
    out = subprocess.run(command, cwd=ROOT, capture_output=True, check=True, timeout=120)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def reference_command(opts: Options, onnx: Path, port: int) -> list[str]:
    return pinned(SERVER_CORE, [opts.python, "-m", "bench.reference", "--model", str(onnx), "--port", str(port)])


def pinned_service_command(opts: Options, port: int) -> tuple[list[str], dict[str, str]]:
    """The service on core 0: one worker, one intra-op thread."""
    command, env = service_command(opts, port, SERVER_CORE)
    return command, {"FASHION_SERVE_WORKERS": "1", "FASHION_SERVE_INTRA_OP_THREADS": "1", **env}


def reference(opts: Options, onnx: Path) -> dict[str, Any]:
    port = free_port()
    with serve(reference_command(opts, onnx, port), {}, port) as server:
        check_answers(server.url, opts.expected, batch=False)
        return run_load(opts, server, "single", opts.concurrency, CLIENT_CORE) | {"ready_s": server.ready_s}


def service_pinned(opts: Options) -> dict[str, Any]:
    port = free_port()
    command, env = pinned_service_command(opts, port)
    with serve(command, env, port) as server:
        check_answers(server.url, opts.expected, batch=True)
        for kind in V2_KINDS.values():
            check_v2_answers(server.url, opts.model_name, opts.expected, kind)
        single = run_load(opts, server, "single", opts.concurrency, CLIENT_CORE)
        v2 = {}
        for key, kind in V2_KINDS.items():
            v2[key] = run_load(opts, server, kind, opts.concurrency, CLIENT_CORE)
            v2[key]["ratio_to_v1"] = v2[key]["rps"] / single["rps"] if single["rps"] else float("nan")
        batch = run_load(opts, server, "batch", opts.batch_concurrency, CLIENT_CORE)
        rss = tree_rss_mb(server.process.pid)
        return {"ready_s": server.ready_s, "single": single, **v2, "batch": batch, "rss_mb": rss}


def head_to_head(opts: Options, onnx: Path) -> dict[str, Any]:
    """/v1/predict on both servers, pinned to core 0 together (the idle one costs nothing), the load
    alternating between them in slices (which goes first swaps every round): requests/s and CPU time
    per request over all slices of each."""
    ref_port, svc_port = free_port(), free_port()
    svc_command, env = pinned_service_command(opts, svc_port)
    # CPU time covers whole load runs, warm-up included, so per request it is divided by all their requests.
    totals = {name: {"requests": 0, "completed": 0, "errors": 0, "cpu_s": 0.0} for name in ("service", "reference")}
    with serve(reference_command(opts, onnx, ref_port), {}, ref_port) as ref, serve(svc_command, env, svc_port) as svc:
        check_answers(ref.url, opts.expected, batch=False)
        check_answers(svc.url, opts.expected, batch=False)
        servers = [("service", svc), ("reference", ref)]
        for turn in range(opts.slices):
            for name, server in servers if turn % 2 == 0 else servers[::-1]:
                run = run_load(opts, server, "single", opts.concurrency, CLIENT_CORE, opts.slice_seconds, warmup=0.5)
                totals[name]["requests"] += run["requests"]
                totals[name]["completed"] += run["completed"]
                totals[name]["errors"] += run["errors"]
                totals[name]["cpu_s"] += run["server_cpu_s"]
    seconds = opts.slices * opts.slice_seconds
    return {
        "slices": opts.slices,
        "slice_seconds": opts.slice_seconds,
        **{
            name: {
                "rps": t["requests"] / seconds,
                "errors": t["errors"],
                "server_cpu_ms_per_request": 1000 * t["cpu_s"] / max(1, t["completed"]),
            }
            for name, t in totals.items()
        },
    }


def matrix(opts: Options) -> list[dict[str, Any]]:
    rows = []
    for workers, threads, size, delay in opts.matrix:
        port = free_port()
        command, env = service_command(opts, port, None)
        # The row's own settings win over --set/--env: the table labels each row with them.
        env |= overrides.environment(dict(zip(MATRIX_SETTINGS, map(str, (workers, threads, size, delay)), strict=True)))
        with serve(command, env, port) as server:
            check_answers(server.url, opts.expected, batch=False)
            single = run_load(opts, server, "single", opts.concurrency, None)
            rows.append(
                {"workers": workers, "threads": threads, "batch_max_size": size, "batch_max_delay_ms": delay}
                | {"ready_s": server.ready_s, "single": single, "rss_mb": tree_rss_mb(server.process.pid)}
            )
    return rows


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def cpu_name() -> str:
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model name"))
        return line.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def check(ok: bool) -> str:
    return "yes" if ok else "NO"


def latency(result: dict[str, Any]) -> str:
    return "/".join(f"{result[k]:.1f}" for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms"))


def median(values: list[float]) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def paired_ratio(results: dict[str, Any], other: str, ratio: Callable[[Any, Any], float]) -> float:
    """The median over attempts of service / `other`, each pair measured back to back: on a machine whose
    speed drifts by tens of percent between minutes (this one, even idle), pairs cancel the drift."""
    pairs = list(zip(results.get("service_runs", []), results.get(f"{other}_runs", []), strict=False))
    return median([ratio(a, b) for a, b in pairs])


def report(results: dict[str, Any]) -> str:
    lines = [
        f"machine: {results['cores']} cores, {results['cpu']}; load average before {results['load_before']}, "
        f"after {results['load_after']}; model {results['model']}; "
        f"settings {overrides.describe(results['settings']['set'])}",
        "",
        "| measurement | figure | target | ratio | met |",
        "|---|---|---|---|---|",
    ]
    limit = results.get("in_process")
    if limit:
        lines += [
            f"| in-process PIL + onnxruntime, one at a time (core 0) | {limit['single_images_per_s']:,.0f} images/s"
            " | | | |",
            f"| in-process PIL + onnxruntime, batches of 256 (core 0) | {limit['batched_images_per_s']:,.0f} images/s"
            " | | | |",
        ]
    ref = results.get("reference")
    if ref:
        lines.append(
            f"| plain wrapper /v1/predict, c={ref['concurrency']} (core 0) | {ref['rps']:,.0f} req/s, "
            f"p50/p90/p99/max {latency(ref)} ms, {ref['errors']} errors, "
            f"{ref['server_cpu_ms_per_request']:.2f} CPU ms/request | | | |"
        )
    svc = results.get("service")
    if svc:
        single, batch = svc["single"], svc["batch"]
        ratio = paired_ratio(results, "reference", lambda svc, other: svc["single"]["rps"] / other["rps"])
        lines.append(
            f"| service /v1/predict, c={single['concurrency']} (core 0) | {single['rps']:,.0f} req/s, "
            f"p50/p90/p99/max {latency(single)} ms, {single['server_cpu_ms_per_request']:.2f} CPU ms/request | "
            f"≥ {TARGET_RPS_RATIO:.0f}× plain | {ratio:.2f}× | "
            f"{check(ratio >= TARGET_RPS_RATIO)} |"
        )
        if ref:
            cpu_ratio = paired_ratio(
                results,
                "reference",
                lambda svc, other: other["server_cpu_ms_per_request"] / svc["single"]["server_cpu_ms_per_request"],
            )
            lines.append(
                f"| server CPU time per request, /v1/predict | plain {ref['server_cpu_ms_per_request']:.2f} ms, "
                f"service {single['server_cpu_ms_per_request']:.2f} ms | | {cpu_ratio:.2f}× less | |"
            )
        duel = results.get("head_to_head")
        if duel:
            a, b = duel["service"], duel["reference"]
            duel_ratio = a["rps"] / b["rps"]
            lines.append(
                f"| head to head, /v1/predict c={single['concurrency']}: both on core 0, the load alternating, "
                f"{duel['slices']} slices of {duel['slice_seconds']:g} s each | service {a['rps']:,.0f} req/s, "
                f"{a['server_cpu_ms_per_request']:.2f} CPU ms/request; plain {b['rps']:,.0f} req/s, "
                f"{b['server_cpu_ms_per_request']:.2f} CPU ms/request; {a['errors'] + b['errors']} errors | "
                f"≥ {TARGET_RPS_RATIO:.0f}× plain | {duel_ratio:.2f}× | {check(duel_ratio >= TARGET_RPS_RATIO)} |"
            )
        lines.append(
            f"| service /v1/predict p99 | {single['p99_ms']:.1f} ms | ≤ {TARGET_P99_MS:.0f} ms | | "
            f"{check(single['p99_ms'] <= TARGET_P99_MS)} |"
        )
        for key, what in (("v2_fp32", "binary FP32 [1, 28, 28, 1]"), ("v2_png", "binary BYTES, one PNG")):
            v2 = svc.get(key)
            if not v2:
                continue
            # Each run's own V2 / v1 ratio (same server, same minutes), the median over runs.
            v2_ratio = median([run[key]["ratio_to_v1"] for run in results.get("service_runs", [svc]) if key in run])
            lines.append(
                f"| service /v2/models/…/infer, {what}, c={v2['concurrency']} (core 0) | {v2['rps']:,.0f} req/s, "
                f"p99 {v2['p99_ms']:.1f} ms, {v2['errors']} errors, {v2['server_cpu_ms_per_request']:.2f} "
                f"CPU ms/request | ≥ {TARGET_V2_RATIO:.1f}× /v1/predict | {v2_ratio:.2f}× | "
                f"{check(v2_ratio >= TARGET_V2_RATIO)} |"
            )
        errors = single["errors"] + batch["errors"] + sum(svc[key]["errors"] for key in V2_KINDS if key in svc)
        lines.append(f"| service errors | {errors} | 0 | | {check(errors == 0)} |")
        batch_ratio = paired_ratio(
            results, "in_process", lambda svc, other: svc["batch"]["images_per_s"] / other["batched_images_per_s"]
        )
        lines.append(
            f"| service /v1/predict/batch, 256 PNGs, c={batch['concurrency']} (core 0) | "
            f"{batch['images_per_s']:,.0f} images/s, p50/p99 {batch['p50_ms']:.0f}/{batch['p99_ms']:.0f} ms, "
            f"{batch['server_cpu_ms_per_request']:.0f} CPU ms/request | "
            f"≥ {TARGET_BATCH_RATIO:.0%} of in-process batched | {batch_ratio:.0%} | "
            f"{check(batch_ratio >= TARGET_BATCH_RATIO)} |"
        )
        # The plain wrapper imports the same FastAPI, pydantic and onnxruntime: its time to ready is the
        # floor those imports set on this machine.
        plain_ready = f"; plain wrapper {ref['ready_s']:.2f} s" if ref and "ready_s" in ref else ""
        lines.append(
            f"| ready after start (process start to /readyz 200) | service {svc['ready_s']:.2f} s{plain_ready} | "
            f"≤ {TARGET_READY_S:.0f} s | | {check(svc['ready_s'] <= TARGET_READY_S)} |"
        )
        lines.append(
            f"| RSS after the load | {svc['rss_mb']:.0f} MB | ≤ {TARGET_RSS_MB:.0f} MB | | "
            f"{check(svc['rss_mb'] <= TARGET_RSS_MB)} |"
        )
    rows = results.get("matrix")
    if rows:
        lines += [
            "",
            "Unpinned (server and load generator share both cores), /v1/predict, "
            f"c={rows[0]['single']['concurrency']}:",
            "",
            "| workers × threads | batch size / delay | req/s | p50/p90/p99/max ms | errors | ready s | RSS MB |",
            "|---|---|---|---|---|---|---|",
        ]
        best = max(rows, key=lambda r: r["single"]["rps"] if r["single"]["errors"] == 0 else 0)
        for r in rows:
            mark = " **best**" if r is best else ""
            lines.append(
                f"| {r['workers']} × {r['threads']}{mark} | {r['batch_max_size']} / {r['batch_max_delay_ms']:g} ms | "
                f"{r['single']['rps']:,.0f} | {latency(r['single'])} | {r['single']['errors']} | "
                f"{r['ready_s']:.2f} | {r['rss_mb']:.0f} |"
            )
    return "\n".join(lines)


def parse_matrix(text: str) -> list[tuple[int, int, int, float]]:
    """ "1x1x64x0,2x1x64x0" → workers, threads, batch max size, batch max delay ms."""
    rows = []
    for item in text.split(","):
        workers, threads, size, delay = item.strip().split("x")
        rows.append((int(workers), int(threads), int(size), float(delay)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models", help="model repository")
    parser.add_argument("--model", help="model name (default: the only one)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for servers and load generator")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per load run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each load run")
    parser.add_argument("--concurrency", type=int, default=32, help="connections for /v1/predict and the V2 kinds")
    parser.add_argument("--batch-concurrency", type=int, default=2, help="connections for /v1/predict/batch")
    parser.add_argument(
        "--matrix",
        default="1x1x32x0,1x2x32x0,2x1x32x0,2x2x32x0,2x1x16x0,2x1x32x1",
        help="unpinned settings to compare: workers x threads x batch-max-size x batch-max-delay-ms, comma-separated",
    )
    parser.add_argument("--only", choices=["limit", "reference", "service", "matrix"], action="append")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the service (repeatable)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a service setting (a field of service.settings.Settings, e.g. inline_decode_max_bytes=0) for "
        "every service started here, as FASHION_SERVE_NAME (repeatable); an unknown name is an error",
    )
    parser.add_argument("--repeat", type=int, default=1, help="pinned runs to alternate; the median is reported")
    parser.add_argument("--slices", type=int, default=8, help="head to head: load slices per server (0: skip)")
    parser.add_argument("--slice-seconds", type=float, default=2.0, help="head to head: measured seconds per slice")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args(argv)

    from service.errors import ModelLoadError
    from service.model import locate

    try:
        settings = overrides.parse(args.set)
    except overrides.SettingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        folder = locate(args.models, args.model, None)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    opts = Options(
        python=args.python,
        models=args.models,
        model=args.model,
        model_name=folder.parent.name,
        seconds=args.seconds,
        warmup=args.warmup,
        concurrency=args.concurrency,
        batch_concurrency=args.batch_concurrency,
        matrix=parse_matrix(args.matrix) if args.matrix else [],
        env=dict(item.split("=", 1) for item in args.env),
        settings=settings,
        slices=args.slices,
        slice_seconds=args.slice_seconds,
        expected=expected_classes(folder / "model.onnx"),
    )
    steps = set(args.only or ["limit", "reference", "service", "matrix"])
    varied = sorted(set(settings) & set(MATRIX_SETTINGS)) if "matrix" in steps and opts.matrix else []
    if varied:
        print(f"note: the unpinned matrix sets {', '.join(varied)} per row, over --set", file=sys.stderr)
    onnx = folder / "model.onnx"
    # Both servers start from bytecode, as an installed package or the image does (pip and the Dockerfile
    # compile it); with PYTHONDONTWRITEBYTECODE set, a working tree would otherwise compile on every start.
    compileall.compile_dir(ROOT / "service", quiet=1)
    compileall.compile_dir(ROOT / "bench", quiet=1)
    results: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cpu": cpu_name(),
        "model": f"{folder.parent.name}/{folder.name}",
        "load_before": load_average(),
        "settings": {"env": opts.env, "set": opts.settings},
    }
    print(f"benchmarking {results['model']} on {results['cores']} cores; load average {results['load_before']}")
    # On a shared machine one run can be unlucky: with --repeat, the pinned measurements alternate;
    # the report shows each one's median run and the median of the back-to-back ratios (every run
    # is in the --json file).
    runs: dict[str, list[dict[str, Any]]] = {"in_process": [], "reference": [], "service": []}
    for attempt in range(args.repeat):
        suffix = f" ({attempt + 1}/{args.repeat})" if args.repeat > 1 else ""
        if "limit" in steps:
            print(f"in-process limit{suffix} …", flush=True)
            runs["in_process"].append(in_process(opts, onnx))
        if "reference" in steps:
            print(f"plain wrapper{suffix} …", flush=True)
            runs["reference"].append(reference(opts, onnx))
        if "service" in steps:
            print(f"service, pinned{suffix} …", flush=True)
            runs["service"].append(service_pinned(opts))
    medians = {
        "in_process": lambda r: r["batched_images_per_s"],
        "reference": lambda r: r["rps"],
        "service": lambda r: r["single"]["rps"],
    }
    for step, found in runs.items():
        if found:
            results[step] = sorted(found, key=medians[step])[len(found) // 2]
            results[f"{step}_runs"] = found
    if {"reference", "service"} <= steps and opts.slices:
        print("head to head …", flush=True)
        results["head_to_head"] = head_to_head(opts, onnx)
    if "matrix" in steps and opts.matrix:
        print("service, unpinned settings …", flush=True)
        results["matrix"] = matrix(opts)
    results["load_after"] = load_average()
    print()
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
