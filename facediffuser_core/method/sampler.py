"""Headless reference sampler: DDIM (eta 0) over the Face-diffuser stage logic.

Noise schedule and timesteps are those of diffusers' ``DDIMScheduler`` built from SD1.5's
scheduler config: 1000 training steps, scaled-linear betas 0.00085..0.012, "leading"
timestep spacing with ``steps_offset=1`` and ``set_alpha_to_one=False``.
Latents are in model space (VAE latents already multiplied by 0.18215).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..errors import SamplingCancelled
from .guidance import Conditionings, EpsModel, predict_noise
from .schedule import OFFICIAL_GUIDANCE, OFFICIAL_STEPS, StageBounds, bounds_from_fractions, stage_at

__all__ = [
    "TRAIN_STEPS",
    "sd15_alphas_cumprod",
    "ddim_timesteps",
    "ddim_step",
    "initial_noise",
    "SampleResult",
    "sample",
]

TRAIN_STEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
STEPS_OFFSET = 1

ProgressCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
"""``callback(step, total_steps, latents_after_step, predicted_x0)``."""


def sd15_alphas_cumprod() -> torch.Tensor:
    """Cumulative alpha products of SD1.5's scaled-linear schedule, float64 [1000]."""
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, TRAIN_STEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_timesteps(steps: int) -> torch.Tensor:
    """Descending discrete timesteps with "leading" spacing: 981, 961, ..., 1 for 50 steps."""
    if not 1 <= steps <= TRAIN_STEPS:
        raise ValueError(f"steps must be in 1..{TRAIN_STEPS}, got {steps}")
    ratio = TRAIN_STEPS // steps
    return torch.arange(steps - 1, -1, -1, dtype=torch.long) * ratio + STEPS_OFFSET


def ddim_step(
    x: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int, alphas_cumprod: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One deterministic DDIM update x_t -> x_{t_prev}; returns ``(x_prev, predicted_x0)``.

    ``t_prev < 0`` uses ``alphas_cumprod[0]`` (``set_alpha_to_one=False``).
    """
    alpha = float(alphas_cumprod[t])
    alpha_prev = float(alphas_cumprod[t_prev if t_prev >= 0 else 0])
    x0 = (x - (1.0 - alpha) ** 0.5 * eps) / alpha**0.5
    return alpha_prev**0.5 * x0 + (1.0 - alpha_prev) ** 0.5 * eps, x0


def initial_noise(shape: Sequence[int], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Seeded standard-normal x_T on the CPU (the same numbers ComfyUI draws for that seed)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, dtype=dtype, device="cpu")


@dataclass(frozen=True)
class SampleResult:
    """Final latents [B,C,H,W]; with ``return_masks``, one entry per step: the bool
    [B,1,H,W] subject mask of a fusion step, ``None`` for scene and subject steps."""

    latents: torch.Tensor
    subject_masks: Optional[list[Optional[torch.Tensor]]] = None


@torch.no_grad()
def sample(
    scene_model: EpsModel,
    subject_model: EpsModel,
    conds: Conditionings,
    noise: torch.Tensor,
    steps: int = OFFICIAL_STEPS,
    guidance_scale: float = OFFICIAL_GUIDANCE,
    bounds: Optional[StageBounds] = None,
    callback: Optional[ProgressCallback] = None,
    should_cancel: Optional[Callable[[], bool]] = None,
    return_masks: bool = False,
) -> SampleResult:
    """Sample from ``noise`` (x_T, [B,C,H,W]) with DDIM and the Face-diffuser stages.

    ``bounds`` defaults to 0.30 / 0.60 of ``steps`` (15 / 30 at 50 steps). ``should_cancel``
    is polled before every step; when it returns True, :class:`SamplingCancelled` is raised.
    """
    bounds = bounds if bounds is not None else bounds_from_fractions(steps)
    alphas_cumprod = sd15_alphas_cumprod()
    timesteps = ddim_timesteps(steps)
    ratio = TRAIN_STEPS // steps
    x = noise
    masks: Optional[list[Optional[torch.Tensor]]] = [] if return_masks else None
    for i, t in enumerate(timesteps.tolist()):
        if should_cancel is not None and should_cancel():
            raise SamplingCancelled(f"sampling cancelled before step {i + 1} of {steps}")
        guided = predict_noise(
            stage_at(i, bounds),
            x,
            torch.full((x.shape[0],), t, dtype=torch.long, device=x.device),
            scene_model,
            subject_model,
            conds,
            guidance_scale,
        )
        x, x0 = ddim_step(x, guided.eps, t, t - ratio, alphas_cumprod)
        if masks is not None:
            masks.append(guided.subject_mask)
        if callback is not None:
            callback(i, steps, x, x0)
    return SampleResult(x, masks)
