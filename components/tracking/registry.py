"""MLflow model registry: log a stage's saved denoiser (PyTorch flavour) and register it as `<experiment>-<stage>`.

`latest`: MLflow reserves the alias name `latest` (`set_registered_model_alias(..., "latest", v)` raises
"'latest' alias name is reserved") and resolves `models:/<name>@latest` itself to the newest version. Every
successful model-producing stage registers a new version, so `@latest` is always the model of the most recent
successful run of that stage; `registered_model_alias(...)` reads it back. Imports MLflow lazily (~1.5 s).
"""
from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Optional

from components.errors import UserError

LATEST_ALIAS = "latest"
MODEL_SPEC_FILE = "model.json"


class TrackingServerUnreachable(UserError):
    """The MLflow tracking server named by the tracking URI does not answer."""


def registered_model_name(experiment: str, stage: str) -> str:
    """The registry name of a stage's model (DESIGN.md: `<experiment>-<stage>`)."""
    return f"{experiment}-{stage}"


def check_tracking_server(tracking_uri: str, timeout: float = 3.0) -> None:
    """Raise TrackingServerUnreachable (one line: the URL and how to start a server) if an http(s) URI is down.

    File/sqlite URIs need no server and always pass.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return
    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            if response.status == 200:
                return
    except (OSError, ValueError):
        pass
    raise TrackingServerUnreachable(
        f"MLflow server not reachable at {tracking_uri} (MLFLOW_TRACKING_URI or tracking.uri); start one with "
        "`make ui`, or unset it to use the local sqlite store")


def log_and_register_model(model_dir: Path, experiment: str, stage: str,
                           tags: Optional[dict[str, str]] = None) -> tuple[str, str]:
    """Log the denoiser in `model_dir` (model.pt + model.json) to the active run and register a new version.

    Uses the PyTorch flavour with `name=` (MLflow 3), pickle serialisation (no input example or tracing
    needed), explicit pip requirements (no slow inference of the environment) and the project's `components`
    package as code, so `mlflow.pytorch.load_model("models:/<name>@latest")` works outside the repo.
    Returns (registered name, version).
    """
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow import MlflowClient

    import components
    from components.models.store import load_denoiser

    model_dir = Path(model_dir)
    loaded = load_denoiser(model_dir)
    name = registered_model_name(experiment, stage)
    info = mlflow.pytorch.log_model(
        loaded.denoiser, name=stage, serialization_format="pickle",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
        code_paths=[str(Path(components.__file__).parent)],
        extra_files=[str(model_dir / MODEL_SPEC_FILE)],
        registered_model_name=name)
    version = str(info.registered_model_version)
    client = MlflowClient()
    for key, value in (tags or {}).items():
        client.set_model_version_tag(name, version, key, str(value))
    return name, version


def registered_model_alias(experiment: str, stage: str, alias: str = LATEST_ALIAS):
    """The model version behind `<experiment>-<stage>@alias` (MLflow ModelVersion), or None if unregistered."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient().get_model_version_by_alias(registered_model_name(experiment, stage), alias)
    except MlflowException:
        return None
