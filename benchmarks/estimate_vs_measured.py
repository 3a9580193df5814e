"""Predicted vs measured on this machine, and the estimator vs GenZ, in one run.

1. Profile this machine (or load --profile FILE), then run the real engine over a grid
   and compare with `estimate` using that profile:
     TTFT: prompts of 32, 128 and 512 tokens at batch 1;
     TPOT: batch 1, 8 and 32 at a 128-token prompt;
   each on 1, 2 and 3 local Ray stages (one process for 1). Medians over repeats.
   TTFT is a 1-token generation; TPOT is (time of N tokens - time of 1) / (N - 1).
2. GenZ on shared inputs (benchmarks/genz_peer.py).
Prints each point and the geometric-mean absolute percentage error,
exp(mean(log(1 + |pred / measured - 1|))) - 1, which no single lucky point can pull to zero.

    python benchmarks/estimate_vs_measured.py [--profile this-machine.json] [--repeats 3]
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
TPOT_PROMPT = 128
NEW_TOKENS = 17
STAGES = (1, 2, 3)


def geomean_ape(pairs: list[tuple[float, float]]) -> float:
    return math.exp(statistics.fmean(math.log(1 + abs(p / m - 1)) for p, m in pairs)) - 1


def measure(llm, prompt: int, batch: int, new: int, repeats: int) -> float:
    from shardwise import SamplingParams

    gen = torch.Generator().manual_seed(prompt * 1000 + batch)
    ids = torch.randint(100, 40000, (batch, prompt), generator=gen).tolist()
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    llm.generate(ids, params)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        llm.generate(ids, params)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="a `shardwise profile` file (default: profile now)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import ray

    from shardwise import LLM
    from shardwise.model.catalog import load_spec
    from shardwise.perf.cluster_profile import profile_cluster
    from shardwise.perf.estimate import Deployment, estimate
    from shardwise.perf.hardware import DeviceSpec, LinkSpec
    from shardwise.perf.operators import Precision

    if args.profile:
        profile = json.loads(Path(args.profile).read_text())
    else:
        print("profiling this machine ...", flush=True)
        profile = profile_cluster("smollm2-135m", progress=lambda what: None)
    device = DeviceSpec.from_dict(profile["devices"][0])
    hop = LinkSpec.from_dict(profile["links"][0])
    spec = load_spec("smollm2-135m")
    fp32 = Precision("fp32", "fp32", "fp32")

    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = []  # (label, predicted, measured)
    for stages in STAGES:
        llm = LLM(dtype="float32") if stages == 1 else LLM(dtype="float32", stages=stages)
        dep = Deployment.pipeline(spec, [device] * stages, hop) if stages > 1 else Deployment.single(spec, device)
        for prompt in PROMPTS:
            measured = measure(llm, prompt, 1, 1, args.repeats)
            predicted = estimate(spec, dep, input_tokens=prompt, output_tokens=1, precision=fp32,
                                 micro_batches=1).ttft_s
            rows.append((f"TTFT  prompt {prompt:3d}  batch  1  stages {stages}", predicted, measured))
            print(*_fmt(rows[-1]), flush=True)
        for batch in BATCHES:
            full = measure(llm, TPOT_PROMPT, batch, NEW_TOKENS, args.repeats)
            first = measure(llm, TPOT_PROMPT, batch, 1, args.repeats)
            measured = (full - first) / (NEW_TOKENS - 1)
            predicted = estimate(spec, dep, batch=batch, input_tokens=TPOT_PROMPT, output_tokens=NEW_TOKENS,
                                 precision=fp32, micro_batches=1).tpot_s
            rows.append((f"TPOT  prompt {TPOT_PROMPT}  batch {batch:2d}  stages {stages}", predicted, measured))
            print(*_fmt(rows[-1]), flush=True)
        llm.close()
    ray.shutdown()

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
