"""StageRun.child_run: a real nested MLflow run (sqlite store) per round, FAILED when its block fails."""
import mlflow
import pytest

from components.tracking.lineage import StageRun


def test_child_runs_nest_under_the_stage_run_and_record_failure(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with StageRun("progressive", "exp", uri, {"progressive": {"steps": 3}}, [], tmp_path) as stage:
        with stage.child_run("round_2_to_1", params={"round": {"student_steps": 1}}, tags={"k": 5}) as child:
            child.log_metrics({"loss": 0.5, "nested": {"x": 2.0}, "skipped": "text"}, step=3)
        with pytest.raises(RuntimeError):
            with stage.child_run("round_failing") as failing:
                raise RuntimeError("boom")
        stage.log_metrics({"after": 1.0})  # the stage run is active again after the children
    client = mlflow.MlflowClient(tracking_uri=uri)
    ok, bad, parent = client.get_run(child.run_id), client.get_run(failing.run_id), client.get_run(stage.run_id)
    assert ok.data.tags["mlflow.parentRunId"] == stage.run_id == bad.data.tags["mlflow.parentRunId"]
    assert ok.data.tags["stage"] == "progressive" and ok.data.tags["k"] == "5"
    assert ok.data.params["round.student_steps"] == "1"
    assert ok.data.metrics == {"loss": 0.5, "nested.x": 2.0}
    assert client.get_metric_history(child.run_id, "loss")[0].step == 3
    assert (ok.info.status, bad.info.status, parent.info.status) == ("FINISHED", "FAILED", "FINISHED")
    assert parent.data.metrics["after"] == 1.0 and "loss" not in parent.data.metrics
