"""Model sources, weight formats, dtypes and the errors a user can run into."""

from __future__ import annotations

import os

import pytest
import torch

from shardwise import LLM, ModelSpec, SamplingParams, ShardModel, ShardwiseError
from shardwise.model.registry import resolve
from shardwise.model.weights import open_weights
from tests.conftest import TEXT_PROMPTS, cli
from tests.test_parity import run_prompts


def test_spec_from_gguf_metadata(weights):
    spec = weights.spec
    assert (spec.architecture, spec.num_layers, spec.hidden_size) == ("llama", 30, 576)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.vocab_size) == (9, 3, 64, 49152)
    assert spec.tie_embeddings and spec.dtype == "q4_1" and spec.rope_theta == 100000.0
    assert 134e6 < spec.parameters() < 135e6  # SmolLM2-135M
    assert ModelSpec.from_dict(spec.to_dict()) == spec


def test_registry_reuses_the_cache(model_path):
    mtime = model_path.stat().st_mtime
    assert resolve("smollm2-135m") == model_path and model_path.stat().st_mtime == mtime


def test_shard_loads_only_its_layers(weights):
    shard = ShardModel(weights.spec, (10, 12), weights=weights)
    params = sum(p.weight.numel() for b in shard.blocks for p in (b.qkv, b.o, b.mlp.gate_up, b.mlp.down))
    assert len(shard.blocks) == 2 and shard.embed is None and not shard.is_last
    assert params == 2 * (weights.spec.layer_parameters() - 2 * weights.spec.hidden_size)


def test_gguf_blocks_dequantise_to_the_gguf_librarys_floats(weights):
    """Q8_0 / Q4_0 / Q4_1 tensors are dequantised by our block code (a twentieth of the time):
    bit for bit the floats of the gguf library's own code, for every tensor of the default model."""
    import gguf
    import numpy as np

    for t in weights._tensors.values():
        data, shape, _ = weights._cut(t, None, None)
        theirs = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(t.type)).reshape(shape)
        assert np.array_equal(weights._dequantize(t), theirs.astype(np.float32))


def test_hf_directory_with_safetensors(hf_dir, llm):
    """The same model saved the HF way (config.json + safetensors + tokenizer) loads and agrees."""
    other = LLM(str(hf_dir), dtype="float32")
    prompts = [llm.tokenizer.encode(p) for p in TEXT_PROMPTS]
    diff = (run_prompts([other.executor.shard], prompts) - run_prompts([llm.executor.shard], prompts)).abs().max()
    assert diff <= 1e-5
    greedy = SamplingParams(max_tokens=16, temperature=0.0)
    assert other.generate(TEXT_PROMPTS[0], greedy)[0].text == llm.generate(TEXT_PROMPTS[0], greedy)[0].text


def test_bfloat16_within_its_tolerance(weights, llm):
    """bf16 (weights and residual stream, as HF runs bf16): its stated tolerance against fp32 is
    mean |logit diff| <= 0.3, max <= 2, and the same top token at >= 90 % of positions."""
    prompts = [llm.tokenizer.encode(p) for p in TEXT_PROMPTS]
    fp32 = run_prompts([llm.executor.shard], prompts)
    bf16 = run_prompts([ShardModel(weights.spec, weights=weights, dtype="bfloat16")], prompts)
    diff = (bf16 - fp32).abs()
    assert diff.mean().item() <= 0.3 and diff.max().item() <= 2.0
    agree = (bf16.argmax(-1) == fp32.argmax(-1)).float().mean().item()
    assert agree >= 0.9


@pytest.mark.parametrize("layers", [(0, 31), (-1, 5), (5, 5), (20, 10)])
def test_layer_range_out_of_bounds(weights, layers):
    with pytest.raises(ShardwiseError, match=r"layer range .* out of bounds"):
        ShardModel(weights.spec, layers, weights=weights)


def test_unknown_model_and_missing_file(tmp_path):
    with pytest.raises(ShardwiseError, match="unknown model 'no-such-model'.*smollm2-135m"):
        resolve("no-such-model")
    with pytest.raises(ShardwiseError, match="does not exist"):
        resolve(str(tmp_path / "missing.gguf"))


