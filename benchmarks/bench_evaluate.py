"""Wall time of the evaluate stage on the default data (checkerboard) with a trained teacher.

    python benchmarks/bench_evaluate.py [--teacher-steps N] [--teacher-dir DIR | --save-teacher DIR] [--repeats 2]

Builds a temp copy of the project, runs shard -> teacher -> featurizer through `python -m flows` (the teacher is
trained with the default params unless --teacher-steps or an existing --teacher-dir is given), then times
`python -m flows evaluate` with the default evaluate params (--repeats times: the quality numbers must be identical
between repeats). Reports the process wall time, the stage body time (stage_seconds), sampling sec/sample per NFE
and the quality numbers; writes benchmarks/results/evaluate.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from tests.project_copy import REPO, copy_project
RESULTS = REPO / "benchmarks" / "results"


def run_stage(project: Path, stage: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PIPELINE_PARENT_RUN_ID")}
    env["DVC_NO_ANALYTICS"] = "true"
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "flows", stage], cwd=project, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"stage {stage} failed:\n{r.stderr[-3000:]}")
    return elapsed


def quality(metrics: dict) -> dict:
    return {m: {which: {n: {k: v for k, v in e.items() if k != "sec_per_sample"} for n, e in entry[which].items()}
                for which in ("nfe", "best")}
            for m, entry in metrics["models"].items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher-steps", type=int, default=None, help="override teacher.steps (default: params.yaml)")
    ap.add_argument("--teacher-dir", type=Path, default=None, help="use this trained model dir instead of training")
    ap.add_argument("--save-teacher", type=Path, default=None, help="copy the trained teacher dir here (reuse it later)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    result: dict = {"threads": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "project"
        copy_project(project)
        if args.teacher_steps is not None:
            params = yaml.safe_load((project / "params.yaml").read_text())
            params["teacher"]["steps"] = args.teacher_steps
            (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        try:
            result["shard_seconds"] = run_stage(project, "shard")
            if args.teacher_dir:
                shutil.copytree(args.teacher_dir, project / "models" / "teacher")
                result["teacher"] = f"copied from {args.teacher_dir}"
            else:
                result["teacher_seconds"] = run_stage(project, "teacher")
                result["teacher"] = f"trained here, steps={args.teacher_steps or 'params.yaml default'}"
            if args.save_teacher:
                shutil.copytree(project / "models" / "teacher", args.save_teacher, dirs_exist_ok=True)
            result["featurizer_seconds"] = run_stage(project, "featurizer")
            runs = []
            for _ in range(args.repeats):
                wall = run_stage(project, "evaluate")
                metrics = json.loads((project / "data" / "evaluate" / "metrics.json").read_text())
                headline = json.loads((project / "data" / "evaluate" / "headline.json").read_text())
                runs.append({"wall_seconds": round(wall, 2), "stage_seconds": metrics["stage_seconds"],
                             "metrics": metrics, "headline": headline})
                print(f"evaluate: {wall:.1f} s wall, {metrics['stage_seconds']:.1f} s stage body")
        finally:
            subprocess.run([sys.executable, "-m", "flows", "server", "stop"], cwd=project, capture_output=True)
    first = runs[0]["metrics"]
    result.update({
        "evaluate_wall_seconds": [r["wall_seconds"] for r in runs],
        "evaluate_stage_seconds": [r["stage_seconds"] for r in runs],
        "identical_quality_across_repeats": all(quality(r["metrics"]) == quality(first) for r in runs),
        "n_samples": first["n_samples"],
        "floor": first["floor"],
        "straightness": first["straightness"],
        "teacher_by_nfe": {n: {k: e[k] for k in ("sampler", "sw2_ratio", "sw2_ratio_ci", "off_support",
                                                   "off_support_ci", "sec_per_sample")}
                           for n, e in first["models"]["teacher"]["best"].items()},
        "headline": runs[0]["headline"],
    })
    for nfe, entry in result["teacher_by_nfe"].items():
        lo, hi = entry["sw2_ratio_ci"]
        print(f"NFE {nfe:>3}: best {entry['sampler']}: sw2 {entry['sw2_ratio']:.2f}x floor [{lo:.2f}, {hi:.2f}], "
              f"off support {entry['off_support']:.3f}, {entry['sec_per_sample'] * 1e6:.1f} us/sample")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "evaluate.json").write_text(json.dumps(result, indent=1))
    print(f"identical quality across repeats: {result['identical_quality_across_repeats']}; "
          f"wrote {RESULTS / 'evaluate.json'}")


if __name__ == "__main__":
    main()
