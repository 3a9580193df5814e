"""This machine in a cluster: `cluster start` (the head), `cluster join` (any other machine),
`cluster stop`, and what `cluster status` shows of every node.

`ray start` remains the engine: each command writes the node's credentials (cluster/trust.py)
and runs it with them in its environment, so Ray's daemons and every worker they start
authenticate with the cluster's token and speak TLS. What a machine holds for each cluster it is
in lives in cache_dir()/clusters/<host>_<port>/, found by the head's address: a driver on this
machine that joins that address (`--address`, or `auto`) takes the same credentials.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardwise.cache import cache_dir
from shardwise.cluster.trust import node_certificate, ray_token
from shardwise.errors import ShardwiseError
from shardwise.model.pieces import partial_copies
from shardwise.model.registry import fetched_models

CURRENT_RAY_CLUSTER = Path("/tmp/ray/ray_current_cluster")  # what Ray's address "auto" reads
DEFAULT_PORT = 6379
ANSWER_S = 10.0  # how long a head has to answer a join
START_S = 300.0  # how long `ray start` may take (it may wait for a head that answered, forever)


@dataclass
class Membership:
    """This machine's part in one cluster: the head's address, the secret, the node's certificate."""

    head: str  # host:port
    folder: Path

    @classmethod
    def create(cls, head: str, secret: str, node_ip: str) -> Membership:
        """Write the credentials of the node at node_ip (replacing any this machine had for `head`)."""
        folder = _folder(head)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, mode=0o700)
        authority, certificate, key = node_certificate(secret, [node_ip])
        for name, data in {"secret": secret.encode(), "authority.pem": authority, "node.pem": certificate,
                           "node.key": key}.items():
            with os.fdopen(os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(data)
        (folder / "cluster.json").write_text(json.dumps({"head": head}))
        return cls(head, folder)

    @classmethod
    def of(cls, address: str | None) -> Membership | None:
        """This machine's credentials for the cluster at `address` ("auto": the one Ray would join),
        or None when it has none."""
        if address in (None, "local"):
            return None
        if address == "auto":
            address = os.environ.get("RAY_ADDRESS") or (
                CURRENT_RAY_CLUSTER.read_text().strip() if CURRENT_RAY_CLUSTER.is_file() else "")
        try:
            folder = _folder(address)
        except ShardwiseError:
            return None  # (not HOST:PORT: Ray says what is wrong with it)
        return cls(address, folder) if (folder / "cluster.json").is_file() else None

    @property
    def secret(self) -> str:
        return (self.folder / "secret").read_text()

    def environment(self) -> dict[str, str]:
        """What Ray reads (its daemons, workers and drivers) to authenticate and encrypt."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ray_token(self.secret), "RAY_USE_TLS": "1",
                "RAY_TLS_SERVER_CERT": str(self.folder / "node.pem"),
                "RAY_TLS_SERVER_KEY": str(self.folder / "node.key"),
                "RAY_TLS_CA_CERT": str(self.folder / "authority.pem")}

    def tls_context(self) -> ssl.SSLContext:
        """What speaks to another node as Ray does: this node's certificate, the cluster's authority."""
        context = ssl.create_default_context(cafile=self.folder / "authority.pem")
        context.load_cert_chain(self.folder / "node.pem", self.folder / "node.key")
        context.set_alpn_protocols(["h2"])
        return context

    def join_line(self) -> str:
        return f"shardwise cluster join {self.head} --token {self.secret}"

    def forget(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _folder(head: str) -> Path:
    host, _, port = head.rpartition(":")
    if not host or not port.isdigit():
        raise ShardwiseError(f"'{head}' is not a cluster address: give the head's HOST:PORT, e.g. 10.0.0.5:6379")
    return cache_dir() / "clusters" / f"{host}_{port}"


def local_ip_towards(host: str) -> str:
    """The address this machine reaches `host` from (no packet is sent: a UDP socket's route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))
            return s.getsockname()[0]
        except OSError as e:
            raise ShardwiseError(f"no route from this machine to {host} ({e.strerror}): check the address, "
                                 "or give --node-ip") from None


def start(secret: str, port: int = DEFAULT_PORT, node_ip: str | None = None,
          ray_options: list[str] = ()) -> Membership:
    """Start this machine as the head of a new cluster (its node at node_ip: by default the
    address of its default route)."""
    node_ip = node_ip or _default_ip()
    membership = Membership.create(f"{node_ip}:{port}", secret, node_ip)
    _ray_start(membership, ["--head", f"--port={port}", f"--node-ip-address={node_ip}", "--disable-usage-stats",
                            *ray_options])
    return membership


def join(head: str, secret: str, node_ip: str | None = None, ray_options: list[str] = ()) -> Membership:
    """Start this machine as a node of the cluster whose head is at `head` (HOST:PORT)."""
    node_ip = node_ip or local_ip_towards(head.rpartition(":")[0])
    membership = Membership.create(head, secret, node_ip)
    try:
        check_head(membership)
    except ShardwiseError:
        membership.forget()
        raise
    _ray_start(membership, [f"--address={head}", f"--node-ip-address={node_ip}", "--disable-usage-stats",
                            *ray_options])
    return membership


def check_head(membership: Membership) -> None:
    """That the head answers and is of the same cluster (its certificate is from the authority the
    secret gives, and it takes this node's): Ray itself would wait, saying nothing, for ever."""
    host, _, port = membership.head.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=ANSWER_S) as raw:
            with membership.tls_context().wrap_socket(raw, server_hostname=host) as tls:
                tls.settimeout(1.0)
                try:
                    tls.recv(1)  # (a head that refuses this node's certificate says so now)
                except TimeoutError:
                    pass
    except ssl.SSLError as e:
        raise ShardwiseError(f"the head at {membership.head} is not of this token's cluster ({e.reason}): use the "
                             "token its `shardwise cluster start` printed") from None
    except OSError as e:
        raise ShardwiseError(f"nothing answers at {membership.head} ({e.strerror or e}): is `shardwise cluster "
                             "start` running there, and its port open to this machine?") from None


def credentials_for(address: str | None) -> dict[str, str]:
    """Ray's settings for joining the cluster at `address` from this machine: its credentials
    where it has them, none for a cluster without TLS; a cluster with TLS that this machine never
    joined is a ShardwiseError (Ray would retry for minutes)."""
    membership = Membership.of(address)
    if membership is not None:
        return membership.environment()
    if address not in (None, "auto", "local") and "RAY_USE_TLS" not in os.environ and speaks_tls(address):
        raise ShardwiseError(f"the cluster at {address} speaks TLS (`shardwise cluster start` made it), and this "
                             f"machine has no credentials for it: run `shardwise cluster join {address} --token ...` "
                             "here first (the line `cluster start` printed)")
    return {}


def speaks_tls(head: str) -> bool:
    """Whether what listens at `head` (HOST:PORT) answers in TLS (a cluster `cluster start` made)."""
    host, _, port = head.rpartition(":")
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # (only whether it speaks TLS)
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, int(port)), timeout=ANSWER_S) as raw, context.wrap_socket(raw):
            return True
    except ssl.SSLError as e:
        return "ALERT" in (e.reason or "")  # (a TLS server's refusal; a plain one's reply is no TLS at all)
    except (OSError, ValueError):
        return False  # (nothing there: Ray says so)


