"""Save and load trained denoisers: `model.pt` (weights) + `model.json` (everything needed to rebuild and
sample them). Every stage that produces a model writes this pair; every stage that consumes one loads it here.

model.json:
    network      {"kind": "mlp" | "unet", "kwargs": {...}}         -> components.models.build_model
    schedule     {"name": "edm" | "vp_cosine" | "vp_linear" | "flow", "kwargs": {...}}
    prediction   "edm" | "eps" | "x0" | "v"                         -> components.diffusion.Denoiser
    sigma_data   float (from the shard manifest)
    data_shape   [2] or [C, H, W];  num_classes: int or null;  kind: "points" | "image"
    sampler      default sampling: {"method", "grid", "steps", "guidance"}
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from components.diffusion.denoiser import Denoiser
from components.diffusion.guidance import guided_if_needed
from components.diffusion.samplers import SampleResult, sample, steps_for_nfe
from components.diffusion.schedules import Schedule, make_schedule
from components.errors import DataError
from components.models import build_model

WEIGHTS_FILE = "model.pt"
SPEC_FILE = "model.json"


def build_denoiser(spec: dict[str, Any]) -> Denoiser:
    """A fresh (untrained) denoiser from a model.json spec."""
    net = build_model(spec["network"]["kind"], **spec["network"]["kwargs"])
    schedule = make_schedule(spec["schedule"]["name"], **spec["schedule"].get("kwargs", {}))
    denoiser = Denoiser(net, schedule, sigma_data=float(spec["sigma_data"]), prediction=spec["prediction"])
    if spec.get("consistency"):  # a consistency model: f(x, sigma) in EDM coordinates around the denoiser
        from components.diffusion.consistency import ConsistencyFunction

        c = spec["consistency"]
        return ConsistencyFunction(denoiser, sigma_min=float(c["sigma_min"]), sigma_max=float(c["sigma_max"]))
    return denoiser


def save_spec(directory: Path | str, spec: dict[str, Any]) -> None:
    """Write model.json (next to weights already exported into `directory`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")


def save_denoiser(directory: Path | str, state_dict: dict[str, torch.Tensor], spec: dict[str, Any]) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, directory / WEIGHTS_FILE)
    save_spec(directory, spec)


@dataclass
class LoadedModel:
    denoiser: Denoiser
    spec: dict[str, Any]
    directory: Path

    @property
    def schedule(self) -> Schedule:
        return self.denoiser.schedule

    @property
    def num_classes(self) -> Optional[int]:
        return self.spec.get("num_classes")

    def sample(self, noise: torch.Tensor, *, nfe: Optional[int] = None, steps: Optional[int] = None,
               method: Optional[str] = None, grid: Optional[str] = None, cond: Optional[torch.Tensor] = None,
               guidance: Optional[float] = None, return_trajectory: bool = False,
               generator: Optional[torch.Generator] = None) -> SampleResult:
        """Sample with the model's default sampler, overridable; `nfe` picks the most steps that fit.

        With a conditional model and guidance != 1 the guided denoiser is used (2 NFE per call, counted).
        """
        if self.spec.get("students") and nfe is not None and steps is None:
            # Progressive distillation keeps one student per step count: use the one trained for the largest
            # count that fits the budget (its NFE is what SampleResult.nfe reports).
            student = self.student_for(nfe)
            return student.sample(noise, steps=student.spec["sampler"]["steps"], method=method, grid=grid, cond=cond,
                                  guidance=guidance, return_trajectory=return_trajectory, generator=generator)
        defaults = self.spec["sampler"]
        method = method or defaults["method"]
        w = defaults.get("guidance", 1.0) if guidance is None else guidance
        denoiser = guided_if_needed(self.denoiser, w, cond, self.num_classes)
        if steps is None:
            per_call = int(getattr(denoiser, "nfe_per_call", 1))
            steps = steps_for_nfe(method, max(1, nfe // per_call)) if nfe is not None else defaults["steps"]
        with torch.no_grad():
            return sample(denoiser, self.schedule, grid or defaults.get("grid", "edm"), noise, method=method,
                          steps=steps, cond=cond, return_trajectory=return_trajectory, generator=generator)

    @staticmethod
    def student_steps(spec: dict[str, Any], nfe: int) -> int:
        """Of the kept students (spec["students"]: {"<steps>": "<subdir>"}), the most steps <= nfe (else the fewest)."""
        counts = sorted(int(k) for k in spec["students"])
        return max([c for c in counts if c <= nfe], default=counts[0])

    def student_for(self, nfe: int) -> "LoadedModel":
        return load_denoiser(self.directory / self.spec["students"][str(self.student_steps(self.spec, nfe))])


def load_denoiser(directory: Path | str) -> LoadedModel:
    """Rebuild a saved denoiser (eval mode). Missing or mismatched files raise DataError naming them."""
    directory = Path(directory)
    missing = [f for f in (WEIGHTS_FILE, SPEC_FILE) if not (directory / f).exists()]
    if missing:
        raise DataError(f"{directory} is not a saved model: missing {', '.join(missing)}")
    try:
        spec = json.loads((directory / SPEC_FILE).read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{directory / SPEC_FILE} is not a valid model config: {e.__class__.__name__}: {e}") from None
    return model_from_weights(spec, directory / WEIGHTS_FILE, directory)


def load_weights(path: Path | str) -> dict[str, torch.Tensor]:
    """A saved state dict (CPU); an unreadable file raises DataError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated/foreign files
        raise DataError(f"cannot read weights {path}: {e.__class__.__name__}") from None


def model_from_weights(spec: dict[str, Any], weights: Path | str, directory: Optional[Path | str] = None) -> LoadedModel:
    """The model of `spec` with the weights file `weights` (eval mode): the one way a saved model is rebuilt.
    `directory` (default: the weights' folder) is where students and side files of the model are looked up."""
    weights = Path(weights)
    try:
        denoiser = build_denoiser(spec)
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{weights.parent / SPEC_FILE} is not a valid model config: {e.__class__.__name__}: {e}") from None
    state = load_weights(weights)
    check_state_dict(denoiser, state, weights)
    denoiser.load_state_dict(state)
    denoiser.eval()
    return LoadedModel(denoiser, spec, Path(directory) if directory is not None else weights.parent)


def check_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], where: Path | str) -> None:
    """Compare keys and shapes first so a wrong file gives one clear line, not a shape traceback."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"shape mismatch {shapes[0]}")
        raise DataError(f"weights {where} do not fit the network in its model.json: {'; '.join(parts)}")
