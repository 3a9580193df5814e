"""The performance model: closed forms, pipelines, the peer (GenZ), and the CLI."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from shardwise import ShardwiseError
from shardwise.model.catalog import catalog, load_spec
from shardwise.perf.estimate import Deployment, Draft, estimate, step_time
from shardwise.perf.hardware import SAME_DEVICE, DeviceSpec, LinkSpec, catalog_devices, load_device, load_link
from shardwise.perf.operators import Precision, Work, layer_operators
from tests.conftest import cli

BF16 = Precision("bf16", "bf16", "bf16")
INF = 1e30


def device(flops: float = INF, bandwidth: float = INF, memory: float = 1e12, name: str = "test") -> DeviceSpec:
    return DeviceSpec(name, memory, bandwidth, {"bf16": flops, "fp32": flops})


def test_catalog_devices_and_models_load_with_sources():
    devices = catalog_devices()
    for name in ("a100-40gb", "a100-80gb", "h100", "h200", "l4", "rtx-3090", "rtx-4090", "m2-max", "m3-ultra",
                 "jetson-agx-orin", "raspberry-pi-5", "x86-cpu"):
        d = devices[name]
        assert d.source and d.bandwidth > 0 and d.memory_bytes > 0 and d.peak_flops("bf16") > 0
    assert load_device("H100").bandwidth == 3.35e12
    for name in ("llama-2-7b", "llama-2-70b", "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "mistral-7b",
                 "mixtral-8x7b", "qwen2.5-7b", "qwen2.5-72b", "smollm2-135m"):
        assert name in catalog()
    # published parameter counts
    assert load_spec("meta-llama/Llama-2-7b-hf").parameters() == pytest.approx(6.74e9, rel=0.01)
    assert load_spec("llama-3.1-8b").parameters() == pytest.approx(8.03e9, rel=0.01)
    mixtral = load_spec("mixtral-8x7b")
    assert mixtral.parameters() == pytest.approx(46.7e9, rel=0.01)
    assert mixtral.parameters(active=True) == pytest.approx(12.9e9, rel=0.01)


def test_spec_from_gguf_and_hf_config(model_path, tmp_path):
    from_file, listed = load_spec(str(model_path)).to_dict(), catalog()["smollm2-135m"].to_dict()
    for key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size",
                "head_dim", "rope_theta", "tie_embeddings", "context_length"):
        assert from_file[key] == listed[key], key
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
        "intermediate_size": 128, "vocab_size": 100}))
    assert load_spec(str(tmp_path)).num_layers == 2


def test_dense_layer_prefill_flops_closed_form():
    spec = load_spec("llama-2-7b")
    s = 1000
    ops = layer_operators(spec, Work.prefill(1, s), BF16)
    matmul_params = spec.hidden_size * (spec.q_size + 2 * spec.kv_size) + spec.q_size * spec.hidden_size \
        + 3 * spec.hidden_size * spec.intermediate_size
    attention = 4 * spec.num_heads * spec.head_dim * s * (s + 1) / 2  # QK^T and PV under the causal mask
    assert sum(op.flops for op in ops if op.kind in ("matmul", "attention")) == 2 * matmul_params * s + attention


def test_batch1_decode_on_a_bandwidth_bound_device_is_bytes_over_bandwidth():
    spec = load_spec("llama-2-7b")
    bw, context = 2e12, 4000
    est = estimate(spec, Deployment.single(spec, device(bandwidth=bw)), batch=1, input_tokens=context,
                   output_tokens=1, precision=BF16)
    weights = (spec.num_layers * spec.layer_parameters() + spec.vocab_size * spec.hidden_size) * 2  # layers + head
    kv = spec.kv_bytes_per_token(2) * (context + 1)
    assert est.tpot_s == pytest.approx((weights + kv) / bw, rel=0.005)


def test_prefill_on_a_compute_bound_device_is_flops_over_peak():
    spec = load_spec("llama-3.1-8b")
    peak, s = 1e15, 2048
    est = estimate(spec, Deployment.single(spec, device(flops=peak)), input_tokens=s, output_tokens=1,
                   precision=BF16)
    flops = 2 * spec.num_layers * spec.layer_parameters() * s + 2 * spec.vocab_size * spec.hidden_size
    assert est.ttft_s > flops / peak
    assert est.ttft_s == pytest.approx(flops / peak, rel=0.15)  # + attention, norms, softmax


def test_sliding_window_caps_attention():
    work = Work(((10, 0),))
    assert work.attention_pairs() == 55
    assert work.attention_pairs(window=4) == 1 + 2 + 3 + 4 * 7
    assert Work.decode(2, 100).keys_read(window=64) == 128


def test_pipeline_latency_is_the_sum_and_throughput_the_bottleneck():
    spec = load_spec("llama-2-7b")
    fast, slow = device(bandwidth=2e12, name="fast"), device(bandwidth=1e12, name="slow")
    link = LinkSpec("net", 10e9, 1e-4)
    pipe = Deployment.pipeline(spec, [fast, slow], link)
    work = Work.decode(4, 1000)
    step = step_time(spec, pipe, work, BF16)
    hidden = 4 * spec.hidden_size * 2
    assert step.links == [pytest.approx(1e-4 + hidden / 10e9), pytest.approx(1e-4 + 16 / 10e9)]
    assert step.latency == pytest.approx(sum(step.stages) + sum(step.links))
    assert step.stages[1] > step.stages[0]  # same layers, half the bandwidth
    # one micro-batch: the latency; many: the slowest stage sets the pace
    assert step.cycle(1) == step.latency
    assert step.cycle(8) == pytest.approx(8 * step.stages[1])
    # a sequence's next token waits for its whole round trip, so micro-batches pay off by keeping
    # more sequences in flight: 2 x 4 sequences in the time of 1 x 4, on a slow network
    wan = Deployment.pipeline(spec, [fast, slow], LinkSpec("wan", 1e9, 0.02))
    one = estimate(spec, wan, batch=4, input_tokens=1000, output_tokens=1, precision=BF16, micro_batches=1)
    two = estimate(spec, wan, batch=8, input_tokens=1000, output_tokens=1, precision=BF16, micro_batches=2)
    assert two.tpot_s == pytest.approx(one.tpot_s) and two.decode_tok_s == pytest.approx(2 * one.decode_tok_s)
    # a faster device takes more layers: give it 2/3 and the bottleneck drops
    skewed = Deployment.pipeline(spec, [fast, slow], link, layers=[(0, 21), (21, 32)])
    assert max(step_time(spec, skewed, work, BF16).stages) < max(step.stages)


def test_a_profiled_link_passes_a_decode_step_and_a_prefill_chunk_at_their_own_rates(tmp_path):
    from shardwise.perf.profile import link_from_hand_overs
    from shardwise.planner.topology import Cluster, cluster_file

    # hand-overs of 1, 16 and 512 tokens of 576 floats on a shaped link: the short ones near its
    # rate, the long one at under half of it
    sizes = [(2304, 0.040), (36864, 0.60), (1179648, 22.0)]
    link = link_from_hand_overs(sizes, "a->b")
    assert link.time(2304) == pytest.approx(0.020)  # half a hand-over: the step's one link
    # each hand-over's extra bytes cost what they measured, at either size
    assert link.time(36864) - link.time(2304) == pytest.approx(0.56)
    assert link.time(1179648) - link.time(36864) == pytest.approx(21.4)
    assert link.time(18432) == pytest.approx(0.020 + 0.56 * (18432 - 2304) / (36864 - 2304))
    assert link.time(0) == 0.0
    # a cluster file carries both rates to the planner
    profile = {"devices": [{"name": n, "memory_bytes": 1e9} for n in "ab"], "nodes": [{"node": "x"}, {"node": "y"}],
               "links": [{"from": "a", "to": "b", **link.to_dict()}]}
    (tmp_path / "p.json").write_text(json.dumps({"devices": [load_device("x86-cpu").to_dict() | {"name": n}
                                                            for n in "ab"]}))
    (tmp_path / "c.yaml").write_text(json.dumps(cluster_file(profile, str(tmp_path / "p.json"))))
    read = Cluster.load(tmp_path / "c.yaml").link("a", "b")
    assert read.time(18432) == pytest.approx(link.time(18432)) and read.time(1e6) == pytest.approx(link.time(1e6))


def test_a_node_under_a_quota_runs_a_stage_in_bursts_and_paces_a_stream_only_when_busy():
    """A device keeping up a quarter of its speed when busy (a CPU quota) runs a stage that idles
    between its turns at full speed: one stream's token takes the stages' burst times and the
    links, or the quota node's sustained time, whichever is longer; a step longer than a burst
    runs at the share after it."""
    spec, link = load_spec("llama-2-7b"), LinkSpec("net", 10e9, 1e-4)
    free = device(bandwidth=1e12, name="free")
    quota = replace(free, name="quota", sustained_share=0.25)
    work = Work.decode(1, 512)
    alone = step_time(spec, Deployment.pipeline(spec, [free], link), work, BF16)
    shared = step_time(spec, Deployment.pipeline(spec, [quota], link), work, BF16)
    assert shared.latency == pytest.approx(alone.latency)  # one step from idle: a burst
    assert shared.cycle(1) == pytest.approx(4 * alone.stages[0])  # back to back: a quarter of the speed
    few = step_time(spec, Deployment.pipeline(spec, [free, quota], link, layers=[(0, 28), (28, 32)]), work, BF16)
    assert few.sustained[1] < few.latency and few.cycle(1) == pytest.approx(few.latency)  # it rests meanwhile
    many = step_time(spec, Deployment.pipeline(spec, [free, quota], link, layers=[(0, 8), (8, 32)]), work, BF16)
    assert many.cycle(1) == pytest.approx(many.sustained[1]) and many.sustained[1] > many.latency
    limited = replace(quota, burst_s=alone.stages[0] / 2)  # the burst runs out half-way through the step
    assert limited.step_seconds(alone.stages[0]) == pytest.approx(alone.stages[0] * (0.5 + 0.5 * 4))
    assert limited.sustaining(2.0).sustained_share == 0.125  # another tenant halves what it keeps up
    assert limited.sustaining(0.125).sustained_share == 1.0 and limited.sustaining(0.125).bandwidth == 2e12


def test_tensor_parallel_all_reduce_is_a_ring():
    spec = load_spec("llama-2-7b")
    link = LinkSpec("nv", 100e9, 2e-6)
    single = estimate(spec, Deployment.single(spec, device(bandwidth=2e12)), batch=8, input_tokens=1000,
                      output_tokens=1, precision=BF16)
    tp4 = estimate(spec, Deployment.single(spec, device(bandwidth=2e12), tp=4, link=link), batch=8,
                   input_tokens=1000, output_tokens=1, precision=BF16)
    message = 8 * spec.hidden_size * 2
    ring = device().collective_s + 6 * 2e-6 + 6 / 4 * message / 100e9
    assert tp4.breakdown["decode"]["attn_all_reduce"] == pytest.approx(spec.num_layers * ring)
    assert single.tpot_s / 4 < tp4.tpot_s < single.tpot_s / 2  # a quarter of the bytes each, plus the rings
    assert tp4.stages[0]["memory"]["weights"] == pytest.approx(single.stages[0]["memory"]["weights"] / 4, rel=0.01)


def test_moe_reads_only_the_experts_it_routes_to():
    spec = load_spec("mixtral-8x7b")
    dev = device(bandwidth=1e12, memory=200e9)
    b1 = estimate(spec, Deployment.single(spec, dev), input_tokens=100, output_tokens=1, precision=BF16)
    active = spec.parameters(active=True) * 2 / 1e12
    assert b1.tpot_s == pytest.approx(active, rel=0.02)
    b64 = estimate(spec, Deployment.single(spec, dev), batch=64, input_tokens=100, output_tokens=1, precision=BF16)
    assert b64.tpot_s == pytest.approx(spec.parameters() * 2 / 1e12, rel=0.05)  # every expert is hit
    ep = estimate(spec, Deployment.single(spec, dev, ep=8, link=load_link("nvlink4")), batch=64,
                  input_tokens=100, output_tokens=1, precision=BF16)
    assert "dispatch_all_to_all" in ep.breakdown["decode"] and ep.tpot_s < b64.tpot_s


def test_quantisation_scales_bandwidth_bound_decode_and_memory():
    spec = load_spec("llama-3.1-8b")
    dev = device(bandwidth=1e12)
    times = {q: estimate(spec, Deployment.single(spec, dev), input_tokens=64, output_tokens=1,
                         precision=Precision(q, "bf16", "bf16")) for q in ("fp32", "bf16", "fp8", "int8", "int4")}
    assert times["fp32"].tpot_s > times["bf16"].tpot_s > times["fp8"].tpot_s > times["int4"].tpot_s
    assert times["bf16"].tpot_s / times["int4"].tpot_s == pytest.approx(2 / 0.625, rel=0.1)
    edges = 2 * spec.vocab_size * spec.hidden_size  # embedding and LM head (untied): kept at 8 bits
    assert times["int4"].memory["weights"] == pytest.approx(
        (spec.parameters() - edges) * 0.625 + edges * 1.0625, rel=0.01)
    kv8 = estimate(spec, Deployment.single(spec, dev), batch=4, input_tokens=4096, output_tokens=1,
                   precision=Precision("bf16", "fp8", "bf16"))
    assert kv8.memory["kv_cache"] == pytest.approx(times["bf16"].memory["kv_cache"] * 4 * 4097 / 65 / 2, rel=0.01)


def test_memory_breakdown_and_largest_batch():
    spec = load_spec("llama-2-7b")
    h100 = load_device("h100")
    est = estimate(spec, Deployment.single(spec, h100), batch=1, input_tokens=2048, output_tokens=2048)
    assert est.memory["weights"] == pytest.approx(spec.parameters() * 2, rel=0.001)
    assert est.memory["kv_cache"] == pytest.approx(spec.kv_bytes_per_token(2) * 4096)
    fits = estimate(spec, Deployment.single(spec, h100), batch=est.max_batch, input_tokens=2048, output_tokens=2048)
    too_many = estimate(spec, Deployment.single(spec, h100), batch=est.max_batch + 1, input_tokens=2048,
                        output_tokens=2048)
    assert fits.fits and not too_many.fits


def test_chunked_prefill_and_speculative_decoding():
    spec = load_spec("llama-3.1-8b")
    dep = Deployment.single(spec, load_device("a100-80gb"))
    plain = estimate(spec, dep, batch=1, input_tokens=2048, output_tokens=64)
    assert estimate(spec, dep, batch=1, input_tokens=2048, output_tokens=64, chunk=4096).ttft_s == plain.ttft_s
    chunked = estimate(spec, dep, batch=16, input_tokens=2048, output_tokens=64, chunk=512)
    assert chunked.ttft_s > plain.ttft_s  # four chunks, each beside 15 decodes
    draft = load_spec("llama-3.2-1b")
    good = estimate(spec, dep, input_tokens=512, output_tokens=64, draft=Draft(draft, gamma=4, acceptance=0.8))
    bad = estimate(spec, dep, input_tokens=512, output_tokens=64, draft=Draft(draft, gamma=4, acceptance=0.0))
    base = estimate(spec, dep, input_tokens=512, output_tokens=64)
    assert Draft(draft, 4, 0.8).tokens_per_step == pytest.approx(1 + 4 * 0.8)  # accepted over drafted: 0.8
    assert good.tpot_s < base.tpot_s < bad.tpot_s
    # prompt lookup drafting in a share of the steps: the others are plain steps
    lookup = [estimate(spec, dep, input_tokens=512, output_tokens=64, draft=Draft(None, 4, 0.8, drafting=share)).tpot_s
              for share in (0.0, 0.5, 1.0)]
    assert lookup[0] == pytest.approx(base.tpot_s) and lookup[0] > lookup[1] > lookup[2]


def test_disaggregated_pools_against_colocated_chunked_prefill():
    """Long prompts arriving while 16 sequences decode: colocated, their chunks stall the decode
    steps they join; on pools of half a device each, the decodes never wait on a chunk but
    every step and every prompt takes longer."""
    from shardwise.perf import disaggregation as d

    spec, device = load_spec("llama-3.1-8b"), load_device("a100-80gb")
    p = Precision("bf16", "bf16", "bf16")
    w = d.Workload(decoding=16, context=600, prompt=2048, interval_s=1.0, chunk=512, output=8)
    together = d.colocated(spec, device, w, p)
    half = device.slower(2)
    apart = d.disaggregated(spec, half, half, w, p)
    assert together.itl_s(0.99) > 1.5 * apart.itl_s(0.99)  # a chunk of 496 prompt tokens beside the decodes
    assert together.itl_s(0.5) < apart.itl_s(0.5) and together.ttft_s < apart.ttft_s
    assert sum(n for _, n in together.steps) * together.tpot_s == pytest.approx(w.interval_s, rel=0.01)
    # each chunk's step, the prompt's 7 later tokens' beside the others, then the plain ones
    assert len(together.steps) == math.ceil(2048 / (512 - 16)) + 7 + 1
    assert apart.steps[0][0] > apart.steps[1][0] > apart.steps[-1][0]  # its KV taken in, its long context read
    busy = d.disaggregated(spec, half, half, replace(w, interval_s=apart.utilisation * w.interval_s / 2), p)
    assert busy.utilisation == pytest.approx(2.0) and busy.ttft_s == pytest.approx(2 * apart.ttft_s)


def test_a_decode_requests_tpot_tail_is_the_requests_that_meet_the_stalls():
    """Between two arrivals one stalled step of 1 s and nine plain ones of 0.1 s: a one-token
    request's worst TPOT is the stall; a request as long as the cycle always meets it once."""
    from shardwise.perf import disaggregation as d

    cycle = d.LayoutPrediction(ttft_s=1.0, steps=((1.0, 1.0), (0.1, 9.0)), utilisation=0.5)
    assert cycle.request_tpot_s(0.99, 1) == 1.0 and cycle.request_tpot_s(0.5, 1) == pytest.approx(0.1)
    assert cycle.request_tpot_s(0.99, 10) == pytest.approx(0.19) == cycle.request_tpot_s(0.0, 10)
    assert cycle.request_tpot_s(0.99, 5) == pytest.approx(0.28) and cycle.request_tpot_s(0.4, 5) == pytest.approx(0.1)


