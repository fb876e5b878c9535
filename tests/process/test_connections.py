"""The HTTP connection against a real server (service/api/protocol.py): the header timeout, malformed requests
answered with the JSON error shape after the requests pipelined before them, SIGTERM that loses no request a
client had sent, and the in-flight gauge of a worker killed with SIGKILL leaving /metrics.

Raw sockets where httpx would not send what is needed. Only 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import PREDICT, Server, good_png, running_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("connections"), header_timeout_s=1) as running:
        yield running


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_responses(sock: socket.socket, count: int, timeout: float = 10) -> list[tuple[int, dict[str, str], bytes]]:
    """`count` responses (status, headers, body) read off the socket, or fewer if it closes first."""
    sock.settimeout(timeout)
    data, out = b"", []
    while len(out) < count:
        head_end = data.find(b"\r\n\r\n")
        if head_end >= 0:
            lines = data[:head_end].decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            length = int(headers.get("content-length", "0"))
            if len(data) >= head_end + 4 + length:
                out.append((int(lines[0].split()[1]), headers, data[head_end + 4 : head_end + 4 + length]))
                data = data[head_end + 4 + length :]
                continue
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    return out


def closed(sock: socket.socket, timeout: float = 5) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def predict_request(connection: str = "keep-alive") -> bytes:
    png = good_png()
    head = f"POST {PREDICT} HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: {len(png)}\r\n"
    return head.encode() + f"Connection: {connection}\r\n\r\n".encode() + png


# ---------------------------------------------------------------------------------- header timeout


def test_headers_sent_too_slowly_get_408_and_the_connection_closes(server: Server) -> None:
    with connect(server.url) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: t\r\n")
        start = time.monotonic()
        (status, headers, body), *_ = read_responses(sock, 1, timeout=10)
        assert status == 408 and headers["connection"] == "close" and "within 1 s" in json.loads(body)["error"]
        assert 0.8 < time.monotonic() - start < 5
        assert closed(sock)


def test_a_connection_that_sends_nothing_is_closed(server: Server) -> None:
    with connect(server.url) as sock:
        start = time.monotonic()
        assert closed(sock, timeout=10) and time.monotonic() - start < 5


def test_a_keep_alive_connection_is_not_cut_by_the_header_timeout(server: Server) -> None:
    """The timeout counts from a request's first byte: requests a second apart on one connection are fine."""
    with connect(server.url) as sock:
        for _ in range(3):
            sock.sendall(predict_request())
            assert [r[0] for r in read_responses(sock, 1)] == [200]
            time.sleep(1.2)  # longer than the header timeout, shorter than keep-alive (5 s)


# -------------------------------------------------------------------------------- malformed requests

