"""Each weight's product is chosen once, when its shard loads: a route for every row count, each
equal to torch's product; the kernels loaded at load (or their absence said once), never inside
a step."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from shardwise import ShardModel
from shardwise.model.product import ANY_ROWS, head_product, product, quantised_tile_rows


def routes(matmul) -> list[tuple[int, str]]:
    return [(route.max_rows, route.name) for route in matmul.routes]


def test_each_weight_knows_its_route_for_every_row_count(weights):
    floats = ShardModel(weights.spec, weights=weights, dtype="float32")
    assert routes(floats.blocks[0].qkv) == [(32, "fp32 tile"), (64, "split GEMM"), (ANY_ROWS, "GEMM")]
    assert routes(floats.head) == [(64, "fp32 tile"), (ANY_ROWS, "vocabulary blocks")]
    assert floats.fused.max_rows == 32  # a decode step runs in one call while every product is a kernel's

    blocks = ShardModel(weights.spec, (0, 3), weights=weights, dtype="int4")
    assert routes(blocks.blocks[0].mlp.down) == [(8, "q4 direct"), (quantised_tile_rows(), "q4 tile"),
                                                    (ANY_ROWS, "dequantised GEMM")]
    assert blocks.fused.max_rows == quantised_tile_rows() and not blocks.is_last

    bf16 = ShardModel(weights.spec, (27, 30), weights=weights, dtype="bfloat16")
    assert routes(bf16.blocks[0].o) == [(ANY_ROWS, "GEMM")] and bf16.fused is None
    assert routes(bf16.head) == [(16, "GEMM"), (ANY_ROWS, "vocabulary blocks")]


@pytest.mark.parametrize("rows", [1, 16, 17, 32, 33, 64, 65, 300])
def test_every_route_equals_torch(rows):
    torch.manual_seed(rows)
    weight, bias, x = torch.randn(96, 320), torch.randn(96), torch.randn(rows, 320)
    expected = F.linear(x, weight, bias)
    assert torch.allclose(product(weight, bias)(x), expected, rtol=1e-5, atol=1e-4)
    vocabulary = torch.randn(5000, 320)  # more rows than a block of the head
    assert torch.allclose(head_product(vocabulary)(x), F.linear(x, vocabulary), rtol=1e-5, atol=1e-4)


WITHOUT_COMPILER = """
import logging, sys, torch
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
from shardwise import ShardModel
from shardwise.model.weights import open_weights
weights = open_weights(Path(sys.argv[1]))
prompt = torch.arange(100, 124)
for dtype in ("float32", "int4"):
    shard = ShardModel(weights.spec, weights=weights, dtype=dtype)
    logging.info("loaded; stepping")
    shard.allocate(0)
    shard.forward([0], [len(prompt)], prompt)
    torch.save(shard.forward([0], [1], torch.tensor([7])), sys.argv[2] + f"/{dtype}.pt")
"""


def test_without_a_compiler_shards_load_with_torch_products_and_say_why_once(model_path, weights, tmp_path):
    """No C++ compiler (and nothing built yet): both shards load with torch's routes, the reason
    is logged once, at the first load (before any step), and they compute what the kernels do."""
    env = {**os.environ, "CXX": "/nonexistent/g++", "SHARDWISE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(WITHOUT_COMPILER), str(model_path), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    log = done.stderr.splitlines()
    reasons = [i for i, line in enumerate(log) if "kernels unavailable (no C++ compiler found" in line]
    assert len(reasons) == 1 and reasons[0] < log.index("INFO root loaded; stepping"), done.stderr
    loads = [line for line in log if "products by rows" in line]
    assert "qkv 1-64 split GEMM, 65+ GEMM" in loads[0] and "decode steps layer by layer" in loads[0]
    assert "qkv 1+ dequantised GEMM" in loads[1]

    prompt = torch.arange(100, 124)
    for dtype in ("float32", "int4"):
        shard = ShardModel(weights.spec, weights=weights, dtype=dtype)
        shard.allocate(0)
        shard.forward([0], [len(prompt)], prompt)
        with_kernels = shard.forward([0], [1], torch.tensor([7]))
        without = torch.load(tmp_path / f"{dtype}.pt")
        # (int4: the direct kernel rounds activations to int16 per block)
        assert (without - with_kernels).abs().max() <= 1e-3 * with_kernels.abs().max()
        assert torch.equal(without.argmax(-1), with_kernels.argmax(-1))
