"""Quantised weights kept quantised: exact GGUF blocks, the CPU kernels against plain torch, and
what each weight format costs in quality (perplexity on a fixed text, greedy agreement)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shardwise import LLM, SamplingParams, ShardModel, ShardwiseError, kernels
from shardwise.engine.quality import perplexity
from shardwise.model.layers import apply_rope
from shardwise.model.product import DIRECT_ROWS, KERNEL_ROWS, PANEL_ROWS, product, quantised_tile_rows
from shardwise.model.weights import open_weights
from shardwise.perf.estimate import Stage, stage_memory
from shardwise.perf.hardware import load_device
from shardwise.perf.operators import Precision, Work
from shardwise.quant import quantize
from shardwise.quant.gguf import from_gguf
from tests.conftest import TEXT_PROMPTS

TEXT = Path(__file__).with_name("data") / "perplexity.txt"
# perplexity may rise at most this much over fp32 (the guard: 8 bits 2 %, 4 bits 5 %)
TOLERANCE = {"bfloat16": 0.02, "int8": 0.02, "int4": 0.05}


def test_the_kernels_are_built_here():
    """This machine (x86-64, AVX2, g++) must get the compiled kernels, not the slow fallback."""
    assert kernels.library() is not None


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 3, DIRECT_ROWS, DIRECT_ROWS + 1, 40, KERNEL_ROWS + 1, PANEL_ROWS + 1])
def test_products_match_the_dequantised_weight(bits, rows):
    """Direct (few rows, int16-rounded activations), tile-dequantising (more rows) and dequantised
    (many rows) products all equal x . W^T of the weight they hold, bias included, within
    activation rounding."""
    torch.manual_seed(rows)
    weight = quantize(torch.randn(100, 320), bits)  # (a ragged last panel, a short last block of columns)
    x, bias = torch.randn(rows, 320) * 3, torch.randn(100)
    reference = x @ weight.dequantize().t() + bias
    matmul = product(weight, bias)
    out = matmul(x)
    assert matmul.route_for(rows).compiled == (rows <= quantised_tile_rows())
    assert (out - reference).abs().max() <= 1e-4 * reference.abs().max()


@pytest.mark.parametrize("bits", [8, 4])
def test_a_rows_batched_product_does_not_depend_on_the_rows_beside_it(bits):
    """The tile-dequantising product sums each output over the columns in one order whatever the
    batch: a row's output is the same bits among 9, 16, 33, 100 or 128 rows (rows taken in runs
    when the columns are many)."""
    torch.manual_seed(bits)
    weight = quantize(torch.randn(100, 8256), bits)
    x = torch.randn(KERNEL_ROWS, 8256)
    matmul = product(weight)
    whole = matmul(x)
    for rows in (DIRECT_ROWS + 1, 16, 33, 100):
        assert matmul.route_for(rows) == matmul.route_for(KERNEL_ROWS)
        assert torch.equal(matmul(x[:rows]), whole[:rows])
        assert torch.equal(matmul(x[-rows:]), whole[-rows:])


GPU = "cuda" if torch.cuda.is_available() else "cpu"  # on a CPU, Triton's interpreter (see conftest)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, *([torch.bfloat16] if GPU == "cuda" else [])])
@pytest.mark.parametrize("fill", [1, 100])
def test_gpu_kernel_matches_the_dequantised_weight(bits, rows, dtype, fill, monkeypatch):
    """The Triton product reads the same blocks to the same product, in the activations' dtype,
    whether each tile sums all of k or k is split in ranges (fill: grid programs wanted per
    multiprocessor). (The interpreter's bf16 matmul is wrong, so bf16 is checked on GPUs only.)"""
    pytest.importorskip("triton")
    from shardwise.kernels import gpu

    monkeypatch.setattr(gpu, "FILL", fill)
    torch.manual_seed(rows)
    weight = quantize(torch.randn(80, 320), bits)  # 80 rows: a partial tile of 64
    x, bias = torch.randn(rows, 320), torch.randn(80)
    reference = x @ weight.dequantize().t() + bias
    out = gpu.quant_linear(x.to(GPU, dtype), weight.to(GPU), bias.to(GPU, dtype))
    assert out.dtype == dtype and out.shape == (rows, 80)
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert (out.float().cpu() - reference).abs().max() <= tolerance * reference.abs().max()


@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_and_torch_dequantise_alike(bits):
    weight = quantize(torch.randn(70, 64) * torch.logspace(-3, 1, 64), bits)
    everything = torch.arange(70)
    assert torch.equal(weight.dequantize(), weight.dequantize(rows=everything))  # kernel vs torch ops
    rounded = quantize(weight.dequantize(), bits).dequantize()  # re-rounding a rounded weight is stable
    assert (rounded - weight.dequantize()).abs().max() <= 1e-3 * weight.dequantize().abs().max()


def _random_blocks(qtype: gguf.GGMLQuantizationType, rows: int, cols: int) -> np.ndarray:
    """Random bytes of a GGUF tensor, its fp16 scale fields set to sane values."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    fp16 = {gguf.GGMLQuantizationType.Q8_0: [0], gguf.GGMLQuantizationType.Q4_0: [0],
            gguf.GGMLQuantizationType.Q4_1: [0, 2], gguf.GGMLQuantizationType.Q4_K: [0, 2]}[qtype]
    for at in fp16:
        data[..., at : at + 2] = rng.uniform(-0.05, 0.05, data.shape[:2]).astype(np.float16)[..., None].view(np.uint8)
    return data.reshape(rows, -1)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q4_K"])
def test_gguf_blocks_are_kept_exactly(qtype):
    """Each GGUF block type read into our blocks dequantises to what the gguf library makes of it."""
    kind = gguf.GGMLQuantizationType[qtype]
    data = _random_blocks(kind, 16, 512)
    ours = from_gguf(int(kind), data, (16, 512))
    theirs = torch.from_numpy(gguf.quants.dequantize(data, kind).astype(np.float32))
    assert ours.bits == (8 if qtype == "Q8_0" else 4)
    tolerance = 1e-3 * theirs.abs().max() if qtype == "Q4_K" else 0  # Q4_K: d * sub-scale is rounded to fp16
    assert (ours.dequantize() - theirs).abs().max() <= tolerance


def test_the_model_file_keeps_its_own_blocks(weights):
    """The default model's Q4_1 layers and Q8_0 embedding load as they are, rows un-permuted."""
    q = weights.get_quantized("layers.3.q.weight", 4)
    embed = weights.get_quantized("embed.weight", 8)
    assert (q.bits, embed.bits) == (4, 8)
    assert torch.equal(q.dequantize(), weights.get("layers.3.q.weight"))
    assert torch.equal(embed.dequantize(rows=torch.tensor([5, 7])), weights.get("embed.weight")[[5, 7]])
    assert weights.get_quantized("layers.3.q.weight", 8).bits == 4  # widening adds bytes, not precision


def _reference_decode_attention(q, keys, values, slots, totals, window, scale, softcap):
    outs = []
    for s in range(q.shape[0]):
        end = int(totals[s])
        start = max(0, end - window) if window else 0
        k, v = keys[:, slots[s, start:end]], values[:, slots[s, start:end]]
        group = q.shape[1] // keys.shape[0]
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        scores = torch.einsum("hd,hpd->hp", q[s], k) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        outs.append(torch.einsum("hp,hpd->hd", scores.softmax(-1), v))
    return torch.stack(outs)


@pytest.mark.parametrize("dim,rotary", [(64, 64), (80, 40), (128, 128)])
@pytest.mark.parametrize("window,softcap", [(None, None), (7, None), (None, 30.0)])
def test_decode_attention_kernel_matches_torch(dim, rotary, window, softcap):
    """From the fused projection: RoPE (full and partial), the new k / v written into the pool, and
    attention over sequences of different lengths (padded slot rows), GQA, windows, soft-capping."""
    torch.manual_seed(dim)
    heads, kv_heads, scale = 6, 2, dim**-0.5
    pool = torch.randn(2, kv_heads, 700, dim)
    totals = torch.tensor([1, 9, 40, 150])
    slots = torch.randperm(700)[: 4 * 150].view(4, 150)
    write = slots[torch.arange(4), totals - 1]
    qkv = torch.randn(4, (heads + 2 * kv_heads) * dim)
    angles = torch.rand(4, rotary // 2) * 6
    cos, sin = torch.cat((angles.cos(), angles.cos()), -1), torch.cat((angles.sin(), angles.sin()), -1)

    expected_pool = pool.clone()
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    q = apply_rope(q.view(4, heads, dim), cos[:, None], sin[:, None])
    expected_pool[0][:, write] = apply_rope(k.view(4, kv_heads, dim), cos[:, None], sin[:, None]).transpose(0, 1)
    expected_pool[1][:, write] = v.view(4, kv_heads, dim).transpose(0, 1)
    expected = _reference_decode_attention(q, *expected_pool, slots, totals, window, scale, softcap).flatten(1)

    out = kernels.decode_attention(qkv, cos, sin, pool[0], pool[1], write, slots, totals, heads, window, scale,
                                   softcap)
    assert torch.allclose(pool, expected_pool, atol=1e-6)
    assert (out - expected).abs().max() <= 1e-5


def test_rms_norm_kernel_matches_torch():
    x, weight = torch.randn(5, 3, 200), torch.randn(200)
    assert torch.allclose(kernels.rms_norm(x, weight, 1e-5), F.rms_norm(x, (200,), weight, 1e-5), atol=1e-6)


@pytest.mark.parametrize("gelu", [False, True])
def test_gated_kernels_match_torch(gelu):
    """SwiGLU's silu(gate) * up and GeGLU's gelu(gate, tanh) * up in one pass: over a wide range
    of gates (both signs, saturated tails, zero) and a width that is not a multiple of the vector
    size. Against float64 (torch's fp32 gelu loses its small negative values to 1 + tanh's
    cancellation, which the kernel's sigmoid form keeps)."""
    gate_up = torch.randn(5, 2 * 1539) * 8
    gate_up[0, :12] = torch.tensor([0.0, -0.0, 1e-8, -1e-8, 30.0, -30.0, 90.0, -90.0, 200.0, -200.0, 0.5, -0.5])
    gate, up = gate_up.double().chunk(2, dim=-1)
    expected = ((F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)) * up).float()
    assert torch.allclose(kernels.gated(gate_up, gelu), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_each_format_keeps_quality(weights, hf_dir, llm):
    """Perplexity on a fixed text within the stated tolerance of fp32, for the model file's own
    blocks and for blocks rounded from fp32 safetensors (greedy agreement with fp32: bf16's is
    test_loading's, int4's test_speculative's, whose int4 drafts the fp32 model accepts)."""
    ids = llm.tokenizer.encode(TEXT.read_text())
    reference = perplexity(llm.executor.shard, ids)
    rows = [f"fp32 perplexity {reference:.3f}"]
    # (the file's 4-bit layers stay 4-bit under int8: only its fp32 copy shows 8-bit rounding; 4-bit
    # rounding from floats is test_kernel_and_torch_dequantise_alike's)
    for source, dtype in [("gguf", "bfloat16"), ("gguf", "int4"), ("safetensors", "int8")]:
        source_weights = open_weights(hf_dir) if source == "safetensors" else weights
        ppl = perplexity(ShardModel(source_weights.spec, weights=source_weights, dtype=dtype), ids)
        rows.append(f"{source:12} {dtype:9} perplexity {ppl:7.3f} ({ppl / reference - 1:+.2%})")
        assert ppl <= reference * (1 + TOLERANCE[dtype]), rows[-1]
    print("\n" + "\n".join(rows))


def test_int4_memory_is_what_the_estimator_says(weights):
    """The bytes an int4 shard holds match the estimator's model of the format (layers 4-bit,
    embedding / head 8-bit, fp16 block scales)."""
    shard = ShardModel(weights.spec, weights=weights, dtype="int4")
    stage = Stage(load_device("x86-cpu"), 0, weights.spec.num_layers)
    predicted = stage_memory(weights.spec, stage, Precision("int4", "fp32", "fp32"), 1, 1, Work(((1, 0),)))
    assert shard.weight_bytes() == pytest.approx(predicted["weights"], rel=0.03)


def test_int4_through_pipeline_stages(ray_session):
    """Stages in Ray give the tokens the local engine gives (the CLI's --dtype int4 runs in
    test_pipeline's CLI test). Two local stages share one node's cores, so they take turns
    (one step in flight)."""
    local = LLM("smollm2-135m", dtype="int4")
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    expected = [o.token_ids for o in local.generate(TEXT_PROMPTS, greedy)]
    local.close()
    pipeline = LLM("smollm2-135m", dtype="int4", stages=2)
    try:
        assert pipeline.executor.parallelism == 1
        assert [o.token_ids for o in pipeline.generate(TEXT_PROMPTS, greedy)] == expected
    finally:
        pipeline.close()


def test_unknown_weight_format_is_a_clear_error(weights):
    with pytest.raises(ShardwiseError, match="int8 or int4"):
        ShardModel(weights.spec, weights=weights, dtype="int3")
