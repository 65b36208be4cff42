"""Every stage's declared `deps` in dvc.yaml cover the repo code it runs, so `dvc repro` never skips a changed stage.

The code a stage runs is found statically: `python -m flows <stage>` executes the package `flows/__init__.py`,
`flows/__main__.py` (all but the imports inside `main`, which serve the other commands), then the stage module;
from there every
`import` (module level or inside functions, absolute or relative, with each package's `__init__.py`) and every
string literal naming a repo module (`launch_ranks(["-m", "components.training.worker"])`) is followed, transitively.
Other commands of `flows/__main__.py` (pipeline, serve, lineage, ...) do not run for a stage and are not followed.
Over-approximating (a function-level import that a given params set never reaches) only costs a rerun; missing a
file means a stale model, so the walk errs on the side of following.
"""
from __future__ import annotations

import ast
import copy
from pathlib import Path
from typing import Iterable

import yaml

from flows import STAGES
from tests.conftest import REPO

ENTRY = ("flows/__init__.py", "flows/__main__.py")
NOT_ON_STAGE_PATH = {"flows/__main__.py": {"main"}}  # the dispatcher's other commands (pipeline, serve, ...)
DISPATCH_TABLE = "flows/__init__.py"  # its string literals name every stage module: the one for this stage is added


def module_files(name: str, root: Path) -> list[Path]:
    """The repo files executed by importing `name`: each package's __init__.py on the way, then the module."""
    files, parts = [], name.split(".")
    for i in range(1, len(parts) + 1):
        base = root.joinpath(*parts[:i])
        if (base / "__init__.py").is_file():
            files.append(base / "__init__.py")
        elif base.with_suffix(".py").is_file():
            files.append(base.with_suffix(".py"))
        else:
            return files if i > 1 else []  # a name inside a module (from a.b import name) or not repo code
    return files


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _nodes_to_scan(tree: ast.Module, skipped_functions: set[str]) -> Iterable[ast.AST]:
    for node in tree.body:
        if not (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in skipped_functions):
            yield from ast.walk(node)


def imported_names(path: Path, root: Path, skipped_functions: set[str] = frozenset(),
                   follow_strings: bool = True) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path, root) if path.name == "__init__.py" else module_name(path, root).rpartition(".")[0]
    names: set[str] = set()
    for node in _nodes_to_scan(tree, skipped_functions):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.add(prefix)
            names.update(f"{prefix}.{alias.name}" for alias in node.names)
        elif follow_strings and isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value.startswith(("flows.", "components.")) and node.value.replace(".", "").replace("_", "").isalnum():
                names.add(node.value)
    return names


def stage_code(stage_module: str, root: Path = REPO) -> set[str]:
    """Repo-relative paths of every repo file that `python -m flows <stage>` may execute."""
    seen: set[Path] = set()
    pending = [root / rel for rel in ENTRY] + module_files(stage_module, root)
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        rel = path.relative_to(root).as_posix()
        names = imported_names(path, root, NOT_ON_STAGE_PATH.get(rel, set()), follow_strings=rel != DISPATCH_TABLE)
        for name in names:
            pending += [f for f in module_files(name, root) if f not in seen]
    return {p.relative_to(root).as_posix() for p in seen}


def dep_paths(stage: dict) -> list[str]:
    return [(d if isinstance(d, str) else next(iter(d))).rstrip("/") for d in stage.get("deps") or []]


def uncovered_code(dvc_yaml: dict, root: Path = REPO) -> dict[str, list[str]]:
    """{stage: [code files it runs that no declared dep (file or directory) covers]} for every stage."""
    missing = {}
    for name, stage in (dvc_yaml.get("stages") or {}).items():
        deps = dep_paths(stage)
        files = stage_code(STAGES[name], root)
        uncovered = sorted(f for f in files if not any(f == d or f.startswith(d + "/") for d in deps))
        if uncovered:
            missing[name] = uncovered
    return missing


def read_dvc_yaml() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def test_every_stage_declares_the_code_it_runs():
    missing = uncovered_code(read_dvc_yaml())
    assert not missing, "add these to the stages' deps in dvc.yaml:\n" + "\n".join(
        f"  {stage}: {', '.join(files)}" for stage, files in missing.items())


def test_a_removed_dep_is_caught():
    dvc_yaml = read_dvc_yaml()
    assert "components/data/loader.py" in stage_code(STAGES["teacher"])  # the teacher reads shards through it
    broken = copy.deepcopy(dvc_yaml)
    teacher = broken["stages"]["teacher"]
    teacher["deps"] = [d for d in teacher["deps"] if not (d == "components/data" or str(d).startswith("components/data/"))]
    assert "components/data/loader.py" in uncovered_code(broken).get("teacher", [])


def test_the_walk_follows_relative_imports_strings_and_package_inits():
    teacher = stage_code(STAGES["teacher"])
    assert "components/training/ema.py" in teacher  # `from .ema import EMA` in components/training/__init__.py
    assert "components/__init__.py" in teacher and "flows/__init__.py" in teacher
    assert "flows/__main__.py" in teacher and "flows/runtime.py" in teacher
    assert "flows/pipeline.py" not in stage_code(STAGES["shard"])  # other CLI commands are not on the stage path


def test_stage_params_sections_are_declared():
    """Each stage records the params sections it reads; DVC must track the same sections."""
    import importlib

    from components.tracking.stage import StageSpec

    for name, stage in read_dvc_yaml()["stages"].items():
        spec = getattr(importlib.import_module(STAGES[name]), "SPEC", None)
        if isinstance(spec, StageSpec):
            declared = {p if isinstance(p, str) else next(iter(p)) for p in stage.get("params") or []}
            assert set(spec.sections) <= declared, (name, spec.sections, declared)


def test_stage_inputs_and_their_producers_come_from_dvc_yaml():
    import importlib

    from components.tracking.stage import output_producers, stage_inputs

    producers = output_producers(REPO)
    assert producers["data/shards"] == "shard" and producers["models/teacher"] == "teacher"
    assert stage_inputs(REPO, importlib.import_module(STAGES["teacher"]).SPEC) == ("data/shards",)
    assert stage_inputs(REPO, importlib.import_module(STAGES["reflow"]).SPEC) == ("data/couplings/shards", "models/teacher")


def test_git_ignores_cached_outputs_and_tracks_metrics():
    """Cached outputs are DVC's (git must not pick them up); metrics files are git's (they travel with commits)."""
    import subprocess

    outs, metrics = [], []
    for stage in read_dvc_yaml()["stages"].values():
        for entry in stage.get("outs") or []:
            cached = isinstance(entry, str) or (next(iter(entry.values())) or {}).get("cache", True)
            (outs if cached else metrics).append(dep_paths({"deps": [entry]})[0])
        metrics += dep_paths({"deps": stage.get("metrics") or []})

    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO).returncode == 0

    assert [p for p in outs if not ignored(p)] == []
    assert [p for p in metrics if ignored(p)] == []


def test_a_run_id_in_an_output_manifest_is_refused():
    import pytest

    from components.tracking.stage import check_no_run_ids

    check_no_run_ids("reflow", {"rounds": [{"round": 1, "loss": 0.1}]}, ["a" * 32])
    with pytest.raises(RuntimeError, match="ctx.record"):
        check_no_run_ids("reflow", {"rounds": [{"round": 1, "mlflow_run_id": "a" * 32}]}, ["b" * 32, "a" * 32])