def forget(head: str) -> bool:
    """Forget this machine's credentials for the cluster at `head`: whether it had any."""
    membership = Membership.of(head)
    if membership is not None:
        membership.forget()
    return membership is not None


def stop() -> list[str]:
    """Stop every Ray process of this machine and forget its clusters' credentials (the heads'
    addresses it was in)."""
    done = subprocess.run([_ray(), "stop"], capture_output=True, text=True)
    if done.returncode != 0:
        raise ShardwiseError(f"ray stop failed: {(done.stderr or done.stdout).strip()[-800:]}")
    clusters = cache_dir() / "clusters"
    memberships = [json.loads(p.read_text())["head"] for p in clusters.glob("*/cluster.json")]
    shutil.rmtree(clusters, ignore_errors=True)
    return memberships


def _ray_start(membership: Membership, arguments: list[str]) -> None:
    try:
        done = subprocess.run([_ray(), "start", *arguments], env={**os.environ, **membership.environment()},
                              capture_output=True, text=True, timeout=START_S)
    except subprocess.TimeoutExpired:
        membership.forget()
        raise ShardwiseError(f"ray start did not finish in {START_S:.0f} s: see its logs in "
                             "/tmp/ray/session_latest/logs, then `shardwise cluster stop` and try again") from None
    if done.returncode != 0:
        membership.forget()
        said = (done.stderr or done.stdout).strip()
        raise ShardwiseError(f"ray start failed: {said[-800:]}\n(a node already running here: `shardwise cluster "
                             "stop` first; a head that does not answer: check its address, port and firewall, and "
                             "that the token is the one `cluster start` printed)")


def _ray() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _default_ip() -> str:
    try:
        return local_ip_towards("192.0.2.1")  # (TEST-NET: only the route is looked up)
    except ShardwiseError:
        return socket.gethostbyname(socket.gethostname())


# --- what `cluster status` shows ---------------------------------------------------------------
def status() -> list[dict[str, Any]]:
    """Every alive node of the cluster this process joined (the head first): what it offers
    Ray, and what it is and holds (asked on the node itself)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ask = ray.remote(num_cpus=0)(inventory)
    nodes = sorted((n for n in ray.nodes() if n["Alive"]),
                   key=lambda n: ("node:__internal_head__" not in n["Resources"], n["NodeManagerAddress"]))
    found = ray.get([ask.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
                     for n in nodes], timeout=120)
    return [{"node": n["NodeManagerAddress"], "name": n.get("NodeName", ""), "id": n["NodeID"],
             "head": "node:__internal_head__" in n["Resources"], "cpus": n["Resources"].get("CPU", 0.0),
             "gpus": n["Resources"].get("GPU", 0.0), "memory": n["Resources"].get("memory", 0.0), **inventory_of}
            for n, inventory_of in zip(nodes, found, strict=True)]


def inventory() -> dict[str, Any]:
    """What this node is and holds: its machine, its last profile, the model files in its cache."""
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in _lines("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or platform.machine())
    profiles = [json.loads(p.read_text()) for p in sorted((cache_dir() / "profiles").glob("*.json"))]
    held = [{"model": name, "bytes": held, "of": size} for name, held, size in partial_copies()]
    held += [{"model": f.name, "bytes": f.stat().st_size, "of": f.stat().st_size} for f in fetched_models()]
    return {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(), "profiles": profiles, "held": held}


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []
