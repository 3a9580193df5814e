"""How much a weight format costs in quality: perplexity on a text."""

from __future__ import annotations

import math

import torch

from shardwise.engine.shard import ShardModel
from shardwise.model.product import DIRECT_ROWS
from shardwise.quant.quantized import BITS


def perplexity(shard: ShardModel, ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of ids[1:], each token given all before it. Quantised
    weights get the text a few tokens a step, so that products take the kernels decoding takes (a
    long prefill would multiply dequantised weights instead)."""
    if not shard.is_first or not shard.is_last:
        raise ValueError("perplexity needs a shard holding the whole model")
    chunk = DIRECT_ROWS if shard.weight_dtype in BITS else 64
    sequence = -1
    shard.allocate(sequence)
    total = 0.0
    try:
        for start in range(0, len(ids) - 1, chunk):
            inputs = ids[start : start + chunk]
            targets = torch.tensor(ids[start + 1 : start + 1 + len(inputs)])
            logits = shard.forward([sequence], [len(inputs)], torch.tensor(inputs), logits="all")
            log_probs = logits[: len(targets)].log_softmax(-1)
            total -= float(log_probs[torch.arange(len(targets)), targets].sum())
    finally:
        shard.free(sequence)
    return math.exp(total / (len(ids) - 1))

