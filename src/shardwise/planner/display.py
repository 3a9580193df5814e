"""Presenting plans: rich tables and a Gantt chart of one pipeline step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from shardwise.perf.tables import console_for_output


def print_plan(summary: dict[str, Any], console: Console | None = None) -> None:
    console = console or console_for_output()
    objective, batch = summary["objective"], summary["batch"]
    table = Table(title=f"{summary['model']}: {objective}-optimal plan, decode batch {batch}")
    numbers = ("stage", "compute", "when busy", "transfer out")
    for col in ("stage", "device", "node", "layers", "memory / available", "compute", "when busy", "transfer out"):
        table.add_column(col, justify="right" if col in numbers else "left")
    for k, s in enumerate(summary["stages"]):
        # a node under a quota computes at full speed when it rests between turns, at its share when busy
        busy = f"{s['busy_s'] * 1e3:.2f} ms ({s['share']:.0%} speed)" if s["share"] < 1 else "same"
        table.add_row(str(k), s["device"], s["node"], f"{s['layers'][0]}-{s['layers'][1]}",
                      f"{s['memory_bytes'] / 1e9:.2f} / {s['capacity_bytes'] / 1e9:.2f} GB",
                      f"{s['compute_s'] * 1e3:.2f} ms", busy, f"{s['transfer_s'] * 1e3:.2f} ms")
    console.print(table)
    pacing = max(summary["stages"], key=lambda s: s["busy_s"])
    if objective == "latency" and pacing["share"] < 1 and pacing["busy_s"] >= summary["dp"]["value"] * (1 - 1e-9):
        console.print(f"one stream is paced by {pacing['device']}, which keeps up {pacing['share']:.0%} of its "
                      "speed when busy: its layers' work must fit its share of each token's time")
    declined = summary.get("declined")
    if declined:
        gain = summary["dp"]["value"] / declined["value"] - 1
        console.print(f"fewer stages kept: {declined['layout']} would be {gain:.0%} faster by the estimate, "
                      f"less than the {declined['gain'] - 1:.0%} each further stage must gain")
    tensor = summary.get("tensor_parallel")
    if tensor:
        ratio = tensor["pipeline_value"] / tensor["value"]
        if tensor["pays"]:
            console.print(f"tensor parallelism pays: {tensor['layout']} is predicted {ratio:.2f}x as fast as the "
                          "best plan without it")
        else:
            console.print(f"tensor parallelism does not pay: the best plan with it ({tensor['layout']}) would take "
                          f"{tensor['value'] * 1e3:.2f} ms, {1 / ratio:.2f}x this plan's time (it must gain "
                          f"{tensor['gain'] - 1:.0%}: each of its layers waits for two all-reduces)")
    base = Table(title="the same cluster split the other ways (same cost model)")
    for col in ("split", "stages", "latency per token" if objective == "latency" else f"step of {batch} sequences",
                "tokens/s", "vs shardwise"):
        base.add_column(col, justify="left" if col in ("split", "stages") else "right")
    for name, row in [("shardwise DP", summary["dp"]), *summary["baselines"].items()]:
        if row["value"] is None:
            base.add_row(name, row["layout"], "[red]does not fit[/red]", "-", "-")
            continue
        rate = batch / row["value"]
        ratio = row["value"] / summary["dp"]["value"]
        base.add_row(name, row["layout"], f"{row['value'] * 1e3:.2f} ms", f"{rate:.1f}", f"{ratio:.2f}x")
    console.print(base)


def print_split(summary: dict[str, Any], console: Console | None = None) -> None:
    console = console or console_for_output()
    best = summary["best"]
    console.print(f"[bold]{summary['model']}[/bold]: least server work within {summary['sla_s'] * 1e3:.1f} ms "
                  f"per token: server {best['server_work_s'] * 1e3:.2f} ms "
                  f"({best['server_share']:.0%} of all-server), latency {best['latency_s'] * 1e3:.2f} ms, "
                  f"client memory {best['client_memory_bytes'] / 1e9:.2f} GB")
    console.print("placement: " + " ".join("S" if p == "server" else "c" for p in best["placement"])
                  + "   (c: client, S: server, one letter per layer)")
    table = Table(title="server work as the SLA loosens")
    for col in ("latency", "server work", "server layers"):
        table.add_column(col, justify="right")
    frontier = summary["frontier"]
    step = max(1, len(frontier) // 12)  # a dozen points are enough to read the trade-off
    for point in frontier[::step] + ([frontier[-1]] if (len(frontier) - 1) % step else []):
        table.add_row(f"{point['latency_s'] * 1e3:.2f} ms", f"{point['server_work_s'] * 1e3:.2f} ms",
                      str(point["placement"].count("server")))
    console.print(table)


def plot_gantt(summary: dict[str, Any], path: str | Path, micro_batches: int = 3) -> None:
    """One row per stage: compute and hand-over of `micro_batches` micro-batches in flight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = summary["stages"]
    fig, ax = plt.subplots(figsize=(11, 1.0 + 0.6 * len(stages)))
    colours = plt.get_cmap("tab10")
    free = [0.0] * len(stages)
    for m in range(micro_batches):
        t = 0.0
        for k, s in enumerate(stages):
            t = max(t, free[k])
            ax.barh(k, s["compute_s"] * 1e3, left=t * 1e3, color=colours(m % 10), edgecolor="black")
            t += s["compute_s"]
            free[k] = t
            if s["transfer_s"]:
                ax.barh(k, s["transfer_s"] * 1e3, left=t * 1e3, color=colours(m % 10), alpha=0.35, hatch="//")
                t += s["transfer_s"]
    ax.set_yticks(range(len(stages)), [f"{s['device']} [{s['layers'][0]}, {s['layers'][1]})" for s in stages])
    ax.invert_yaxis()
    ax.set_xlabel("ms (solid: compute, hatched: hand-over to the next stage)")
    ax.set_title(f"{summary['model']}: {summary['objective']} plan, {micro_batches} micro-batches")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
