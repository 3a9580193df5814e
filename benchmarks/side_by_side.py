"""The side-by-side table every benchmark prints (a measurement per side and their ratio), and
the interleaved medians most of them measure with."""

import statistics
import time


def paired_medians(repeats: int, runs, *args) -> list[float]:
    """Median seconds of each run, the runs interleaved within every repeat so that a
    noisy machine's drift hits all of them alike."""
    for run in runs:
        run(*args)  # warm up
    times = [[] for _ in runs]
    for _ in range(repeats):
        for run, samples in zip(runs, times, strict=True):
            start = time.perf_counter()
            run(*args)
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def print_ratio_table(title: str, sides: tuple[str, str], rows: list[tuple[str, float, float, float]]) -> None:
    """rows: (label, first side, second side, ratio), where a ratio > 1 favours shardwise."""
    width = max(len(label) for label, *_ in rows) + 2
    print(f"\n{title}")
    print(f"{'':{width}}{sides[0]:>14}{sides[1]:>14}{'ratio':>8}")
    for label, a, b, ratio in rows:
        print(f"{label:{width}}{a:14.3f}{b:14.3f}{ratio:7.2f}x")
