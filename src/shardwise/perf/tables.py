"""Readable tables for estimates and profiles (rich)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from shardwise.perf.estimate import Estimate
from shardwise.perf.hardware import DeviceSpec


def console_for_output() -> Console:
    """Rich wraps at 80 columns when not on a terminal: give piped output room for the tables."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def print_estimate(est: Estimate, console: Console | None = None) -> None:
    console = console or console_for_output()
    i = est.inputs
    summary = Table(title=f"{i['model']}: batch {i['batch']}, {i['input_tokens']} in, {i['output_tokens']} out, "
                          f"weights {i['precision']['weights']}, KV {i['precision']['kv']}")
    summary.add_column("metric")
    summary.add_column("estimate", justify="right")
    for name, value in [
        ("time to first token", _ms(est.ttft_s)),
        ("time per output token", _ms(est.tpot_s)),
        ("end-to-end latency", f"{est.e2e_s:.3f} s"),
        ("throughput (whole requests)", f"{est.throughput_tok_s:.1f} tok/s"),
        ("decode throughput", f"{est.decode_tok_s:.1f} tok/s"),
        ("prefill throughput", f"{est.prefill_tok_s:.1f} tok/s"),
        ("largest batch that fits", str(est.max_batch)),
    ]:
        summary.add_row(name, value)
    console.print(summary)

    stages = Table(title="memory and time per stage (per device)")
    for col in ("stage", "device", "layers", "weights", "KV cache", "activations", "total / capacity",
                "prefill step", "decode step"):
        stages.add_column(col, justify="left" if col in ("device", "layers") else "right")
    for n, s in enumerate(est.stages):
        m = s["memory"]
        fit = "" if s["fits"] else " [red]does not fit[/red]"
        device = s["device"] + (f" x{s['devices']}" if s["devices"] > 1 else "")
        stages.add_row(str(n), device, f"{s['layers'][0]}-{s['layers'][1]}", _gb(m["weights"]), _gb(m["kv_cache"]),
                       _gb(m["activations"]), f"{_gb(m['total'])} / {_gb(s['capacity'])}{fit}",
                       _ms(s["prefill_s"]), _ms(s["decode_s"]))
    console.print(stages)

    breakdown = Table(title="time per step by operator (one micro-batch, all stages)")
    breakdown.add_column("operator")
    breakdown.add_column("prefill", justify="right")
    breakdown.add_column("decode", justify="right")
    names = sorted({n for phase in est.breakdown.values() for n in phase},
                   key=lambda n: -est.breakdown["prefill"].get(n, 0.0))
    for name in names:
        breakdown.add_row(name, _ms(est.breakdown["prefill"].get(name, 0.0)),
                          _ms(est.breakdown["decode"].get(name, 0.0)))
    console.print(breakdown)


def print_profile(devices: list[DeviceSpec], links: list[dict], console: Console | None = None) -> None:
    console = console or console_for_output()
    table = Table(title="measured devices")
    for col in ("device", "FLOP/s", "bandwidth", "memory", "efficiency (compute / memory / attention)",
                "overhead per op / step"):
        table.add_column(col)
    for d in devices:
        flops = ", ".join(f"{k} {v / 1e9:.0f} G" for k, v in d.flops.items())
        table.add_row(d.name, flops, f"{d.bandwidth / 1e9:.1f} GB/s", _gb(d.memory_bytes),
                      f"{d.compute_efficiency:.2f} / {d.memory_efficiency:.2f} / {d.attention_efficiency:.2f}",
                      f"{d.op_overhead_s * 1e6:.1f} us / {d.step_overhead_s * 1e3:.2f} ms")
    console.print(table)
    if links:
        table = Table(title="measured links (Ray hops)")
        for col in ("from", "to", "latency", "bandwidth: a decode step / larger"):
            table.add_column(col)
        for link in links:
            step = link.get("step_bandwidth") or link["bandwidth"]
            table.add_row(link["from"], link["to"], f"{link['latency'] * 1e6:.0f} us",
                          f"{_rate(step)} / {_rate(link['bandwidth'])}")
        console.print(table)


def _rate(bytes_per_s: float) -> str:
    """A link's rate in the unit that shows it (a shaped link passes KB/s, a local hop GB/s).
    Above 100 GB/s the larger message took no longer than the smaller: no cost within noise."""
    if bytes_per_s > 1e11:
        return "free"
    for unit, size in (("GB/s", 1e9), ("MB/s", 1e6)):
        if bytes_per_s >= size:
            return f"{bytes_per_s / size:.1f} {unit}"
    return f"{bytes_per_s / 1e3:.1f} KB/s"


def print_nodes(nodes: list[dict[str, Any]], console: Console | None = None) -> None:
    """`cluster status`: a row per node (membership.status())."""
    console = console or console_for_output()
    table = Table(title=f"{len(nodes)} node{'s' * (len(nodes) != 1)}")
    for col in ("node", "offers", "machine", "last profile", "holds"):
        table.add_column(col)
    for n in nodes:
        offers = f"{n['cpus']:g} CPU" + (f", {n['gpus']:g} GPU" if n["gpus"] else "") + f", {_gb(n['memory'])}"
        profiles = "\n".join(f"{p['name']}: {max(p['flops'].values()) / 1e9:.0f} GFLOP/s, "
                             f"{p['bandwidth'] / 1e9:.1f} GB/s"
                             + (f", keeps {p['sustained_share']:.0%}" if p.get("sustained_share", 1) < 0.95 else "")
                             for p in n["profiles"]) or "none (shardwise profile --address)"
        held = "\n".join(f"{h['model']}: " + ("whole" if h["bytes"] >= h["of"] else
                                               f"{h['bytes'] / 1e6:.0f} of {h['of'] / 1e6:.0f} MB")
                         for h in n["held"]) or "nothing cached"
        named = f"\n{n['name']}" if n["name"] not in ("", n["node"]) else ""  # (Ray's default name: the IP)
        name = n["node"] + (" (head)" if n["head"] else "") + named
        table.add_row(name, offers, f"{n['cpu']}\n{n['cores']} cores, {n['host']}", profiles, held)
    console.print(table)
