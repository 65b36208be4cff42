"""Diffusion numerics: schedules, the preconditioned denoiser, conversions, grids, samplers, guidance, oracles."""

from components.diffusion.conversions import TARGETS, convert, from_x0_eps, x0_eps_from
from components.diffusion.denoiser import PREDICTIONS, Denoiser, precondition
from components.diffusion.grids import GRID_KINDS, make_grid
from components.diffusion.guidance import GuidedDenoiser, guided
from components.diffusion.oracles import GaussianData, GaussianMixture, PointMasses
from components.diffusion.samplers import SAMPLERS, SampleResult, ddim_noise_scale, ddim_step, nfe_of, sample, steps_for_nfe
from components.diffusion.schedules import SCHEDULES, Schedule, make_schedule

__all__ = [
    "GRID_KINDS",
    "PREDICTIONS",
    "SAMPLERS",
    "SCHEDULES",
    "TARGETS",
    "Denoiser",
    "GaussianData",
    "GaussianMixture",
    "GuidedDenoiser",
    "PointMasses",
    "SampleResult",
    "Schedule",
    "convert",
    "ddim_noise_scale",
    "ddim_step",
    "from_x0_eps",
    "guided",
    "make_grid",
    "make_schedule",
    "nfe_of",
    "precondition",
    "sample",
    "steps_for_nfe",
    "x0_eps_from",
]
