"""The bench table: what was measured, and beside it what the estimator predicted."""

from __future__ import annotations

from rich.table import Table

from shardwise.perf.tables import console_for_output


def print_bench(summary: dict, predicted: dict | None = None) -> None:
    table = Table(title=f"{summary['model']}: {summary['requests']} {summary['workload']} requests at concurrency "
                        f"{summary['concurrency']}, {summary['duration_s']:.1f} s")
    table.add_column("metric")
    for column in ("mean", "p50", "p90", "p99"):
        table.add_column(column, justify="right")
    if predicted:
        table.add_column("estimate", justify="right")

    def row(name: str, key: str, unit: float, fmt: str, estimate_key: str) -> None:
        stats = summary[key]
        cells = [fmt.format(stats[c] * unit) if c in stats else "-" for c in ("mean", "p50", "p90", "p99")]
        if predicted:
            cells.append(fmt.format(predicted[estimate_key] * unit))
        table.add_row(name, *cells)

    row("time to first token (ms)", "ttft_s", 1e3, "{:.1f}", "ttft_s")
    row("time per output token (ms)", "tpot_s", 1e3, "{:.1f}", "tpot_s")
    row("request latency (s)", "latency_s", 1, "{:.2f}", "e2e_s")
    throughput = [f"{summary['throughput_tok_s']:.1f}", "", "", ""]
    if predicted:
        throughput.append(f"{predicted['throughput_tok_s']:.1f}")
    table.add_row("throughput (generated tok/s)", *throughput)
    console_for_output().print(table)
