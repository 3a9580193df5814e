"""A real `shardwise serve` process for the benchmarks that load one."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time

import httpx


def start_server(*args: str) -> tuple[subprocess.Popen, str]:
    """`shardwise serve ARGS` on a free 127.0.0.1 port; returns it and its URL once healthy."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.NamedTemporaryFile("w+", prefix="shardwise-serve-", suffix=".log", delete=False)
    server = subprocess.Popen([sys.executable, "-m", "shardwise.cli", "serve", "--port", str(port), *args],
                              stderr=log)
    url = f"http://127.0.0.1:{port}"
    for _ in range(3000):
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.kill()
    raise SystemExit(f"the server did not start in 300 s; its log, {log.name}:\n{open(log.name).read()[-3000:]}")
