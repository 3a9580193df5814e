"""A model's files as byte ranges ("pieces"), so that a node that lacks the model can hold just
the part its layers read: each file's header (GGUF metadata and tensor table, a safetensors
header), each tensor a stage needs, and the small files of an HF directory (config, tokenizer)
whole. `Layout` is the driver's side: which pieces layers [a, b) need, and each piece's SHA-256
(computed only when a node must fetch it; kept beside the model cache). `PartialCopy` is the
node's side: the same files at the same offsets, sparse, in the node's cache, written a verified
piece at a time, so that the usual readers open it as if it were the whole model.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shardwise.cache import cache_dir
from shardwise.errors import ShardwiseError
from shardwise.model.spec import ModelSpec

PIECE_BYTES = 16 << 20  # a tensor larger than this travels (and is checked) in pieces of this size
# in an HF directory, weights in formats shardwise does not read (safetensors are what it reads)
OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx")
# where a tensor's layer is in its name: GGUF "blk.{i}.", HF "model.layers.{i}."
LAYER_NAME = re.compile(r"^(?:blk|model\.layers)\.(\d+)\.")
FIRST_STAGE = ("token_embd.weight", "model.embed_tokens.weight")
LAST_STAGE = ("output_norm.weight", "model.norm.weight", "output.weight", "lm_head.weight")


@dataclass(frozen=True, order=True)
class Piece:
    file: str  # relative to the model's path ("" for a single .gguf file)
    offset: int
    size: int


class Layout:
    """Where each tensor of a model lies in its files."""

    def __init__(self, path: Path):
        self.path = path
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix not in OTHER_WEIGHTS) \
            if path.is_dir() else [path]
        self.sizes = {self._name(f): f.stat().st_size for f in files}
        self.identity = hashlib.sha256(json.dumps(
            [path.name, *((n, s, (path / n if n else path).stat().st_mtime_ns) for n, s in self.sizes.items())]
        ).encode()).hexdigest()[:24]
        self.headers: list[Piece] = []  # always needed
        self.tensors: dict[str, Piece] = {}  # by the file's own tensor name
        for f in files:
            name = self._name(f)
            if f.suffix == ".gguf":
                self._read_gguf(f, name)
            elif f.suffix == ".safetensors":
                self._read_safetensors(f, name)
            else:  # config, tokenizer, chat template: small, whole
                self.headers.append(Piece(name, 0, self.sizes[name]))

    def _name(self, file: Path) -> str:
        return file.name if self.path.is_dir() else ""

    def _read_gguf(self, file: Path, name: str) -> None:
        from shardwise.model.weights import _gguf_index

        _, tensors = _gguf_index(file)
        start = min((t.offset for t in tensors.values()), default=self.sizes[name])
        self.headers.append(Piece(name, 0, start))
        self.tensors.update({t_name: Piece(name, t.offset, t.nbytes) for t_name, t in tensors.items()})

    def _read_safetensors(self, file: Path, name: str) -> None:
        with file.open("rb") as f:  # the format: an 8-byte length, a JSON table, the tensors' bytes
            length = struct.unpack("<Q", f.read(8))[0]
            table = json.loads(f.read(length))
        start = 8 + length
        self.headers.append(Piece(name, 0, start))
        for t_name, t in table.items():
            if t_name != "__metadata__":
                begin, end = t["data_offsets"]
                self.tensors[t_name] = Piece(name, start + begin, end - begin)

    def pieces_for(self, spec: ModelSpec, layers: tuple[int, int]) -> list[Piece]:
        """What a stage with these layers reads, in pieces of at most PIECE_BYTES."""
        first, last = layers[0] == 0, layers[1] == spec.num_layers
        tied = not any(n in self.tensors for n in ("output.weight", "lm_head.weight"))
        wanted = []
        for name, piece in self.tensors.items():
            if match := LAYER_NAME.match(name):
                keep = layers[0] <= int(match.group(1)) < layers[1]
            elif name in FIRST_STAGE:
                keep = first or (last and tied)
            elif name in LAST_STAGE:
                keep = last
            else:  # (e.g. Llama 3's rope_freqs: small, and every stage's)
                keep = True
            if keep:
                wanted.append(piece)
        return sorted({small for piece in self.headers + wanted for small in _split(piece)})

    def digests(self, pieces: list[Piece]) -> dict[Piece, str]:
        """Each piece's SHA-256, read from the files once and kept beside the model cache."""
        cached = cache_dir() / "piece-digests" / f"{self.identity}.json"
        known = json.loads(cached.read_text()) if cached.is_file() else {}
        for piece in pieces:
            key = _key(piece)
            if key not in known:
                known[key] = hashlib.sha256(self.read(piece)).hexdigest()
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(known))
        partial.replace(cached)
        return {piece: known[_key(piece)] for piece in pieces}

    def read(self, piece: Piece) -> bytes:
        return read_piece(self.path, piece)


