"""A cluster's credentials (cluster/trust.py, cluster/membership.py): machines that share only the
join line's secret trust each other over real TLS, and a machine with another secret is refused.
(The lab's tests run them under Ray: tests/test_lab.py.)"""

from __future__ import annotations

import socket
import ssl
import stat
import threading

import pytest

from shardwise.cluster.membership import Membership, credentials_for
from shardwise.cluster.trust import new_secret, ray_token


def machine(tmp_path, monkeypatch, name: str, secret: str) -> Membership:
    """The credentials a machine of its own (its own cache) writes when it joins with `secret`."""
    monkeypatch.setenv("SHARDWISE_CACHE", str(tmp_path / name))
    return Membership.create("127.0.0.1:6379", secret, "127.0.0.1")


def handshake(server: Membership, client: Membership) -> bytes:
    """A mutually authenticated TLS exchange on 127.0.0.1, as two Ray nodes would make: what the
    client read back (an SSLError when either side refuses the other)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server.folder / "node.pem", server.folder / "node.key")
    context.load_verify_locations(server.folder / "authority.pem")
    context.verify_mode = ssl.CERT_REQUIRED  # (as Ray's servers: the client shows a certificate too)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(tls.recv(5).upper())
        except (ssl.SSLError, OSError):
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as raw:
            with client.tls_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"hello")
                return tls.recv(5)
    finally:
        thread.join(10)
        listener.close()


def test_machines_sharing_only_the_secret_trust_each_other_and_another_secret_is_refused(tmp_path, monkeypatch):
    secret = new_secret()
    head, node = machine(tmp_path, monkeypatch, "head", secret), machine(tmp_path, monkeypatch, "node", secret)
    assert head.folder != node.folder
    # each rebuilt the authority from the secret alone, and signed its own certificate
    assert (head.folder / "node.pem").read_bytes() != (node.folder / "node.pem").read_bytes()
    assert handshake(head, node) == b"HELLO" and handshake(node, head) == b"HELLO"
    stranger = machine(tmp_path, monkeypatch, "stranger", new_secret())
    for server, client in ((head, stranger), (stranger, node)):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            handshake(server, client)


def test_the_credentials_are_private_and_ray_sees_a_derived_token(tmp_path, monkeypatch):
    secret = new_secret()
    member = machine(tmp_path, monkeypatch, "head", secret)
    for name in ("secret", "node.key"):
        assert stat.S_IMODE((member.folder / name).stat().st_mode) == 0o600
    environment = credentials_for("127.0.0.1:6379")
    assert environment["RAY_USE_TLS"] == "1" and environment["RAY_AUTH_MODE"] == "token"
    # the token Ray sends is not the secret, the same on every machine, and another secret's differs
    assert environment["RAY_AUTH_TOKEN"] == ray_token(secret) != secret and ray_token(new_secret()) != ray_token(secret)
    assert member.join_line() == f"shardwise cluster join 127.0.0.1:6379 --token {secret}"
    assert credentials_for("127.0.0.1:1") == {}  # (no credentials, and nothing listening: Ray says so)
