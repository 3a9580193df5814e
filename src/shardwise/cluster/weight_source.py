"""Weights that reach the stages: a stage whose node lacks the model file fetches the pieces its
layers read (model/pieces.py) from the driver's node, through Ray's object store, checks each
against the SHA-256 the driver's node computed from its own file, and keeps them in its node's
cache, so that a second start there fetches nothing.

WeightSource is the actor on the driver's node that reads the file; `local_model` is what a
stage runs, inside its load, before it opens the model (so that starts, recoveries, moves and
joins all fetch the same way, without the driver waiting on any of them).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import ray
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from shardwise.errors import ShardwiseError
from shardwise.model.pieces import Layout, PartialCopy, Piece, holds_whole
from shardwise.model.spec import ModelSpec

log = logging.getLogger(__name__)
IN_FLIGHT = 4  # pieces a stage asks for before the first arrives (each PIECE_BYTES at most)


@ray.remote(num_cpus=0)
class WeightSource:
    """The driver's model file, served a piece at a time; and how far each node has got."""

    def __init__(self, path: str, spec: ModelSpec):
        self.layout, self.spec = Layout(Path(path)), spec
        self.progress_by_node: dict[str, list[int]] = {}  # node address -> [bytes sent, bytes it needs]

    def describe(self, layers: tuple[int, int]) -> tuple[str, str, dict[str, int], list[Piece]]:
        """The model's identity, name and file sizes, and the pieces these layers read."""
        layout = self.layout
        return layout.identity, layout.path.name, layout.sizes, layout.pieces_for(self.spec, layers)

    def digests(self, node: str, pieces: list[Piece]) -> dict[Piece, str]:
        """Each piece's SHA-256, for a node about to fetch them (counted into its progress)."""
        sent, needed = self.progress_by_node.setdefault(node, [0, 0])
        self.progress_by_node[node] = [sent, needed + sum(p.size for p in pieces)]
        return self.layout.digests(pieces)

    def read(self, node: str, piece: Piece) -> bytes:
        data = self.layout.read(piece)
        self.progress_by_node[node][0] += len(data)
        return data

    def progress(self) -> dict[str, list[int]]:
        return self.progress_by_node


def local_model(path: str, layers: tuple[int, int], source, fetch: bool | None) -> str:
    """Where this stage's node reads the model: the driver's path if the node has those files
    (unless fetch is True), else its cache's partial copy, after fetching what it lacks."""
    if source is None:
        if not Path(path).exists():
            raise ShardwiseError(f"node {ray.util.get_node_ip_address()} has no {path}: copy the model to "
                                 "that path there, or let the stages fetch their layers (leave out --no-fetch-weights)")
        return path
    identity, name, sizes, pieces = ray.get(source.describe.remote(layers))
    if fetch is not True and holds_whole(Path(path), sizes):
        return path
    copy = PartialCopy(identity, name, sizes)
    missing = copy.missing(pieces)
    if missing:
        node, started = ray.util.get_node_ip_address(), time.perf_counter()
        digests = ray.get(source.digests.remote(node, missing))
        asked = {i: source.read.remote(node, piece) for i, piece in enumerate(missing[:IN_FLIGHT])}
        for i, piece in enumerate(missing):
            if i + IN_FLIGHT < len(missing):
                asked[i + IN_FLIGHT] = source.read.remote(node, missing[i + IN_FLIGHT])
            copy.write(piece, ray.get(asked.pop(i)), digests[piece])  # (its bytes freed once written)
        log.info("fetched %.1f MB of %s for layers [%d, %d) in %.1f s", sum(p.size for p in missing) / 1e6, name,
                 *layers, time.perf_counter() - started)
    return str(copy.path)


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