MALFORMED = {
    "content-length-not-a-number": b"POST /v1/predict HTTP/1.1\r\nHost: t\r\nContent-Length: ten\r\n\r\n",
    "content-length-and-chunked": b"POST /v1/predict HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "nul-in-a-header": b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Bad: a\x00b\r\n\r\n",
    "nul-in-the-path": b"GET /hea\x00lthz HTTP/1.1\r\nHost: t\r\n\r\n",
    "bad-chunk-size": b"POST /v1/predict HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nabc\r\n0\r\n\r\n",
    "garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 TLS hello\r\n\r\n",
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_requests_get_the_json_error_shape(server: Server, name: str) -> None:
    with connect(server.url) as sock:
        sock.sendall(MALFORMED[name])
        responses = read_responses(sock, 1)
        assert responses, "no answer"
        status, headers, body = responses[0]
        assert status == 400 and headers["content-type"] == "application/json", (status, headers, body)
        assert json.loads(body)["error"].startswith("invalid HTTP request")
        assert headers["connection"] == "close" and closed(sock)


def test_requests_pipelined_before_a_malformed_one_are_answered(server: Server) -> None:
    with connect(server.url) as sock:
        sock.sendall(predict_request() + predict_request() + MALFORMED["content-length-not-a-number"])
        responses = read_responses(sock, 3)
        assert [r[0] for r in responses] == [200, 200, 400], [(r[0], r[2][:100]) for r in responses]
        assert json.loads(responses[2][2])["error"].startswith("invalid HTTP request")
        assert closed(sock)


# ------------------------------------------------------------------------------------------ shutdown


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_answers_every_request_already_sent(tmp_path: Path, workers: int) -> None:
    """Clients sending back to back on kept-alive connections and on a new connection each, and idle kept-alive
    connections that send a request just after the signal: every request written before the server stopped
    accepting is answered (200, Connection: close); what fails afterwards fails to connect, never with a reset
    or an empty reply. With several workers too (the supervisor's socket: see service/api/protocol.py)."""
    with running_server(tmp_path, shutdown_grace_s=10, workers=workers) as server:
        idle = [connect(server.url) for _ in range(8)]
        for sock in idle:  # one request each, then idle on a kept-alive connection
            sock.sendall(predict_request())
            assert [r[0] for r in read_responses(sock, 1)] == [200]
        outcomes: list[str] = []
        stop = threading.Event()

        def hammer(fresh: bool) -> None:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                while not stop.is_set():
                    try:
                        post = httpx.post if fresh else client.post
                        response = post(
                            server.url + PREDICT, content=good_png(), headers={"Content-Type": "image/png"}, timeout=30
                        )
                        outcomes.append(str(response.status_code))
                    except httpx.ConnectError:
                        outcomes.append("refused")
                        time.sleep(0.05)
                    except httpx.HTTPError as exc:
                        outcomes.append(type(exc).__name__)

        threads = [threading.Thread(target=hammer, args=(fresh,)) for fresh in (False, True) * 3]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.25)  # uvicorn notices the signal within 0.1 s: the server has stopped accepting
        for sock in idle:  # a request on each idle kept-alive connection, as the server shuts down
            sock.sendall(predict_request())
        late = [read_responses(sock, 1) for sock in idle]
        server.process.wait(timeout=20)
        stop.set()
        for thread in threads:
            thread.join(30)
        for sock in idle:
            sock.close()
    late_statuses = [r[0][0] if r else None for r in late]
    print(f"\nSIGTERM: load outcomes {sorted(set(outcomes))}, late requests on idle connections {late_statuses}")
    assert server.process.returncode == 0
    assert all(r and r[0][0] == 200 for r in late), late
    if workers == 1:  # with a supervisor, a worker may only get its SIGTERM up to 0.5 s later: then keep-alive
        assert all(r[0][1].get("connection") == "close" for r in late), [r[0][1] for r in late]
    assert set(outcomes) <= {"200", "refused"}, [o for o in outcomes if o not in ("200", "refused")]


# ------------------------------------------------------------------------------------------- metrics


def in_flight(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    match = re.search(r"^http_requests_in_flight (\S+)$", text, re.M)
    assert match, text[:500]
    return float(match.group(1))


def worker_pids(parent: int) -> list[int]:
    """uvicorn's worker processes under `parent` (multiprocessing's spawned children, not its resource tracker)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if re.search(rf"^PPid:\s+{parent}$", status, re.M) and b"spawn_main" in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


def test_a_killed_workers_in_flight_gauge_leaves_metrics(tmp_path: Path) -> None:
    """Two workers, requests held in flight on both (bodies that stop half way), one worker killed with
    SIGKILL: once the stalled clients go, /metrics counts only its own request, not the dead worker's."""
    with running_server(tmp_path, workers=2, request_timeout_s=60, body_idle_timeout_s=60) as server:
        stalled = []
        for _ in range(12):
            sock = connect(server.url)
            sock.sendall(
                b"POST /v1/predict HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\nab"
            )
            stalled.append(sock)
        time.sleep(1.0)
        assert in_flight(server.url) >= 12
        workers = worker_pids(server.process.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        for sock in stalled:
            sock.close()
        deadline = time.monotonic() + 30
        value = in_flight(server.url)
        while value != 1 and time.monotonic() < deadline:
            time.sleep(0.5)
            value = in_flight(server.url)
        print(f"\nin flight after the SIGKILL and the stalled clients gone: {value}")
        assert value == 1
