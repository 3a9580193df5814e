"""The planner: its speed, and its plans against how others split the same cluster.

1. Speed: 80 layers x 8 heterogeneous devices (target < 1 s), and 64 devices of 4 types
   (identical devices grouped; target < 5 s), medians of 3.
2. Quality: on a few heterogeneous clusters, the DP's predicted throughput and latency
   against even (vLLM), memory-proportional (exo, llama.cpp), FLOPS-proportional (Cake)
   and greedy fastest-first splits, all under the same cost model; ratio > 1 favours
   shardwise.

    python benchmarks/planner.py
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from side_by_side import print_ratio_table

from shardwise.model.catalog import load_spec
from shardwise.planner import CostTable, solve
from shardwise.planner.topology import Cluster, plan_cluster

CLUSTERS = {
    "home lab (70B int4)": ("llama-3.1-70b", "int4", """
        source: laptop
        default_link: ethernet-10g
        devices:
          - {name: laptop, type: m2-max, memory_gb: 24}
          - {name: gpu, type: rtx-4090, count: 2}
          - {name: old, type: rtx-3090}
          - {name: pi, type: raspberry-pi-5}
    """),
    "mixed datacenter (405B fp8)": ("llama-3.1-405b", "fp8", """
        default_link: infiniband-ndr
        devices:
          - {name: h200, type: h200, count: 2}
          - {name: h100, type: h100, count: 2}
          - {name: a100, type: a100-80gb, count: 2}
          - {name: l4, type: l4, count: 2}
    """),
    "edge (8B bf16)": ("llama-3.1-8b", None, """
        default_link: wifi6
        devices:
          - {name: orin, type: jetson-agx-orin, memory_gb: 12}
          - {name: mac, type: m2-max, memory_gb: 8}
          - {name: cpu, type: x86-cpu, memory_gb: 16}
    """),
}


def speed(devices: int, types: int, layers: int = 80) -> float:
    rng = np.random.default_rng(0)
    kind = np.arange(devices) % types
    compute = rng.uniform(1, 3, (types, layers))[kind]
    capacity = rng.uniform(4, 20, types)[kind]
    link = rng.uniform(0.1, 1, (types, types))
    transfer = (link + link.T)[kind][:, kind] / 2
    np.fill_diagonal(transfer, 0)
    table = CostTable(compute, np.ones(layers), capacity, transfer, rows=16)  # (throughput: 16 sequences)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        solve(table, "throughput")
        solve(table, "latency")
        times.append((time.perf_counter() - start) / 2)
    return statistics.median(times)


def main() -> None:
    import yaml

    print(f"80 layers x 8 distinct devices: {speed(8, 8):.3f} s per solve (target < 1 s)")
    print(f"80 layers x 64 devices of 4 types: {speed(64, 4):.3f} s per solve (target < 5 s)")
    for title, (model, quant, text) in CLUSTERS.items():
        spec, cluster = load_spec(model), Cluster.from_dict(yaml.safe_load(text))
        rows = []
        for objective, batch in (("throughput", 16), ("latency", 1)):
            _, summary = plan_cluster(spec, cluster, objective, batch=batch, quant=quant, kv_tokens=4096)
            dp = summary["dp"]["value"]
            for name, row in summary["baselines"].items():
                value = row["value"]
                label = f"{objective} (batch {batch}): {name}"
                if value is None:
                    print(f"  {title}: {label} does not fit")
                    continue
                # tokens/s for throughput, ms per token for latency; ratio > 1 favours shardwise
                if objective == "throughput":
                    rows.append((label, batch / dp, batch / value, value / dp))
                else:
                    rows.append((label, dp * 1e3, value * 1e3, value / dp))
        print_ratio_table(f"{title}: shardwise DP vs other splits (tok/s or ms/token)", ("shardwise", "other"),
                          rows)


if __name__ == "__main__":
    main()