def test_corrupt_and_truncated_gguf(tmp_path, model_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(ShardwiseError, match="not a readable GGUF"):
        open_weights(resolve(str(garbage)))
    truncated = tmp_path / "truncated.gguf"
    with open(model_path, "rb") as src:
        truncated.write_bytes(src.read(20_000_000))
    with pytest.raises(ShardwiseError, match="truncated"):
        open_weights(resolve(str(truncated)))


def test_unsupported_architecture_lists_supported(weights):
    spec = ModelSpec.from_dict({**weights.spec.to_dict(), "architecture": "rwkv"})
    with pytest.raises(ShardwiseError, match="'rwkv' is not supported.*llama"):
        ShardModel(spec, weights=weights)


def test_cli_generate_streams_and_reports():
    result = cli("generate", "What is 2 plus 2?", "--max-tokens", "12", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "prompt tokens" in result.stderr and "tokens/s" in result.stderr and "TTFT" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model"], "unknown model"),
    (["--model", "/nonexistent/model.gguf"], "does not exist"),
    (["--temperature", "-2"], "temperature"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
])
def test_cli_errors_are_one_line(args, message):
    result = cli("generate", "hello", *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_cli_prompt_longer_than_context():
    result = cli("generate", "word " * 9000, "--no-chat")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "context" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_help_lists_commands():
    result = cli("--help")
    assert result.returncode == 0 and "generate" in result.stdout


@pytest.mark.parametrize("source", ["gguf", "hf"])
def test_a_stage_reads_only_its_pieces_and_a_partial_copy_opens_as_the_model(source, model_path, hf_dir, weights,
                                                                              tmp_path, monkeypatch):
    """What a node that lacks the model holds: the header, its layers' tensors (two middle layers:
    no embedding or head) and an HF directory's small files; written piece by piece into a sparse
    copy that the usual reader opens, a piece with the wrong digest refused."""
    from shardwise.model.pieces import LAYER_NAME, Layout, PartialCopy, holds_whole

    path = model_path if source == "gguf" else hf_dir
    layout = Layout(path)
    middle = layout.pieces_for(weights.spec, (14, 16))
    names = {n for n, p in layout.tensors.items() if any(q.file == p.file and p.offset <= q.offset < p.offset + p.size
                                                         for q in middle)}
    assert all(LAYER_NAME.match(n) for n in names)  # no embedding, head or final norm
    assert {int(LAYER_NAME.match(n).group(1)) for n in names} == {14, 15}
    total = sum(layout.sizes.values())
    assert 0.02 * total < sum(p.size for p in middle) < 0.1 * total
    digests = layout.digests(middle)
    monkeypatch.setenv("SHARDWISE_CACHE", str(tmp_path))  # a node cache of its own
    copy = PartialCopy(layout.identity, path.name, layout.sizes)
    with pytest.raises(ShardwiseError, match="SHA-256 differs"):
        copy.write(middle[-1], b"x" * middle[-1].size, digests[middle[-1]])
    assert copy.missing(middle) == middle
    for piece in middle:
        copy.write(piece, layout.read(piece), digests[piece])
    assert copy.missing(middle) == [] and holds_whole(copy.path, layout.sizes)
    on_disk = sum(os.stat(copy.path / f if f else copy.path).st_blocks * 512 for f in layout.sizes)
    assert on_disk < 0.2 * total  # sparse: the rest of the model takes no disk
    if source == "gguf":
        return  # (test_pipeline's stages run a GGUF copy: byte for byte the file once all is fetched)
    ours = ShardModel(weights.spec, (14, 16), weights=open_weights(copy.path), dtype="float32")
    theirs = ShardModel(weights.spec, (14, 16), weights=open_weights(path), dtype="float32")
    hidden = torch.randn(5, weights.spec.hidden_size)
    for shard in (ours, theirs):
        shard.allocate(0)
    assert torch.equal(ours.forward([0], [5], hidden), theirs.forward([0], [5], hidden))
