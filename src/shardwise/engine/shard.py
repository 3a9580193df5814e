"""ShardModel: layers [a, b) of a model on one device, with their KV caches.

The first shard takes token ids and embeds them; the others take hidden states.
The last shard applies the final norm and the LM head and returns logits.
"""

from __future__ import annotations

import copy
import itertools
import logging
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from shardwise import kernels
from shardwise.engine.allocator import keep_buffers_in_heap
from shardwise.engine.collective import TensorGroup
from shardwise.engine.kv_cache import KVCache
from shardwise.errors import ShardwiseError
from shardwise.model.fused_decode import FusedDecode
from shardwise.model.layers import Block, PackedBatch, RMSNorm, RotaryTable, softcap
from shardwise.model.product import Product, head_product
from shardwise.model.spec import ModelSpec, require_supported
from shardwise.model.tensor_split import RankSlice
from shardwise.model.weights import Weights
from shardwise.quant import QuantizedWeight
from shardwise.quant.quantized import BITS

log = logging.getLogger("shardwise.engine")
keep_buffers_in_heap()  # once per process that runs a shard
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_DTYPES = (*DTYPES, *BITS)
# the projections that int8 / int4 keep quantised (norms, biases and routers stay float)
MATRICES = {"q", "k", "v", "o", "qkv", "gate", "up", "down", "gate_up", "experts_gate", "experts_up", "experts_down"}