def test_a_weight_formats_own_matmul_efficiency_times_its_products():
    """A profile measures int4 products apart (they read less but unpack what they read): the
    estimator times int4 matmuls of up to the rows measured by that curve, the rest by the float one."""
    from dataclasses import replace

    spec, int4 = load_spec("smollm2-135m"), Precision("int4", "fp32", "fp32")
    float_only = replace(load_device("x86-cpu"), matmul_efficiency=[[1, 0.5], [512, 0.5]])
    measured = replace(float_only, format_matmul_efficiency={"int4": [[1, 0.05], [32, 0.05]]})

    def step(device: DeviceSpec, work: Work) -> float:
        return step_time(spec, Deployment.single(spec, device), work, int4).latency

    assert step(measured, Work.decode(1, 64)) > 3 * step(float_only, Work.decode(1, 64))
    assert step(measured, Work.prefill(1, 256)) == step(float_only, Work.prefill(1, 256))
    fp32 = Precision("fp32", "fp32", "fp32")
    assert step_time(spec, Deployment.single(spec, measured), Work.decode(1, 64), fp32).latency == step_time(
        spec, Deployment.single(spec, float_only), Work.decode(1, 64), fp32).latency


def test_bad_deployments_are_named():
    spec = load_spec("llama-2-7b")
    with pytest.raises(ShardwiseError, match="cover"):
        estimate(spec, Deployment.pipeline(spec, [device(), device()], SAME_DEVICE, layers=[(0, 10), (10, 20)]))
    with pytest.raises(ShardwiseError, match="tp=3"):
        estimate(spec, Deployment.single(spec, device(), tp=3))
    with pytest.raises(ShardwiseError, match="unknown device"):
        load_device("tpu-v9")
    with pytest.raises(ShardwiseError, match="unknown link"):
        load_link("carrier-pigeon")
    with pytest.raises(ShardwiseError, match="unknown precision"):
        Precision("int3")


