"""The learned-width table of BENCHMARKS.md (benchmark d) from six `peerd sim` runs.

Usage: python scripts/learned_width_summary.py RUNS
RUNS holds `on-seedS` and `off-seedS` for S = 0, 1, 2: mixed-B clusters (mu 1, 0.5 x3,
0.25 x4) run with and without `--learned-width`. Accuracies are the mean of the last 5
evaluated rounds; each figure is the median [min, max] over seeds, then the per-seed values.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

SEEDS = (0, 1, 2)
PEERS_BY_MU = {"1": [0], "0.5": [1, 2, 3], "0.25": [4, 5, 6, 7]}  # mixed-B's peer order
LAST_ROUNDS = 5


def summarise(metrics: Path) -> dict[str, float]:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    last = [r for r in records if r.get("global_acc") is not None][-LAST_ROUNDS:]
    figures = {"global": statistics.mean(r["global_acc"] for r in last),
               "gflops": sum(records[-1]["train_flops_cum_peer"]) / 1e9}
    for mu, peers in PEERS_BY_MU.items():
        figures[f"own mu {mu}"] = statistics.mean(
            statistics.mean(r["peer_acc"][p] for p in peers) for r in last)
    return figures


def main(runs: Path) -> None:
    table = {variant: [summarise(runs / f"{variant}-seed{seed}" / "metrics.jsonl")
                       for seed in SEEDS] for variant in ("on", "off")}
    for figure in ("global", *(f"own mu {mu}" for mu in PEERS_BY_MU)):
        for variant, rows in table.items():
            values = [row[figure] for row in rows]
            print(f"{variant} {figure} {statistics.median(values):.3f} "
                  f"[{min(values):.3f}, {max(values):.3f}] {[round(v, 3) for v in values]}")
        print(f"on-off {figure}", [round(on[figure] - off[figure], 3)
                                    for on, off in zip(table["on"], table["off"], strict=True)])
    print("training FLOPs on/off", [round(on["gflops"] / off["gflops"], 3)
                                    for on, off in zip(table["on"], table["off"], strict=True)])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
