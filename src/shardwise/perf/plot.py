"""A roofline chart of an estimate's operators and its time breakdown (one PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shardwise.perf.estimate import Estimate
from shardwise.perf.hardware import DeviceSpec


def roofline(est: Estimate, device: DeviceSpec) -> dict:
    """The first stage's roofline (peak FLOP/s at the activation dtype, bytes/s) and where each
    of its operators sits on it: intensity (FLOP/byte) and attained FLOP/s."""
    dtype = est.inputs["precision"]["activations"]
    points = [{"name": t.op.name, "phase": phase, "intensity": t.op.intensity, "flops_per_s": t.op.flops / t.time_s,
               "bound": t.bound}
              for phase in ("prefill", "decode") for t in est.operators[phase]
              if t.op.kind != "collective" and t.op.flops and t.op.bytes]
    return {"device": device.name, "dtype": dtype, "peak_flops": device.peak_flops(dtype),
            "bandwidth": device.bandwidth, "points": points}


def plot_estimate(est: Estimate, device: DeviceSpec, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (roof, bars) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    line = roofline(est, device)
    x = np.geomspace(1e-2, 1e4, 200)
    roof.loglog(x, np.minimum(line["peak_flops"], line["bandwidth"] * x), "k-",
                label=f"{device.name} roofline ({line['dtype']})")
    for p in line["points"]:
        roof.scatter(p["intensity"], p["flops_per_s"], marker="o" if p["phase"] == "prefill" else "s", s=30)
        roof.annotate(f"{p['name']} ({p['phase']})", (p["intensity"], p["flops_per_s"]), fontsize=6,
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
