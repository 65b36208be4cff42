"""Print a compact quality table from data/evaluate/metrics.json: models x NFE, each as a ratio to the floor.

    python -m flows.summary            (what `make demo` prints at the end; the full report is
                                        data/evaluate/report/report.html)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from flows.runtime import repo_root


def summary_lines(metrics: dict) -> list[str]:
    metric = "sw2" if "sw2" in metrics["floor"] else "fd"
    nfes = sorted({int(n) for m in metrics["models"].values() for n in m["nfe"]})
    head = f"{'model':12s}" + "".join(f"{'NFE ' + str(n):>10s}" for n in nfes)
    lines = [f"{metrics.get('dataset', '?')}: {metric} as a multiple of the floor "
             f"({metric} between two disjoint real sets = {metrics['floor'][metric]:.4g}); lower is better, 1 = floor",
             head, "-" * len(head)]
    for name, model in metrics["models"].items():
        cells = [model["nfe"].get(str(n), {}).get(f"{metric}_ratio") for n in nfes]
        lines.append(f"{name:12s}" + "".join(f"{c:10.2f}" if c is not None else f"{'-':>10s}" for c in cells))
    if metrics.get("straightness"):
        lines.append("straightness (0 = straight paths): " +
                     ", ".join(f"{k} {v:.3f}" for k, v in metrics["straightness"].items()))
    return lines


def main() -> int:
    path = repo_root() / "data/evaluate/metrics.json"
    if not path.exists():
        print(f"error: {path} does not exist (run `dvc repro` first)", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(json.loads(path.read_text()))))
    print(f"full report: {path.parent / 'report' / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