def test_within_ten_percent_of_genz_on_shared_inputs():
    """Same models, same hardware numbers: totals within 10 %; on GenZ's own operator set within 5 %
    (the differences are written down in benchmarks/genz_peer.py)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from genz_peer import compare

    results = compare()
    assert len(results) == 32
    for case, (ours, ours_like), (theirs, theirs_like) in results:
        assert ours == pytest.approx(theirs, rel=0.10), case
        assert ours_like == pytest.approx(theirs_like, rel=0.05), case


def test_cli_estimate_json_and_plot(tmp_path):
    png = tmp_path / "roofline.png"
    result = cli("estimate", "--model", "llama-3.1-8b", "--device", "h100", "--tp", "2", "--batch", "4",
                 "--quant", "int4", "--json", "--plot", str(png))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    for key in ("ttft_s", "tpot_s", "e2e_s", "throughput_tok_s"):
        assert data[key] > 0
    assert set(data["memory"]) >= {"weights", "kv_cache", "activations"}
    assert data["inputs"]["precision"]["weights"] == "int4"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    table = cli("estimate", "--model", "llama-3.1-70b", "--pp-devices", "a100-80gb,rtx-4090,rtx-4090,rtx-4090",
                "--quant", "int4", "--link", "ethernet-10g")
    assert table.returncode == 0, table.stderr
    assert "time to first token" in table.stdout and "rtx-4090" in table.stdout


@pytest.mark.parametrize("args, message", [
    (["--model", "llama-3.1-405b", "--device", "h100"], "does not fit"),
    (["--model", "gpt-17", "--device", "h100"], "unknown model"),
    (["--model", "llama-2-7b", "--device", "tpu-v9"], "unknown device"),
    (["--model", "llama-2-7b"], "give --device"),
    (["--model", "llama-2-7b", "--device", "h100", "--quant", "int3"], "unknown precision"),
    (["--model", "llama-2-7b", "--device", "h100", "--batch", "0"], "at least 1"),
])
def test_cli_estimate_errors_are_one_line(args, message):
    result = cli("estimate", *args)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_profile_measures_this_machine_and_feeds_estimate(machine_profile):
    """A real profile: roofline, the engine's steps, the fit, and the Ray hop between local stages."""
    out = machine_profile
    data = json.loads(out.read_text())
    (dev,) = data["devices"]
    assert dev["flops"]["fp32"] > 1e9 and dev["bandwidth"] > 1e9 and dev["memory_bytes"] > 1e9
    assert len(dev["matmul_efficiency"]) >= 5 and all(e > 0 for _, e in dev["matmul_efficiency"])
    assert all(e > 0 for _, e in dev["format_matmul_efficiency"]["int4"])  # int4 products, measured apart
    per_layer = dev["measured"]["per_layer"]
    assert per_layer and all(p["seconds"] > 0 for p in per_layer)
    (link,) = data["links"]
    assert 0 < link["latency"] < 0.05 and link["bandwidth"] > 1e6
    # the fitted device predicts the steps it was measured on
    spec, fitted = load_spec("smollm2-135m"), DeviceSpec.from_dict(dev)
    errors = []
    for s in dev["measured"]["steps"]:
        dep = Deployment.pipeline(spec, [fitted], SAME_DEVICE, layers=[(0, spec.num_layers)])
        work = Work(((s["new"], s["context"]),) * s["batch"])
        if s["layers"] == spec.num_layers:
            # (measured back to back, as a device busy all the time runs)
            errors.append(abs(math.log(step_time(spec, dep, work, Precision("fp32", "fp32", "fp32")).cycle(1)
                                       / s["seconds"])))
    assert math.exp(sum(errors) / len(errors)) < 1.3
    # and estimate takes the file, as one device or as local stages joined by the measured hop
    one = cli("estimate", "--model", "smollm2-135m", "--device", str(out), "--json")
    assert one.returncode == 0, one.stderr
    two = cli("estimate", "--model", "smollm2-135m", "--pp-devices", f"{out},{out}", "--json")
    assert two.returncode == 0, two.stderr
    assert json.loads(two.stdout)["breakdown"]["decode"]["links"] >= 2 * link["latency"]


