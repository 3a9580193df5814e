"""A roofline chart of an estimate's operators and its time breakdown (one PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shardwise.perf.estimate import Estimate
from shardwise.perf.hardware import DeviceSpec


def plot_estimate(est: Estimate, device: DeviceSpec, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (roof, bars) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    dtype = est.inputs["precision"]["activations"]
    peak, bw = device.peak_flops(dtype), device.bandwidth
    x = np.geomspace(1e-2, 1e4, 200)
    roof.loglog(x, np.minimum(peak, bw * x), "k-", label=f"{device.name} roofline ({dtype})")
    for phase, marker in (("prefill", "o"), ("decode", "s")):
        for t in est.operators[phase]:
            if t.op.kind == "collective" or not t.op.flops or not t.op.bytes:
                continue
            achieved = t.op.flops / t.time_s
            roof.scatter(t.op.intensity, achieved, marker=marker, s=30)
            roof.annotate(f"{t.op.name} ({phase})", (t.op.intensity, achieved), fontsize=6,
                          xytext=(3, 3), textcoords="offset points")
    roof.set_xlabel("operational intensity (FLOP/byte)")
    roof.set_ylabel("attained FLOP/s")
    roof.set_title("operators on the roofline (first stage)")
    roof.legend(loc="lower right")

    names = sorted({n for phase in est.breakdown.values() for n in phase})
    left = np.zeros(2)
    colours = plt.get_cmap("tab20")
    for k, name in enumerate(names):
        widths = np.array([est.breakdown[p].get(name, 0.0) * 1e3 for p in ("prefill", "decode")])
        shares = widths / np.maximum([sum(est.breakdown[p].values()) * 1e3 for p in ("prefill", "decode")], 1e-12)
        bars.barh(["prefill step", "decode step"], shares, left=left, label=name, color=colours(k % 20))
        left += shares
    bars.set_xlabel("share of step time")
    bars.set_title(f"time breakdown: TTFT {est.ttft_s * 1e3:.1f} ms, TPOT {est.tpot_s * 1e3:.2f} ms")
    bars.legend(fontsize=6, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
