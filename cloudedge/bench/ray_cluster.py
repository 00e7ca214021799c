"""A throwaway Ray cluster on this machine (127.0.0.1), for the scale benchmark and the tests.

``local_cluster(nodes)`` starts a head carrying the ``cloud`` resource and, with ``nodes=2``, a
second node carrying ``edge``, with the same ``ray start`` commands as docs/cluster.md and token
authentication on. It yields ``(address, env)``: a driver process started with ``env`` joins with
``ray.init(address=address)``.

Stopping: each ``ray start`` runs in a new session, and every Ray process it spawns (GCS, raylet,
workers) stays in that session, so the cluster is stopped by signalling exactly those processes.
``ray stop`` is not used: it kills every Ray process of the machine by name, other users' included.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env(token: str) -> dict[str, str]:
    """This process's environment with Ray's token authentication on (and no inherited address)."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return env


def _session_pids(sessions: set[int]) -> list[int]:
    """Pids of the live processes whose session id is one of ``sessions`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name (which may hold spaces): state ppid pgrp session ...
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) in sessions and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def stop_sessions(sessions: set[int], grace_s: float = 3.0) -> None:
    """SIGTERM every process of ``sessions``, then SIGKILL what is left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _session_pids(sessions):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
        while _session_pids(sessions) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _session_pids(sessions):
            return


def _start(args: list[str], env: dict[str, str], sessions: set[int]) -> None:
    proc = subprocess.Popen([RAY, "start", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    sessions.add(proc.pid)  # a new session's id is its leader's pid
    out, _ = proc.communicate(timeout=240)
    if proc.returncode != 0:
        raise RuntimeError(f"ray start {' '.join(args)} failed:\n{out[-2000:]}")


@contextmanager
def local_cluster(nodes: int = 2, cpus_per_node: int = 1) -> Iterator[tuple[str, dict[str, str]]]:
    """Yield ``(address, env)`` of a running cluster of ``nodes`` (1 or 2); always stopped afterwards.

    One node: the head carries both ``cloud`` and ``edge``. Two: the head ``cloud``, the other
    node ``edge`` (room for 64 edges' actors), as in docs/cluster.md."""
    if nodes not in (1, 2):
        raise ValueError(f"local_cluster: nodes must be 1 or 2, got {nodes}")
    env = cluster_env(secrets.token_hex(16))
    port = free_port()
    address = f"127.0.0.1:{port}"
    temp = tempfile.mkdtemp(prefix="cloudedge-ray-")
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus_per_node), "--disable-usage-stats"]
    head_resources = '{"cloud": 1}' if nodes == 2 else '{"cloud": 1, "edge": 64}'
    sessions: set[int] = set()
    try:
        _start(["--head", "--port", str(port), "--resources", head_resources, "--include-dashboard", "false",
                "--temp-dir", temp, *common], env, sessions)
        if nodes == 2:
            _start(["--address", address, "--resources", '{"edge": 64}', *common], env, sessions)
        yield address, env
    finally:
        stop_sessions(sessions)
        shutil.rmtree(temp, ignore_errors=True)
