"""Network wrapper that turns any prediction network into a denoiser D(x_t, t, cond) -> x0_hat.

The input is scaled with EDM preconditioning generalised to any (alpha, sigma)
(Karras et al. 2022, App. B.6; the monograph's (D.6.4)): with R = alpha^2 sd^2 + sigma^2,
  c_in = 1/sqrt(R),  c_skip = alpha sd^2 / R,  c_out = sigma sd / sqrt(R),
so the network always sees unit-variance input and, for prediction "edm", a unit-variance target.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from components.diffusion.conversions import from_x0_eps, x0_eps_from
from components.diffusion.schedules import LOG_SNR_CLAMP, Schedule, TimeLike, append_dims, as_time

PREDICTIONS = ("edm", "eps", "x0", "v")
FORWARD_TARGETS = ("x0", "eps", "v", "raw")


def precondition(schedule: Schedule, t: TimeLike, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Return (c_skip, c_out, c_in, c_noise), each shaped like `t`.

    c_noise = -clamp(log_snr(t), -20, 20) / 4, a 1-1 map of t on the usable range; for EDM it is
    EDM's ln(sigma)/4.
    """
    if sigma_data <= 0:
        raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
    t = as_time(t)
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    variance = alpha**2 * sigma_data**2 + sigma**2
    c_in = torch.rsqrt(variance)
    c_skip = alpha * sigma_data**2 / variance
    c_out = sigma * sigma_data * c_in
    c_noise = -schedule.log_snr(t).clamp(-LOG_SNR_CLAMP, LOG_SNR_CLAMP) / 4.0
    return c_skip, c_out, c_in, c_noise


class Denoiser(nn.Module):
    """Wrap `net(x, c_noise, cond)` into D(x_t, t, cond) with generalised EDM preconditioning.

    Args:
        net: the network; called as net(c_in * x_t, c_noise, cond).
        schedule: the noise schedule the network is trained (and sampled) with.
        sigma_data: standard deviation of the data (from the shard manifest).
        prediction: what the raw network output means: "edm" (EDM's F: x0 = c_skip x + c_out F),
            "eps" (noise), "x0" (clean data) or "v" (velocity alpha' x0 + sigma' eps).
    """

    def __init__(self, net: nn.Module, schedule: Schedule, sigma_data: float = 0.5, prediction: str = "edm") -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {list(PREDICTIONS)}")
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.net = net
        self.schedule = schedule
        self.sigma_data = float(sigma_data)
        self.prediction = prediction

    def _batch_times(self, x: Tensor, t: TimeLike) -> Tensor:
        t = as_time(t).to(x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be a scalar or shaped [{x.shape[0]}], got shape {tuple(t.shape)}")
        return t

    def forward(self, x: Tensor, t: TimeLike, cond: Tensor | None = None, target: str = "x0") -> Tensor:
        """Evaluate the wrapped network at (x_t, t) and return `target`: "x0", "eps", "v" or "raw".

        "raw" is the network output itself. A target equal to the prediction type is returned
        unconverted (e.g. prediction "eps" with target "eps" is the raw output, no divide by sigma).
        """
        if target not in FORWARD_TARGETS:
            raise ValueError(f"unknown target {target!r}; choose one of {list(FORWARD_TARGETS)}")
        t = self._batch_times(x, t)
        c_skip, c_out, c_in, c_noise = precondition(self.schedule, t, self.sigma_data)
        raw = self.net(append_dims(c_in, x) * x, c_noise.to(x.dtype), cond)
        if target == "raw" or target == self.prediction:
            return raw
        if self.prediction == "edm":
            x0 = append_dims(c_skip, x) * x + append_dims(c_out, x) * raw
            if target == "x0":
                return x0
            x0, eps = x0_eps_from("x0", x0, x, t, self.schedule)
        else:
            x0, eps = x0_eps_from(self.prediction, raw, x, t, self.schedule)
        return from_x0_eps(target, x0, eps, t, self.schedule)

