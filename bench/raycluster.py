"""A real multi-node Ray cluster on this one machine, for the Ray engine's tests and its benchmark.

Each node is a separate `ray start` (the head with `--head`, the others with `--address`), with its own CPUs,
raylet and object store, all on loopback: 127.0.0.2, because Ray replaces 127.0.0.1 and `localhost` by the
machine's network address, and this cluster talks to nobody else. Token authentication is on, with a token
made for the cluster and handed to every process through the environment (`env()`), so nothing is read from or
written to ~/.ray. Everything it starts is found by its own temporary folder or its GCS address, with the
processes those started, and stopped by process id (never `ray stop`, which stops every Ray on the machine).

    with LocalRayCluster(nodes=2, cpus=1) as cluster:
        subprocess.run([..., "--engine", "ray", "--address", cluster.address], env=cluster.env())
        cluster.kill_node(cluster.nodes[1])     # SIGKILL of that node's raylet: the node is lost
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

HOST = "127.0.0.2"
START_TIMEOUT_S = 180  # one `ray start` on a loaded 2-core machine: 10-30 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))  # free on every interface: some of Ray's servers listen on all of them
        return s.getsockname()[1]


def ray_command() -> str:
    beside = Path(sys.executable).with_name("ray")
    found = str(beside) if beside.exists() else shutil.which("ray")
    if not found:
        raise RuntimeError("the `ray` command is missing: pip install 'fashion-serve[ray]'")
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def parents() -> dict[int, int]:
    """pid -> parent pid, for every process now."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                found[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    return found


def descendants(roots: set[int], tree: dict[int, int]) -> set[int]:
    """Every process started by one of `roots`, or by one of those, and so on (`tree`: pid -> parent pid)."""
    found: set[int] = set()
    frontier = set(roots)
    while frontier:
        frontier = {pid for pid, parent in tree.items() if parent in frontier and pid not in found | roots}
        found |= frontier
    return found


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by its parent, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@dataclass
class Node:
    index: int
    manager_port: int
    head: bool

    @property
    def name(self) -> str:
        return "head" if self.head else f"node {self.index}"


class LocalRayCluster:
    def __init__(self, nodes: int = 2, cpus: int = 1, object_store_mb: int = 256) -> None:
        self.wanted, self.cpus, self.object_store_mb = nodes, cpus, object_store_mb
        self.temp_dir = tempfile.mkdtemp(prefix="fsray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        self.port = free_port()
        self.address = f"{HOST}:{self.port}"
        self.token = secrets.token_hex(32)
        self.nodes: list[Node] = []
        self.log = Path(self.temp_dir) / "ray-start.log"

    def env(self) -> dict[str, str]:
        """The environment of every process of the cluster, and of its drivers."""
        return {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
        }

    def __enter__(self) -> LocalRayCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        for _ in range(self.wanted):
            self.add_node()

    def add_node(self) -> Node:
        head = not self.nodes
        node = Node(len(self.nodes), free_port(), head)
        command = [
            ray_command(), "start", f"--num-cpus={self.cpus}", f"--node-ip-address={HOST}",
            f"--node-manager-port={node.manager_port}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={self.temp_dir}",
            f"--object-store-memory={self.object_store_mb * 1024 * 1024}", "--disable-usage-stats",
        ]  # fmt: skip
        if head:
            command += [
                "--head", f"--port={self.port}", "--include-dashboard=false",
                f"--ray-client-server-port={free_port()}",
            ]  # fmt: skip
        else:
            command.append(f"--address={self.address}")
        with self.log.open("ab") as log:
            started = time.monotonic()
            done = subprocess.run(command, env=self.env(), stdout=log, stderr=log, timeout=START_TIMEOUT_S)
        if done.returncode != 0:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-25:])
            raise RuntimeError(f"`ray start` for the {node.name} exited {done.returncode}:\n{tail}")
        self.nodes.append(node)
        print(f"[ray] {node.name} up in {time.monotonic() - started:.1f} s ({self.address})", file=sys.stderr)
        return node

    def raylet_pid(self, node: Node) -> int | None:
        for pid in parents():
            line = cmdline(pid)
            if "raylet" in line and self.temp_dir in line and f"--node_manager_port={node.manager_port} " in line:
                return pid
        return None

    def kill_node(self, node: Node) -> int:
        """SIGKILL of the node's raylet and of every process it started (its agents, workers and actors), all
        at once, as when the machine under a node fails. Returns the raylet's pid."""
        pid = self.raylet_pid(node)
        if pid is None:
            raise RuntimeError(f"no raylet found for the {node.name}")
        for victim in {pid} | descendants({pid}, parents()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        return pid

    def pids(self) -> set[int]:
        """This cluster's processes: those naming its folder or its GCS address, and every process they started."""
        tree = parents()
        address = re.compile(re.escape(self.address) + r"(?!\d)")
        mine = {
            pid
            for pid in tree
            if pid != os.getpid() and (self.temp_dir in (line := cmdline(pid)) or address.search(line))
        }
        return mine | descendants(mine, tree)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to every process of the cluster, SIGKILL to those left after `grace_s`; the folder removed."""
        deadline = time.monotonic() + grace_s
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        while time.monotonic() < deadline and any(alive(pid) for pid in pids):
            time.sleep(0.2)
        for pid in pids | self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
