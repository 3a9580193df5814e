"""What one server promises its operator: the bounds on a request's work, on the queue, and on
shutdown. One place holds them, with their defaults; `shardwise serve` exposes each as a flag."""

from __future__ import annotations

from dataclasses import dataclass

from shardwise.errors import ShardwiseError


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 4 << 20  # a request body larger than this is refused (413)
    default_max_tokens: int = 1024  # chat requests without max_tokens: up to this, or the end of the context
    max_request_sequences: int = 64  # prompts x n in one request
    max_request_tokens: int = 1 << 17  # prompt + max_tokens summed over a request's sequences
    max_messages: int = 2048  # messages in one chat (each runs through the chat template)
    max_waiting: int = 256  # sequences queued for a slot; more are refused with 503 and Retry-After
    max_queue_time_s: float = 120.0  # a sequence not started by then is refused with 503 and Retry-After
    drain_timeout_s: float = 30.0  # on SIGTERM: how long running requests may take to finish

    def __post_init__(self) -> None:
        counts = (self.max_body_bytes, self.default_max_tokens, self.max_request_sequences, self.max_request_tokens,
                  self.max_messages, self.max_waiting)
        if min(counts) < 1:
            raise ShardwiseError("request and queue limits must each be at least 1")
        if self.max_queue_time_s <= 0 or self.drain_timeout_s < 0:
            raise ShardwiseError("the queue time must be positive and the drain timeout not negative")
