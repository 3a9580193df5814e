"""The hidden-state wire format of collaborative sessions: each message is one safetensors
file. Its metadata carries the step as JSON values (e.g. "seq_ids", "chunks", "sample");
the tensor "hidden" [tokens, hidden_size], float32 little-endian, carries hidden states
(absent where a segment starts at the embedding or ends with sampled token ids)."""

from __future__ import annotations

import json
import struct
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors.torch import load, save

from shardwise.errors import ShardwiseError

MEDIA_TYPE = "application/vnd.safetensors"
MAX_HIDDEN_BYTES = 64 << 20  # the largest message either side takes: a prefill of ~28k tokens 576 wide


class WireError(ShardwiseError):
    """A message that is not what the protocol says (the sender's mistake)."""


def encode(hidden: torch.Tensor | None = None, **meta: Any) -> bytes:
    tensors = {} if hidden is None else {"hidden": hidden.detach().to("cpu", torch.float32).contiguous()}
    return save(tensors, metadata={key: json.dumps(value) for key, value in meta.items()})


def metadata(body: bytes) -> dict[str, Any]:
    """A message's metadata, read from its header alone."""
    try:
        (size,) = struct.unpack("<Q", body[:8])
        header = json.loads(body[8:8 + size])
        return {key: json.loads(value) for key, value in (header.get("__metadata__") or {}).items()}
    except Exception as e:  # struct and JSON each raise their own
        raise _malformed(e) from None


def decode(body: bytes) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """The hidden states (if any) and the metadata of a message; a WireError if it is malformed."""
    meta = metadata(body)
    try:
        tensors = load(body)
    except Exception as e:  # safetensors' own errors
        raise _malformed(e) from None
    hidden = tensors.pop("hidden", None)
    if tensors:
        raise WireError(f"unexpected tensors {sorted(tensors)}: only 'hidden' is read")
    return hidden, meta


class AddedSequence(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    seq_id: int
    params: dict[str, Any] = {}  # SamplingParams' fields
    generated: list[int] = []  # tokens it already produced (coming back after a lost session)


class StepMessage(BaseModel):
    """A segment request's metadata: the step's sequences, and the session changes sent with it."""

    model_config = ConfigDict(extra="forbid", strict=True)
    segment: int | None = None  # on the stream: which server segment
    seq_ids: list[int] = Field(min_length=1)
    chunks: list[Annotated[list[int], Field(min_length=1)]]  # each sequence's new token ids
    sample: list[bool]
    add: list[AddedSequence] = []
    free: list[int] = []
    rewind: list[tuple[int, int]] = []  # (sequence, length): drop a failed step's KV past length

    @model_validator(mode="after")
    def _one_entry_each(self) -> StepMessage:
        if not len(self.seq_ids) == len(self.chunks) == len(self.sample):
            raise ValueError("'seq_ids', 'chunks' and 'sample' need one entry per sequence")
        return self

    @classmethod
    def read(cls, meta: dict[str, Any]) -> StepMessage:
        try:
            return cls.model_validate(meta)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise WireError(f"the message's metadata is malformed: {where + ': ' if where else ''}{err['msg']} "
                            "(it needs 'seq_ids' (ints), 'chunks' (a non-empty list of token ids each) and "
                            "'sample' (booleans), one entry per sequence; 'add', 'free' and 'rewind' are lists)"
                            ) from None


def _malformed(e: Exception) -> WireError:
    return WireError(f"the body is not a complete safetensors message ({type(e).__name__}: {e}); send "
                     "safetensors bytes with the step in its metadata")


def check_hidden(hidden: torch.Tensor | None, tokens: int, hidden_size: int) -> torch.Tensor:
    """Hidden states for `tokens` tokens: float32 [tokens, hidden_size], every value finite."""
    if hidden is None:
        raise WireError("this segment starts inside the model: send its input as the tensor 'hidden'")
    if hidden.dtype != torch.float32:
        raise WireError(f"'hidden' must be float32, got {str(hidden.dtype).removeprefix('torch.')}")
    if tuple(hidden.shape) != (tokens, hidden_size):
        raise WireError(f"'hidden' must have shape [{tokens}, {hidden_size}] (the step's tokens, the model's "
                        f"hidden size), got {list(hidden.shape)}")
    if not torch.isfinite(hidden).all():
        raise WireError("'hidden' holds NaN or infinite values: check the client's layers")
    return hidden
