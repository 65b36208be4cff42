"""Print the leaderboard from data/evaluate/metrics.json: models x NFE, each cell the best sampler's ratio to the floor
with its 95% interval, marked "tie" where the interval overlaps that of the teacher's best cell.

    python -m flows.summary            (what `make demo` prints at the end; the full report is
                                        data/evaluate/report/report.html)
"""
from __future__ import annotations

import json
import sys

from components.evaluation.report import summary_lines
from flows.runtime import repo_root


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
