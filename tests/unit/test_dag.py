"""dvc.yaml builds a DAG (no overlapping outputs), and its stages are exactly the registered flows."""
import importlib

import yaml

from flows import STAGES, TOOLS
from components.tracking.stage import StageSpec
from tests.conftest import REPO


def test_dvc_builds_the_graph_and_stages_match_flows():
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        graph_stages = {stage.name for stage in repo.index.graph.nodes}
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert graph_stages == set(declared) == set(STAGES)
    for name, stage in declared.items():
        assert stage["cmd"] == f"python -m flows {name}"
        spec = getattr(importlib.import_module(STAGES[name]), "SPEC", None)
        if isinstance(spec, StageSpec):  # the metrics file the contract writes is declared (metrics, or an
            # uncached out beside a smaller headline metrics file, as evaluate's full table)
            declared = [next(iter(m)) if isinstance(m, dict) else m for m in stage.get("metrics", [])]
            declared += [next(iter(o)) for o in stage.get("outs", [])
                         if isinstance(o, dict) and next(iter(o.values())).get("cache") is False]
            assert spec.metrics_path in declared, (name, declared)


def test_every_runnable_stage_module_imports():
    for module in {**STAGES, **TOOLS}.values():
        assert callable(importlib.import_module(module).flow_fn)


def test_metrics_file_inside_the_output_is_refused():
    import pytest

    with pytest.raises(ValueError, match="lies inside its output"):
        StageSpec(name="couplings", output="data/couplings")
