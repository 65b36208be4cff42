"""`make bench`: every benchmark in benchmarks/, run the way the README shows (`python benchmarks/<name>.py`).

    python benchmarks/run_all.py [--only loader samplers] [--list]

Every `benchmarks/bench_*.py` is found by name (a new benchmark needs no entry here), run one after another from
the repo root, and writes its own `benchmarks/results/<name>.json`; this runner writes
`benchmarks/results/run_all.json` (per benchmark: command, exit code, wall seconds, load average before, result
files written) and prints one line each. Benchmarks that measure pipeline outputs read them from the workspace
and are skipped, with the reason, when those are missing. A failing benchmark does not stop the others; the exit
code is 1 if any failed. Expect hours on a CPU for the full set (teacher objectives, DPO, evaluation).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def _has(*paths: str) -> Callable[[], Optional[str]]:
    def check() -> Optional[str]:
        missing = [p for p in paths if not (REPO / p).exists()]
        return f"needs {', '.join(missing)} (run `make demo` first)" if missing else None
    return check


def _image_metrics() -> Optional[str]:
    path = REPO / "data/evaluate/metrics.json"
    if not path.exists() or "fd" not in json.loads(path.read_text()).get("floor", {}):
        return "needs an image evaluation in data/evaluate/metrics.json (run `make demo-digits` first)"
    return None


# Arguments and preconditions of the benchmarks that need more than their defaults.
ARGS: dict[str, list[str]] = {"bench_reflow": ["--teacher", "models/teacher", "--shards", "data/shards"]}
NEEDS: dict[str, Callable[[], Optional[str]]] = {
    "bench_reflow": _has("models/teacher/model.pt", "data/shards/manifest.json"),
    "bench_digits": _image_metrics,
    "bench_consistency_grid": _has("models/consistency/model.pt", "data/shards/manifest.json"),
}


def benchmarks() -> list[str]:
    return sorted(p.stem for p in (REPO / "benchmarks").glob("bench_*.py"))


def run_one(name: str) -> dict:
    command = [sys.executable, f"benchmarks/{name}.py", *ARGS.get(name, [])]
    reason = NEEDS[name]() if name in NEEDS else None
    record = {"command": " ".join(["python", *command[1:]]), "load_average_before": os.getloadavg()}
    if reason:
        return {**record, "status": "skipped", "reason": reason}
    before = {p: p.stat().st_mtime for p in RESULTS.glob("*.json")}
    started = time.time()
    code = subprocess.call(command, cwd=REPO)
    written = sorted(p.name for p in RESULTS.glob("*.json") if before.get(p) != p.stat().st_mtime)
    return {**record, "status": "ok" if code == 0 else "failed", "exit_code": code,
            "seconds": round(time.time() - started, 1), "results": written}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these (e.g. loader or bench_loader)")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = ap.parse_args(argv)
    names = benchmarks()
    if args.list:
        print("\n".join(names))
        return 0
    if args.only:
        wanted = {n if n.startswith("bench_") else f"bench_{n}" for n in args.only}
        unknown = sorted(wanted - set(names))
        if unknown:
            print(f"error: no benchmark {', '.join(unknown)} in benchmarks/ (have: {', '.join(names)})", file=sys.stderr)
            return 2
        names = [n for n in names if n in wanted]
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name in names:
        print(f"== {name}", flush=True)
        summary[name] = run_one(name)
        (RESULTS / "run_all.json").write_text(json.dumps(summary, indent=1) + "\n")  # kept current if interrupted
    for name, r in summary.items():
        detail = r.get("reason") or f"exit {r['exit_code']}, {r['seconds']} s, wrote {', '.join(r['results']) or '-'}"
        print(f"{r['status']:8s} {name}: {detail}")
    return 1 if any(r["status"] == "failed" for r in summary.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