def default_dtype(device: torch.device) -> str:
    """The weight dtype for a device. On CPUs fp32: on AVX2, bf16 matmuls are several times
    slower beyond batch 1, and a bf16 residual stream changes small models' greedy output."""
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ShardwiseError(f"unknown device '{device}': use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ShardwiseError(f"device '{device}' asked for, but no CUDA GPU is available: use --device cpu")
    return dev


class TensorPart(NamedTuple):
    """A shard's part of a tensor-parallel stage: its slice of each layer and the group it sums with."""

    slice: RankSlice
    group: TensorGroup


class ShardModel:
    """tensor: this device's part where the shard's layers are split among several devices. The
    first device of the group holds the embedding and the LM head; the others take the first's
    embeddings and return their hidden states (which equal the first's)."""

    def __init__(self, spec: ModelSpec, layers: tuple[int, int] | None = None, *, weights: Weights,
                 device: str | torch.device = "cpu", dtype: str | None = None, tensor: TensorPart | None = None):
        require_supported(spec)
        start, end = layers if layers is not None else (0, spec.num_layers)
        if not (0 <= start < end <= spec.num_layers):
            raise ShardwiseError(
                f"layer range [{start}, {end}) is out of bounds: the model has layers 0..{spec.num_layers - 1}, "
                f"so use 0 <= start < end <= {spec.num_layers}"
            )
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            kernels.library()  # loaded (built the first time) now, with a log line, not inside the first step
        dtype = dtype or default_dtype(self.device)
        if dtype not in WEIGHT_DTYPES or (dtype == "float16" and self.device.type == "cpu"):
            raise ShardwiseError(f"dtype '{dtype}' is not supported here: use float32, bfloat16, int8 or int4 "
                                 "(float16 on GPUs)")
        # int8 / int4 name the weights' format; activations and the KV cache stay at the device's float dtype
        self.weight_dtype, bits = dtype, BITS.get(dtype)
        self.dtype = DTYPES[default_dtype(self.device) if bits else dtype]
        self.spec, self.start, self.end, self.tensor = spec, start, end, tensor
        leads = tensor is None or tensor.slice.rank == 0
        self.is_first, self.is_last = start == 0 and leads, end == spec.num_layers and leads
        part = tensor.slice if tensor else None

        def load(name: str) -> torch.Tensor | QuantizedWeight:
            layer_part = name.split(".")[2] if name.startswith("layers.") else ""
            rows = part.rows(spec, layer_part) if part else None
            cols = part.columns_of(spec, layer_part) if part and name.endswith(".weight") else None
            ends = name in ("embed.weight", "head.weight")
            if bits and (ends or name.endswith(".weight") and layer_part in MATRICES):
                # the embedding / LM head (which makes every logit) never below 8 bits, as in llama.cpp
                q = weights.get_quantized(name, 8 if ends else bits, rows, cols)
                return q.to(self.device) if isinstance(q, QuantizedWeight) else q.to(self.device, self.dtype)
            return weights.require(name, rows, cols).to(self.device, self.dtype)

        self.embed = load("embed.weight") if self.is_first else None
        # Gemma scales embeddings by sqrt(hidden), in the residual dtype
        self.embed_scale = torch.tensor(spec.hidden_size**0.5, dtype=self.dtype) if spec.scale_embeddings else None
        local = part.local_spec(spec) if part else spec  # the heads and columns this device holds
        reduce = tensor.group.all_reduce if tensor else None
        self.blocks = [Block(local, i, self._layer_tensors(weights, i, load, part), reduce) for i in range(start, end)]
        self.fused = FusedDecode.for_blocks(self.blocks)  # decode steps in one kernel call, where it applies
        if self.is_last:
            self.norm = RMSNorm(load("norm.weight"), spec.norm_eps)
            tied = spec.tie_embeddings or not weights.has("head.weight")
            self.head = head_product(self.embed if tied and self.embed is not None
                                     else load("embed.weight" if tied else "head.weight"))
        self.rotary = {kind: RotaryTable.for_spec(spec, kind, self.device)
                       for kind in sorted({block.rope_kind for block in self.blocks})}
        self.kv = KVCache(end - start, local.num_kv_heads, spec.head_dim, self.dtype, self.device)
        log.info("layers [%d, %d) on %s, %s weights; products by rows: qkv %s%s; decode steps %s", start, end,
                 self.device, dtype, self.blocks[0].qkv, f"; head {self.head}" if self.is_last else "",
                 "in one kernel call" if self.fused else "layer by layer")

    def view(self, start: int, end: int) -> ShardModel:
        """Layers [start, end) of this shard as a shard of their own: the same weight tensors,
        a KV cache of its own (the embedding and head only where the view reaches the ends)."""
        if not (self.start <= start < end <= self.end):
            raise ShardwiseError(f"layers [{start}, {end}) are not all in this shard's [{self.start}, {self.end})")
        view = copy.copy(self)
        view.start, view.end = start, end
        view.is_first, view.is_last = start == 0, end == self.spec.num_layers
        view.blocks = self.blocks[start - self.start:end - self.start]
        view.fused = FusedDecode.for_blocks(view.blocks)
        view.kv = KVCache(end - start, self.kv.data.shape[2], self.spec.head_dim, self.dtype, self.device)
        return view

    def weight_bytes(self) -> int:
        """Bytes of the weights this shard holds (a tied head counted once)."""
        held = {}

        def hold(value) -> None:
            if isinstance(value, QuantizedWeight):
                held[id(value)] = value.nbytes
            elif isinstance(value, torch.Tensor) and value.dim() > 0:  # (not the embedding's scalar scale)
                held[id(value)] = value.numel() * value.element_size()
            elif isinstance(value, Product | RMSNorm):
                hold(value.weight)
                hold(getattr(value, "bias", None))
            elif isinstance(value, list | tuple):  # experts
                for item in value:
                    hold(item)

        for owner in (self, *self.blocks, *(block.mlp for block in self.blocks)):
            for value in vars(owner).values():
                hold(value)
        return sum(held.values())

    @staticmethod
    def _layer_tensors(weights: Weights, i: int, load, tensor_slice: RankSlice | None) -> dict[str, torch.Tensor]:
        tensors = {}
        for part in weights.layer_parts:
            for kind in ("weight", "bias"):
                name = f"layers.{i}.{part}.{kind}"
                if kind == "weight" or weights.has(name) and (tensor_slice is None or tensor_slice.keeps_bias(part)):
                    tensors[f"{part}.{kind}"] = load(name)
        return tensors

    # --- KV lifecycle -------------------------------------------------------------------------
    def allocate(self, seq_id: int, prefix: list[bytes] = ()) -> None:
        self.kv.allocate(seq_id, prefix)

    def free(self, seq_id: int) -> None:
        self.kv.free(seq_id)

    def cached_tokens(self, seq_id: int) -> int:
        return self.kv.length(seq_id)

    # --- compute ------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, seq_ids: list[int], lengths: list[int], inputs: torch.Tensor,
                logits: Literal["last", "all"] = "last", verify: list[bool] | None = None) -> torch.Tensor:
        """Run the shard on a packed batch.

        seq_ids/lengths: the sequences in the batch and how many new tokens each brings.
        inputs: token ids [tokens] at the first shard, hidden states [tokens, hidden] elsewhere.
        verify: the sequences whose tokens are a decode and its drafts (speculative decoding):
        each of their tokens runs as a decode row (so the fused decode path takes them) and
        gets logits.
        Returns hidden states [tokens, hidden], or at the last shard float32 logits for each
        sequence's last token [sequences, vocab] (every token's with logits="all"), and for
        each of a verified sequence's tokens, in order.
        """
        receives = self.tensor is not None and self.start == 0 and not self.is_first  # the first device's embeddings
        if len(seq_ids) != len(lengths) or not receives and sum(lengths) != inputs.shape[0]:
            raise ShardwiseError(f"batch mismatch: {len(seq_ids)} sequences, lengths {lengths}, "
                                 f"{inputs.shape[0]} input tokens")
        verify = verify or [False] * len(seq_ids)
        batch = self._pack(seq_ids, lengths, verify)
        if receives:
            x = torch.empty(sum(lengths), self.spec.hidden_size, dtype=self.dtype, device=self.device)
        elif self.is_first:
            x = inputs.to(self.device)
            x = self.embed.dequantize(self.dtype, x) if isinstance(self.embed, QuantizedWeight) else F.embedding(
                x, self.embed)
            if self.embed_scale is not None:
                x = x * self.embed_scale
        else:
            x = inputs.to(self.device, self.dtype)
        if self.tensor is not None and self.start == 0:
            x = self.tensor.group.broadcast(x.contiguous())
        if self.fused is not None and self.fused.applies(batch, x.shape[0]):
            x = self.fused(x, batch, self.kv.data)
        else:
            for layer, block in enumerate(self.blocks):
                x = block(x, batch, self.kv.data[layer])
        for seq_id, length in zip(seq_ids, lengths, strict=True):
            self.kv.advance(seq_id, length)
        if not self.is_last:
            return x
        if logits == "last":
            ends = itertools.accumulate(lengths)
            x = x[torch.tensor([i for end, n, all_of in zip(ends, lengths, verify, strict=True)
                                for i in range(end - (n if all_of else 1), end)], device=self.device)]
        return softcap(self.head(self.norm(x)).float(), self.spec.final_softcap)

    def _pack(self, seq_ids: list[int], lengths: list[int], verify: list[bool]) -> PackedBatch:
        kv, device = self.kv, self.device
        starts = [kv.length(seq_id) for seq_id in seq_ids]
        for seq_id, start, length in zip(seq_ids, starts, lengths, strict=True):
            if start + length > self.spec.context_length:
                raise ShardwiseError(
                    f"sequence {seq_id} would hold {start + length} tokens, more than the model's "
                    f"context of {self.spec.context_length}: shorten the prompt or max_tokens"
                )
            kv.reserve(seq_id, length)
        offsets = [0, *itertools.accumulate(lengths)]
        # Each sequence's slots for all of its positions; the new tokens' slots are their tail.
        write_slots = torch.empty(offsets[-1], dtype=torch.long)
        chunks = []
        for j, (seq_id, start, length) in enumerate(zip(seq_ids, starts, lengths, strict=True)):
            if length > 1 and not verify[j]:
                slots = kv.slots(seq_id, 0, start + length)
                write_slots[offsets[j] : offsets[j + 1]] = slots[start:]
                chunks.append((offsets[j], length, slots.to(device)))
        # decode rows: one per one-token sequence, and one per token of a verified sequence (each
        # attends up to its own position; the kernels write every row's K/V before any attends)
        decoding = [(j, i) for j, n in enumerate(lengths) if n == 1 or verify[j] for i in range(n)]
        rows = torch.tensor([offsets[j] + i for j, i in decoding], dtype=torch.long)
        grid = torch.empty(0, 0, dtype=torch.long)
        totals = torch.tensor([starts[j] + i + 1 for j, i in decoding], dtype=torch.long)
        if decoding:
            grid = kv.slot_grid([seq_ids[j] for j, _ in decoding], torch.arange(int(totals.max())))
            write_slots[rows] = grid[torch.arange(len(decoding)), totals - 1]
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)]).to(device)
        upto = max(s + n for s, n in zip(starts, lengths, strict=True))
        rope = {}
        for kind, table in self.rotary.items():
            cos, sin = table.lookup(positions, upto)
            rope[kind] = cos[:, None].to(self.dtype), sin[:, None].to(self.dtype)
        return PackedBatch(rope=rope, write_slots=write_slots.to(device), chunks=chunks, decode_rows=rows.to(device),
                           decode_slots=grid.to(device), decode_totals=totals)
