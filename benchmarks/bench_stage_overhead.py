"""Fixed cost of one stage: wall time of `python -m flows selfcheck` (the stage contract with an empty body:
process start, imports, params validation, Prefect flow run on an already running server, MLflow run with
tags/params/manifest artifact, atomic output), median of N runs, plus a breakdown of the big imports.

    python benchmarks/bench_stage_overhead.py [--runs 5]

Writes benchmarks/results/stage_overhead.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from components.io import write_json
from flows.runtime import configure_prefect, repo_root

RESULTS = Path(__file__).resolve().parent / "results"


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    root = repo_root()
    configure_prefect(root)  # start (once) the project-local server, as the first stage of a pipeline would
    env = {**os.environ, "DVC_NO_ANALYTICS": "true"}
    py = sys.executable
    imports = {name: statistics.median(timed([py, "-c", stmt], env) for _ in range(3))
               for name, stmt in (("python", "pass"), ("prefect", "import prefect"), ("mlflow", "import mlflow"),
                                  ("torch", "import torch"))}
    runs = [timed([py, "-m", "flows", "selfcheck"], env) for _ in range(args.runs)]
    result = {"selfcheck_seconds": runs, "median_seconds": statistics.median(runs), "import_seconds": imports,
              "load_average": os.getloadavg()}
    print(f"stage overhead (selfcheck, warm Prefect server): median {result['median_seconds']:.2f} s over "
          f"{args.runs} runs {[round(r, 2) for r in runs]}; imports: " +
          ", ".join(f"{k} {v:.2f}s" for k, v in imports.items()) + f"; load average {os.getloadavg()[0]:.1f}")
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "stage_overhead.json", result)


if __name__ == "__main__":
    main()
