"""Print the leaderboard from data/evaluate/metrics.json: models x NFE, each cell the best sampler's ratio to the floor
with its 95% interval, marked "tie" where the interval overlaps that of the teacher's best cell.

    python -m flows.summary            (what `make demo` prints at the end; the full report is
                                        data/evaluate/report/report.html)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from flows.runtime import repo_root

MARK = {"tie": "=", "better": "+", "worse": "", None: ""}


def cell(entry: dict, metric: str) -> str:
    value, ci = entry.get(f"{metric}_ratio"), entry.get(f"{metric}_ratio_ci")
    if value is None:
        return "-"
    text = f"{value:.2f}" + (f" [{ci[0]:.2f},{ci[1]:.2f}]" if ci else "")
    text += MARK.get(entry.get("vs_teacher_best"), "")
    if entry.get(f"{metric}_below_floor"):
        text += "!"
    return text


def summary_lines(metrics: dict) -> list[str]:
    metric = "sw2" if "sw2" in metrics["floor"] else "fd"
    nfes = sorted({int(n) for m in metrics["models"].values() for n in m["nfe"]})
    width = 19
    head = f"{'model':12s}" + "".join(f"{'NFE ' + str(n):>{width}s}" for n in nfes)
    floor_sd = metrics.get("floor_sd", {}).get(metric)
    floor_text = f"{metrics['floor'][metric]:.4g}" + (f" +- {floor_sd:.2g} sd over {metrics.get('floor_draws')} draws"
                                                       if floor_sd is not None else "")
    lines = [f"{metrics.get('dataset', '?')}: {metric} as a multiple of the floor ({metric} between disjoint real sets "
             f"= {floor_text}), n = {metrics.get('n_samples')}; best sampler at each NFE, [95% interval];",
             "'=' tie with the teacher's best (intervals overlap), '+' better, '!' below the floor (an artefact, "
             "not a win); lower is better, 1 = floor",
             head, "-" * len(head)]
    for name, model in metrics["models"].items():
        table = model.get("best", model["nfe"])
        lines.append(f"{name:12s}" + "".join(f"{cell(table[str(n)], metric) if str(n) in table else '-':>{width}s}"
                                             for n in nfes))
    best = metrics.get("teacher_best")
    if best:
        ci = best[f"{metric}_ratio_ci"]
        lines.append(f"teacher's best: NFE {best['nfe']} with {best['sampler']}: {best[f'{metric}_ratio']:.2f} "
                     f"[{ci[0]:.2f}, {ci[1]:.2f}]")
    samplers = {name: sorted({c.get("sampler", "") for c in m.get("best", {}).values()})
                for name, m in metrics["models"].items()}
    lines.append("best samplers: " + "; ".join(f"{k} {', '.join(v)}" for k, v in samplers.items() if v))
    if metrics.get("straightness"):
        lines.append("straightness (0 = straight paths): " +
                     ", ".join(f"{k} {v:.3f}" for k, v in metrics["straightness"].items() if not k.endswith("_ci")))
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
