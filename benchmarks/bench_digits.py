"""The digits profile's targets (issue 9), read from an evaluate output: run after `make demo-digits`.

    python benchmarks/bench_digits.py [--metrics data/evaluate/metrics.json] [--wall-seconds S]

Targets: the teacher's Frechet distance (reference-classifier features) within 2x the data floor at its best NFE;
class accuracy of conditional teacher samples >= 0.9 (at that NFE); the best 1-step student (any model but the
teacher and the DPO fine-tune of it) within 1.5x the teacher's best FD; the whole profile under 45 minutes
(pass the measured wall time). Writes benchmarks/results/digits.json and prints one line per target.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

STUDENT_EXCLUDED = ("teacher", "dpo")


def digits_targets(metrics: dict, wall_seconds: Optional[float] = None) -> dict:
    """{target name: {"value", "limit", "ok"}} plus the NFE/model each value came from."""
    if "fd" not in metrics.get("floor", {}):
        raise ValueError("metrics.json has no image floor 'fd': not an image-data evaluation")
    teacher = metrics["models"]["teacher"]["nfe"]
    best_nfe = min(teacher, key=lambda n: teacher[n]["fd"])
    best = teacher[best_nfe]
    out: dict = {
        "teacher_fd_ratio": {"value": best["fd_ratio"], "limit": 2.0, "ok": best["fd_ratio"] <= 2.0,
                             "nfe": int(best_nfe)},
        "teacher_class_accuracy": {"value": best.get("class_accuracy"), "limit": 0.9,
                                   "ok": (best.get("class_accuracy") or 0.0) >= 0.9, "nfe": int(best_nfe)},
    }
    one_step = {name: m["nfe"]["1"]["fd"] for name, m in metrics["models"].items()
                if name not in STUDENT_EXCLUDED and "1" in m["nfe"]}
    if one_step:
        student = min(one_step, key=one_step.get)
        ratio = one_step[student] / best["fd"]
        out["best_one_step_student_vs_teacher"] = {"value": ratio, "limit": 1.5, "ok": ratio <= 1.5,
                                                   "model": student}
    if wall_seconds is not None:
        out["profile_wall_minutes"] = {"value": wall_seconds / 60, "limit": 45.0, "ok": wall_seconds <= 45 * 60}
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", default="data/evaluate/metrics.json")
    parser.add_argument("--wall-seconds", type=float, default=None, help="measured wall time of the whole profile")
    parser.add_argument("--out", default="benchmarks/results/digits.json")
    args = parser.parse_args(argv)
    metrics = json.loads(Path(args.metrics).read_text())
    targets = digits_targets(metrics, args.wall_seconds)
    for name, t in targets.items():
        where = f" (nfe {t['nfe']})" if "nfe" in t else f" ({t['model']})" if "model" in t else ""
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        print(f"{'OK  ' if t['ok'] else 'MISS'} {name}{where}: {value} (limit {t['limit']})")
    record = {"targets": targets, "floor_fd": metrics["floor"]["fd"], "load_average": os.getloadavg(),
              "n_samples": metrics.get("n_samples")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
