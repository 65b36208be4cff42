"""Log metrics into an existing MLflow run by id: used by training ranks launched as separate processes,
which cannot share the stage process's active run."""
from __future__ import annotations

from typing import Callable


def run_metrics_logger(tracking_uri: str, run_id: str) -> Callable[[dict, int], None]:
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    import time

    client = MlflowClient(tracking_uri=tracking_uri)

    def log(metrics: dict, step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        if batch:
            client.log_batch(run_id, metrics=batch)

    return log