def test_profile_every_node_of_a_ray_cluster_and_their_links():
    """`shardwise profile --address` on a real 2-node Ray cluster (cluster_utils, in its own process).
    Where a lab can run, tests/test_lab.py profiles a real two-node lab instead (and its links)."""
    import subprocess

    from shardwise.lab.host import LabUnavailable, check_host

    try:
        check_host()
        pytest.skip("tests/test_lab.py profiles the nodes and links of a real two-node lab here")
    except LabUnavailable:
        pass

    script = Path(__file__).with_name("multinode_profile_check.py")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900)
    assert result.stdout.strip().endswith("PASS"), result.stdout[-3000:] + result.stderr[-2000:]


def test_stages_sharing_a_host_take_turns_on_it():
    """Two stages on one host (CPU devices of one node): the pipeline is as busy as the host, the
    sum of both stages, however many micro-batches are in flight; one stream is unchanged."""
    spec, cpu = load_spec("smollm2-135m"), load_device("x86-cpu")
    apart = Deployment.pipeline(spec, [cpu, cpu], SAME_DEVICE)
    shared = Deployment.pipeline(spec, [cpu, cpu], SAME_DEVICE, hosts=["node-a", "node-a"])
    work, p = Work.decode(8, 256), Precision("fp32", "fp32", "fp32")
    own, together = step_time(spec, apart, work, p), step_time(spec, shared, work, p)
    assert together.latency == own.latency
    assert together.bottleneck == pytest.approx(sum(own.stages))
    assert together.cycle(2) == pytest.approx(2 * sum(own.stages)) and together.cycle(2) > own.cycle(2)


