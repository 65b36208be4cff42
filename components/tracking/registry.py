"""MLflow model registry: log a stage's saved denoiser (PyTorch flavour) and register it as `<experiment>-<stage>`.

`latest`: MLflow reserves the alias name `latest` (`set_registered_model_alias(..., "latest", v)` raises
"'latest' alias name is reserved") and resolves `models:/<name>@latest` itself to the newest version. A
model-producing stage registers a new version unless its model is byte-identical to a registered one, so
`@latest` is the newest distinct model. `champion` is set by hand (`promote`), never by a stage run.
Imports MLflow lazily (~1.5 s).
"""
from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Optional

from components.errors import UserError
from components.io import tree_digest

LATEST_ALIAS = "latest"
CHAMPION_ALIAS = "champion"
MODEL_SPEC_FILE = "model.json"
MODEL_DIGEST_TAG = "model.digest"


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


def model_digest(model_dir: Path) -> str:
    """Digest of what the model *is*: every weights file and model.json under `model_dir` (students included),
    not its plots or manifest. Equal digests mean byte-identical weights and config."""
    from components.models.store import WEIGHTS_FILE  # lazily: the store imports torch

    model_dir = Path(model_dir)
    others = tuple(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")
                   if p.is_file() and p.name not in (MODEL_SPEC_FILE, WEIGHTS_FILE))
    return tree_digest(model_dir, exclude=others)


def version_with_digest(client, name: str, digest: str):
    """The registered version of `name` whose `model.digest` tag is `digest`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    return next((v for v in versions if v.tags.get(MODEL_DIGEST_TAG) == digest), None)


def describe_model(stage: str, spec: dict, run_id: str) -> str:
    """One line for the registry: what the model is, how it samples by default, which run made it."""
    sampler = spec.get("sampler") or {}
    students = sorted(int(k) for k in spec.get("students") or {})
    how = (f"students for {', '.join(map(str, students))} steps (sample(nfe=k) uses the one with most steps <= k)"
           if students else f"default sampler {sampler.get('method')} with {sampler.get('steps')} steps")
    return (f"{stage}: {spec.get('network', {}).get('kind', '?')} denoiser on {spec.get('schedule', {}).get('name', '?')} "
            f"schedule, {how}; from MLflow run {run_id}; "
            f"mlflow.pytorch.load_model(uri).sample(noise, nfe=k)")


def log_and_register_model(model_dir: Path, experiment: str, stage: str, run_id: str,
                           tags: Optional[dict[str, str]] = None,
                           metrics: Optional[dict[str, float]] = None) -> tuple[str, str, bool]:
    """Register the model in `model_dir` as a version of `<experiment>-<stage>`, unless one is byte-identical.

    The logged object is a `SamplingModel` (PyTorch flavour, pickle serialisation, the project's `components`
    package as code), so `mlflow.pytorch.load_model("models:/<name>@latest").sample(noise, nfe=k)` works in any
    directory; progressive's students travel inside it. A model whose weights and model.json match an existing
    version (`model.digest` tag) registers nothing and uploads nothing: that version is returned. New versions
    get `tags`, the stage's numeric `metrics` as `metric.<name>` tags and a one-line description.
    Returns (registered name, version, reused).
    """
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow import MlflowClient

    import components
    from components.models.sampling_model import SamplingModel

    model_dir = Path(model_dir)
    name = registered_model_name(experiment, stage)
    client = MlflowClient()
    digest = model_digest(model_dir)
    existing = version_with_digest(client, name, digest)
    if existing is not None:
        return name, str(existing.version), True
    model = SamplingModel.from_directory(model_dir)
    info = mlflow.pytorch.log_model(
        model, name=stage, serialization_format="pickle",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
        code_paths=[str(Path(components.__file__).parent)],
        extra_files=[str(model_dir / MODEL_SPEC_FILE)],
        registered_model_name=name)
    version = str(info.registered_model_version)
    for key, value in {**(tags or {}), MODEL_DIGEST_TAG: digest,
                       **{f"metric.{k}": v for k, v in (metrics or {}).items()}}.items():
        client.set_model_version_tag(name, version, key, str(value))
    client.update_model_version(name, version, description=describe_model(stage, model.spec, run_id))
    return name, version, False


def tag_evaluated_versions(experiment: str, metric: str, headline: dict[str, dict],
                           model_dirs: dict[str, Path]) -> dict[str, str]:
    """Put each model's headline evaluation (`eval.<metric>.<nfe1|...|best>`, intervals as `lo..hi`) on the
    registered version that holds exactly the evaluated weights (same `model.digest`). Returns {model: version}."""
    from mlflow import MlflowClient

    client, tagged = MlflowClient(), {}
    for model, row in headline.items():
        if model not in model_dirs:
            continue
        name = registered_model_name(experiment, model)
        version = version_with_digest(client, name, model_digest(model_dirs[model]))
        if version is None:
            continue
        for key, value in row.items():
            text = f"{value[0]}..{value[1]}" if isinstance(value, (list, tuple)) else str(value)
            client.set_model_version_tag(name, str(version.version), f"eval.{metric}.{key}", text)
        tagged[model] = str(version.version)
    return tagged


def promote(experiment: str, stage: str, version: Optional[str] = None, alias: str = CHAMPION_ALIAS) -> str:
    """Point `alias` (default `champion`) of `<experiment>-<stage>` at `version` (default: the newest). Returns it."""
    from mlflow import MlflowClient

    client = MlflowClient()
    name = registered_model_name(experiment, stage)
    if version is None:
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise UserError(f"no registered model '{name}': run the {stage} stage first")
        version = str(max(int(v.version) for v in versions))
    client.set_registered_model_alias(name, alias, version)
    return version


def registered_model_alias(experiment: str, stage: str, alias: str = LATEST_ALIAS):
    """The model version behind `<experiment>-<stage>@alias` (MLflow ModelVersion), or None if unregistered."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient().get_model_version_by_alias(registered_model_name(experiment, stage), alias)
    except MlflowException:
        return None
