"""Run a server: the engine on this (the main) thread, uvicorn's event loop on another.

The engine stays on the thread that loaded the model because torch's CPU kernels ran
40 % slower here on a second thread once the first had used them; the event loop does
no tensor work, so it loses nothing on its own thread.
"""

from __future__ import annotations

import signal
import socket
import ssl
import threading
import time

import uvicorn

from shardwise.collab.wire import MAX_HIDDEN_BYTES
from shardwise.errors import ShardwiseError
from shardwise.llm import LLM
from shardwise.serve.api import create_app
from shardwise.serve.limits import ServerLimits


def serve(llm: LLM, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: ServerLimits | None = None, on_ready=None, ssl_certfile: str | None = None,
          ssl_keyfile: str | None = None, **options) -> None:
    """Serve until interrupted; closes llm on the way out. SIGTERM drains: new requests are refused,
    running ones may finish for limits.drain_timeout_s, then each still open ends with an error
    event. ssl_certfile / ssl_keyfile: HTTPS and WSS (the certificate chain and its key, PEM).
    options: create_app's."""
    check_tls_files(ssl_certfile, ssl_keyfile)  # (else uvicorn's thread would die saying nothing useful)
    limits = limits or ServerLimits()
    app = create_app(llm, api_key=api_key, limits=limits, **options)
    engine = app.state.engine
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           ws_max_size=MAX_HIDDEN_BYTES, timeout_graceful_shutdown=5,
                                           ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile))
    http = threading.Thread(target=server.run, name="shardwise-http", daemon=True)
    try:
        http.start()
        while not server.started:  # uvicorn fails on its thread (e.g. the port is taken): say so here
            if not http.is_alive():
                raise _cannot_listen(host, port)
            time.sleep(0.05)
        if on_ready:
            on_ready()
        signal.signal(signal.SIGTERM, lambda *_: engine.drain(limits.drain_timeout_s))
        engine.run()  # returns once drained after SIGTERM, or when the app shuts down
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join(timeout=10)
        llm.close()


def check_tls_files(certfile: str | None, keyfile: str | None) -> None:
    """A ShardwiseError now if the certificate and key are not a usable pair (or only one is given)."""
    if (certfile is None) != (keyfile is None):
        raise ShardwiseError("HTTPS needs both --ssl-certfile and --ssl-keyfile (or neither, for plain HTTP)")
    if certfile is None:
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as e:
        raise ShardwiseError(f"cannot use {certfile} and {keyfile} for HTTPS ({e}): give a PEM certificate "
                             "(chain) and the private key that belongs to it") from None


def check_address(host: str, port: int) -> None:
    """A ShardwiseError now if host:port cannot be listened on (taken, or not this machine's), so
    that `shardwise serve` says so before it spends time loading the model."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.create_server((host, port), family=family):
            pass
    except OSError:
        raise _cannot_listen(host, port) from None


def _cannot_listen(host: str, port: int) -> ShardwiseError:
    return ShardwiseError(f"cannot listen on {host}:{port}: is another server using it? Choose another --port")
