"""A real two-node Ray cluster on 127.0.0.1 for tests: a head with `cloud`, a node with `edge`.

Token authentication is on (RAY_AUTH_MODE=token with a fresh random token), so the tests also
check that a client without the token is refused.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env(token: str) -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return env


def ray_stop(env: dict[str, str]) -> None:
    subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


@contextmanager
def two_node_cluster():
    """Yield (address, env) of a running head + edge node; always stopped afterwards."""
    token = secrets.token_hex(16)
    env = ray_env(token)
    port = free_port()
    temp = tempfile.mkdtemp(prefix="cloudedge-ray-")
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", "--port", str(port), "--resources", '{"cloud": 1}',
                        "--include-dashboard", "false", "--temp-dir", temp, *common],
                       env=env, check=True, capture_output=True, timeout=180)
        subprocess.run([RAY, "start", "--address", address, "--resources", '{"edge": 2}', *common],
                       env=env, check=True, capture_output=True, timeout=180)
        yield address, env
    finally:
        ray_stop(env)
        shutil.rmtree(temp, ignore_errors=True)
