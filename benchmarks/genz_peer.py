"""shardwise's estimator against GenZ (genz-llm) on shared inputs.

Both sides get the same hardware numbers: GenZ's own system table, converted the
way GenZ reads it (its GB and GB/s are binary, 2^30). Deliberate differences:
  - shardwise's embedding is a row gather and its LM head runs only on the rows that
    sample (the last prompt token); GenZ multiplies the one-hot prompt by the embedding
    table and runs the head on every prompt token (~3-4 % of a 7B prefill);
  - shardwise counts norms, RoPE, residual adds, the activation and softmax; GenZ
    ignores them (~1-2 %);
  - shardwise's prefill attention is causal (half the score FLOPs), GenZ's is full.
Besides the totals, compare() gives both sides on GenZ's operator set: the layers'
matmuls, attention and collectives, without the ends and the vector operators.
"""

from __future__ import annotations

import warnings
from itertools import product

from shardwise.model.catalog import load_spec
from shardwise.perf.estimate import Deployment, estimate
from shardwise.perf.hardware import DeviceSpec, LinkSpec
from shardwise.perf.operators import Precision

MODELS = {"llama-2-7b": "meta-llama/Llama-2-7B", "llama-3.1-8b": "meta-llama/Llama-3.1-8B"}
SYSTEMS = ("A100_80GB_GPU", "H100_GPU")
GIB = 2**30


def genz_hardware(system: str) -> tuple[DeviceSpec, LinkSpec]:
    from Systems.system_configs import system_configs

    c = system_configs[system]
    flops = c["Flops"] * 1e12
    device = DeviceSpec(system, c["Memory_size"] * GIB, c["Memory_BW"] * GIB, {"bf16": flops, "fp32": flops})
    return device, LinkSpec(f"{system}-icn", c["ICN"] * GIB, c.get("ICN_LL", 1) * 1e-6)


def cases() -> list[dict]:
    """Every (model, system, tp, phase) case: prefill of 1024 and 2048 tokens, decode at batch 1 and 8."""
    out = []
    for model, system, tp in product(MODELS, SYSTEMS, (1, 2)):
        out += [{"model": model, "system": system, "tp": tp, "phase": "prefill", "batch": 1, "tokens": s}
                for s in (1024, 2048)]
        out += [{"model": model, "system": system, "tp": tp, "phase": "decode", "batch": b, "tokens": 1024}
                for b in (1, 8)]
    return out


ENDS_GENZ = ("embeddings", "classifier", "classifier_AG")
NOT_IN_GENZ = ("embedding", "final_norm", "lm_head", "logits_all_gather", "sampling",  # the ends
               "attn_norm", "mlp_norm", "rope", "residual_add", "activation", "softmax")  # vector operators


def genz_seconds(case: dict) -> tuple[float, float]:
    """GenZ's latency, and the same without its embedding and classifier rows."""
    from GenZ import decode_moddeling, prefill_moddeling

    common = {"model": MODELS[case["model"]], "batch_size": case["batch"], "input_tokens": case["tokens"],
              "system_name": case["system"], "bits": "bf16", "tensor_parallel": case["tp"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if case["phase"] == "prefill":
            out = prefill_moddeling(**common)
        else:
            out = decode_moddeling(**common, output_tokens=0, Bb=1)
    df = out["model_df"]
    ends = df[df["Layer Name"].isin(ENDS_GENZ)]["Latency (msec)"].sum()
    return out["Latency"] / 1e3, (out["Latency"] - ends) / 1e3


def shardwise_seconds(case: dict) -> tuple[float, float]:
    """shardwise's TTFT (prefill) or TPOT (decode), and the same on GenZ's operator set."""
    spec = load_spec(case["model"])
    device, link = genz_hardware(case["system"])
    est = estimate(spec, Deployment.single(spec, device, tp=case["tp"], link=link), batch=case["batch"],
                   input_tokens=case["tokens"], output_tokens=1, precision=Precision("bf16", "bf16", "bf16"))
    total = est.ttft_s if case["phase"] == "prefill" else est.tpot_s
    others = sum(est.breakdown[case["phase"]].get(name, 0.0) for name in NOT_IN_GENZ)
    return total, total - others


def compare() -> list[tuple[dict, tuple[float, float], tuple[float, float]]]:
    """(case, shardwise (total, like for like) seconds, GenZ (total, like for like)) for every case."""
    return [(case, shardwise_seconds(case), genz_seconds(case)) for case in cases()]


if __name__ == "__main__":
    print(f"{'case':52s}{'shardwise':>11s}{'GenZ':>11s}{'diff':>8s}{'like for like':>15s}")
    for case, ours, theirs in compare():
        label = f"{case['model']} {case['system']} tp{case['tp']} {case['phase']} b{case['batch']} s{case['tokens']}"
        print(f"{label:52s}{ours[0] * 1e3:8.2f} ms{theirs[0] * 1e3:8.2f} ms{ours[0] / theirs[0] - 1:+8.1%}"
              f"{ours[1] / theirs[1] - 1:+14.1%}")