class PartialCopy:
    """A node's copy of some of a model's pieces, at cache_dir()/fetched/<identity>/<its name>:
    the files at full size (sparse where nothing is written), and the list of pieces that
    arrived and matched their digests."""

    def __init__(self, identity: str, name: str, sizes: dict[str, int]):
        self.root = cache_dir() / "fetched" / identity
        self.path = self.root / name  # what the readers open (a directory, or the .gguf file)
        self.sizes = sizes
        self._record = self.root / "pieces.json"

    def missing(self, pieces: list[Piece]) -> list[Piece]:
        with self._locked():
            held = self._held()
        return [p for p in pieces if _key(p) not in held]

    def held(self) -> list[Piece]:
        return [_piece(key) for key in self._held()]  # (its record is replaced whole: no lock needed to read it)

    def read(self, piece: Piece) -> bytes:
        """One piece this copy holds (for another node that fetches it)."""
        if _key(piece) not in self._held():
            raise ShardwiseError(f"this node's copy of {self.path.name} lacks bytes {piece.offset}+{piece.size}")
        return read_piece(self.path, piece)

    def write(self, piece: Piece, data: bytes, digest: str) -> None:
        """Store one piece, if its bytes are the driver's (a ShardwiseError if not)."""
        if not matches(data, digest):
            raise ShardwiseError(f"a piece of {piece.file or self.path.name} (bytes {piece.offset}+{piece.size}) "
                                 "arrived changed: its SHA-256 differs from the driver's file. Start again; if "
                                 "it recurs, a node or link between them alters data")
        file = self.path / piece.file if piece.file else self.path
        with self._locked():  # stages on one node fill one copy
            file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if os.fstat(fd).st_size != self.sizes[piece.file]:
                    os.ftruncate(fd, self.sizes[piece.file])  # sparse: unwritten ranges take no disk
                os.pwrite(fd, data, piece.offset)
                os.fsync(fd)
            finally:
                os.close(fd)
            held = self._held() | {_key(piece)}
            partial = self._record.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(json.dumps(sorted(held)))
            partial.replace(self._record)

    def _held(self) -> set[str]:
        return set(json.loads(self._record.read_text())) if self._record.is_file() else set()

    @contextmanager
    def _locked(self):
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield


def partial_copies() -> list[tuple[str, int, int]]:
    """This node's partial copies: (the model's name, the bytes it holds, the bytes of its files)."""
    copies = []
    for record in (cache_dir() / "fetched").glob("*/pieces.json"):
        files = [p for p in record.parent.rglob("*") if p.is_file() and not p.name.startswith(("pieces", "."))]
        held = sum(int(key.rsplit("+", 1)[1]) for key in json.loads(record.read_text()))  # (see _key)
        copies.append((files[0].name if len(files) == 1 else record.parent.name, held,
                       sum(f.stat().st_size for f in files)))
    return copies


def holds_whole(path: Path, sizes: dict[str, int]) -> bool:
    """Whether this node has the model's files at `path`, each of its size (a path shared
    between the nodes, or a copy made beforehand)."""
    try:
        return all((path / name if name else path).stat().st_size == size for name, size in sizes.items())
    except OSError:
        return False


def _split(piece: Piece) -> list[Piece]:
    return [Piece(piece.file, at, min(PIECE_BYTES, piece.offset + piece.size - at))
            for at in range(piece.offset, piece.offset + piece.size, PIECE_BYTES)] or [piece]


def read_piece(path: Path, piece: Piece) -> bytes:
    with (path / piece.file if piece.file else path).open("rb") as f:
        f.seek(piece.offset)
        return f.read(piece.size)


def matches(data: bytes, digest: str) -> bool:
    return hashlib.sha256(data).hexdigest() == digest


def _key(piece: Piece) -> str:
    return f"{piece.file}@{piece.offset}+{piece.size}"


def _piece(key: str) -> Piece:
    file, at = key.rsplit("@", 1)
    offset, size = at.split("+")
    return Piece(file, int(offset), int(size))