def test_hosts_sharing_a_machine_crowd_each_other_only_with_micro_batches_in_flight():
    """Two stages on two nodes of one machine (a lab's) compute at once when micro-batches are in
    flight, each at the share of its speed it keeps then; one stream runs them in turn."""
    spec, cpu = load_spec("smollm2-135m"), load_device("x86-cpu")
    same = replace(cpu, machine="boot-1", crowded_share=0.8)
    alone = Deployment.pipeline(spec, [same, replace(same, machine="boot-2")], SAME_DEVICE, hosts=[0, 1])
    crowded = Deployment.pipeline(spec, [same, same], SAME_DEVICE, hosts=[0, 1])
    work, p = Work.decode(8, 256), Precision("fp32", "fp32", "fp32")
    apart, together = step_time(spec, alone, work, p), step_time(spec, crowded, work, p)
    assert together.latency == apart.latency and together.cycle(1) == apart.cycle(1)
    assert together.bottleneck == pytest.approx(apart.bottleneck / 0.8)
    assert together.cycle(4) == pytest.approx(4 * max(apart.stages) / 0.8)
    # a micro-batch's rows lean less on the memory system than a sequence's: where measured, its own share
    batched = replace(same, batched_crowded_share=0.9)
    less = step_time(spec, Deployment.pipeline(spec, [batched, batched], SAME_DEVICE, hosts=[0, 1]), work, p)
    assert less.bottleneck == pytest.approx(apart.bottleneck / 0.9)
