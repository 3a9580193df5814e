"""Predicted vs measured on this machine, and the estimator vs GenZ, in one run.

1. Profile this machine (or load --profile FILE), then run the real engine over a grid
   and compare with `estimate` using that profile:
     TTFT: prompts of 32, 128 and 512 tokens at batch 1;
     TPOT: batch 1, 8 and 32 at a 64-token prompt;
   each on 1, 2 and 3 local Ray stages (one process for 1). TTFT is a 1-token generation;
   TPOT the median step once every sequence decodes. None of these points is one the profile
   measures. This VM's speed drifts by 10-20 % over minutes and is noisy in bursts, so the
   measurement goes in rounds: each round profiles the device again (in this process; the
   Ray hop is measured once) and then times every point once, all engines loaded side by
   side, each TTFT point warmed by a run of itself just before it (an engine left idle while
   the others ran, or the profile, pays page-ins, thread wake-ups and its products' first
   calls at a new size on its first step; a TPOT point's own prefill warms it). Predictions
   and measurements are each the median over rounds.
2. GenZ on shared inputs (benchmarks/genz_peer.py).
Prints each point and the geometric-mean absolute percentage error,
exp(mean(log(1 + |pred / measured - 1|))) - 1, which no single lucky point can pull to zero.

    python benchmarks/estimate_vs_measured.py [--profile this-machine.json] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

PROMPTS = (32, 128, 512)
BATCHES = (1, 8, 32)
TPOT_PROMPT = 64
NEW_TOKENS = 17
STAGES = (1, 2, 3)


def geomean_ape(pairs: list[tuple[float, float]]) -> float:
    return math.exp(statistics.fmean(math.log(1 + abs(p / m - 1)) for p, m in pairs)) - 1


def prompts(prompt: int, batch: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(prompt * 1000 + batch)
    return torch.randint(100, 40000, (batch, prompt), generator=gen).tolist()


def timed_generate(llm, prompt: int, batch: int, new: int) -> float:
    from shardwise import SamplingParams

    start = time.perf_counter()
    llm.generate(prompts(prompt, batch), SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="a `shardwise profile` file (default: profile now)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import ray

    from shardwise import LLM
    from shardwise.model.catalog import load_spec
    from shardwise.perf.cluster_profile import decode_step_seconds, profile_cluster
    from shardwise.perf.estimate import Deployment, estimate
    from shardwise.perf.hardware import DeviceSpec, LinkSpec
    from shardwise.perf.operators import Precision
    from shardwise.perf.profile import profile_device

    if args.profile:
        profile = json.loads(Path(args.profile).read_text())
    else:
        print("profiling this machine and the hop between local stages ...", flush=True)
        profile = profile_cluster("smollm2-135m", progress=lambda what: None)
    hop = LinkSpec.from_dict(profile["links"][0])
    spec = load_spec("smollm2-135m")
    fp32 = Precision("fp32", "fp32", "fp32")

    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    # (no prefix cache: every round repeats its prompts, and a cached prompt is not prefilled again)
    engines = {n: LLM(dtype="float32", stages=n if n > 1 else None, prefix_cache=False) for n in STAGES}
    points = [("TTFT", n, prompt, 1) for n in STAGES for prompt in PROMPTS]
    points += [("TPOT", n, TPOT_PROMPT, batch) for n in STAGES for batch in BATCHES]
    measured: dict[tuple, list[float]] = {p: [] for p in points}
    predicted: dict[tuple, list[float]] = {p: [] for p in points}
    for _, n, prompt, batch in points:  # first allocations, first page-ins
        timed_generate(engines[n], prompt, batch, 2)
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", flush=True)
        device = DeviceSpec.from_dict(profile["devices"][0]) if args.profile or r == 0 else profile_device(
            "smollm2-135m")
        for point in points:
            kind, n, prompt, batch = point
            dep = Deployment.pipeline(spec, [device] * n, hop) if n > 1 else Deployment.single(spec, device)
            est = estimate(spec, dep, batch=batch, input_tokens=prompt, precision=fp32, micro_batches=1,
                           output_tokens=1 if kind == "TTFT" else NEW_TOKENS)
            predicted[point].append(est.ttft_s if kind == "TTFT" else est.tpot_s)
            if kind == "TTFT":
                timed_generate(engines[n], prompt, batch, 1)  # warm: the point's own shapes
                measured[point].append(timed_generate(engines[n], prompt, batch, 1))
            else:  # (its own prefill warms the engine; the median drops a slow first decode step)
                measured[point].append(decode_step_seconds(engines[n], prompts(prompt, batch), NEW_TOKENS))
    for llm in engines.values():
        llm.close()
    ray.shutdown()

    rows = [(f"{kind}  prompt {prompt:3d}  batch {batch:2d}  stages {n}", statistics.median(predicted[point]),
             statistics.median(measured[point])) for point in points for kind, n, prompt, batch in [point]]
    print("\npredicted vs measured on this machine (SmolLM2-135M, fp32)")
    print(f"{'point':38s}{'predicted':>12s}{'measured':>12s}{'error':>9s}")
    for row in rows:
        print("{:38s}{:>12s}{:>12s}{:>9s}".format(*_fmt(row)))
    ttft = [(p, m) for label, p, m in rows if label.startswith("TTFT")]
    tpot = [(p, m) for label, p, m in rows if label.startswith("TPOT")]
    print(f"geomean |error|: TTFT {geomean_ape(ttft):.1%}, TPOT {geomean_ape(tpot):.1%}, "
          f"all {geomean_ape(ttft + tpot):.1%} (target <= 10 %, goal <= 5 %)")

    from genz_peer import compare

    results = compare()
    print("\nshardwise vs GenZ on shared inputs (32 cases)")
    print(f"geomean |difference|: totals {geomean_ape([(o[0], t[0]) for _, o, t in results]):.1%}, "
          f"GenZ's operator set {geomean_ape([(o[1], t[1]) for _, o, t in results]):.1%}; "
          f"largest total {max(abs(o[0] / t[0] - 1) for _, o, t in results):.1%}")


def _fmt(row: tuple[str, float, float]) -> tuple[str, str, str, str]:
    label, predicted, measured = row
    return label, f"{predicted * 1e3:.1f} ms", f"{measured * 1e3:.1f} ms", f"{predicted / measured - 1:+.1%}"


if __name__ == "__main__":
    main()
