"""A real `shardwise serve` process for the benchmarks that load one."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import httpx


def start_server(*args: str) -> tuple[subprocess.Popen, str]:
    """`shardwise serve ARGS` on a free 127.0.0.1 port; returns it and its URL once healthy."""
    return launch(lambda port: [sys.executable, "-m", "shardwise.cli", "serve", "--port", str(port), *args],
                  "shardwise-serve")


def launch(command: Callable[[int], list[str]], name: str) -> tuple[subprocess.Popen, str]:
    """A server process, `command(port)` on a free 127.0.0.1 port, logging to a temporary file;
    returns it and its URL once /health answers 200 (within 300 s)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.NamedTemporaryFile("w+", prefix=f"{name}-", suffix=".log", delete=False)
    server = subprocess.Popen(command(port), stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    for _ in range(3000):
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            break
        time.sleep(0.1)
    server.kill()
    raise SystemExit(f"{name} did not start; its log, {log.name}:\n{open(log.name).read()[-3000:]}")
