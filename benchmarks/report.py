"""The side-by-side table every benchmark prints: a measurement per side and their ratio."""


def print_ratio_table(title: str, sides: tuple[str, str], rows: list[tuple[str, float, float, float]]) -> None:
    """rows: (label, first side, second side, ratio), where a ratio > 1 favours shardwise."""
    width = max(len(label) for label, *_ in rows) + 2
    print(f"\n{title}")
    print(f"{'':{width}}{sides[0]:>14}{sides[1]:>14}{'ratio':>8}")
    for label, a, b, ratio in rows:
        print(f"{label:{width}}{a:14.3f}{b:14.3f}{ratio:7.2f}x")
