"""A saved model as one PyTorch module that samples: what the MLflow model registry stores.

`mlflow.pytorch.load_model("models:/<experiment>-<stage>@latest")` returns a `SamplingModel`; its
`.sample(noise, nfe=k)` is `LoadedModel.sample` (the one sampling entry point) with the model's default sampler,
and a progressive-distillation model carries every kept student in memory, so `nfe=k` picks the student trained
for the most steps <= k exactly as `load_denoiser("models/progressive").sample(...)` does from the directory.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from components.diffusion.samplers import SampleResult
from components.models.store import LoadedModel, load_denoiser


class SamplingModel(torch.nn.Module):
    def __init__(self, loaded: LoadedModel):
        super().__init__()
        self.denoiser = loaded.denoiser
        self.spec: dict[str, Any] = dict(loaded.spec)
        subdirs = self.spec.get("students") or {}
        self.students = torch.nn.ModuleDict(
            {steps: SamplingModel(load_denoiser(loaded.directory / sub)) for steps, sub in subdirs.items()})

    @classmethod
    def from_directory(cls, directory) -> "SamplingModel":
        return cls(load_denoiser(directory))

    @property
    def num_classes(self) -> Optional[int]:
        return self.spec.get("num_classes")

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The denoiser: x0_hat = D(x_t, t, cond)."""
        return self.denoiser(x, t, cond)

    def sample(self, noise: torch.Tensor, *, nfe: Optional[int] = None, **kwargs) -> SampleResult:
        """Sample from `noise` (keyword options as `LoadedModel.sample`: nfe, steps, method, grid, cond, ...)."""
        if len(self.students) and nfe is not None and kwargs.get("steps") is None:
            student = self.students[str(LoadedModel.student_steps(self.spec, nfe))]
            return student.sample(noise, steps=student.spec["sampler"]["steps"], **kwargs)
        return LoadedModel(self.denoiser, self.spec, None).sample(noise, nfe=nfe, **kwargs)
