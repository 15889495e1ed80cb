"""The three sampling stages and how to find them from a step index or a sigma.

With 0-based step index ``i``: ``scene`` while ``i <= start_merge_step`` (TDM alone),
``fusion`` while ``i <= final_step`` (both models, SNF), ``subject`` afterwards (SDM alone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Sequence

import torch

from ..errors import StageError

__all__ = [
    "Stage",
    "StageBounds",
    "stage_at",
    "bounds_from_fractions",
    "validate_fractions",
    "step_index",
    "OFFICIAL_STEPS",
    "OFFICIAL_GUIDANCE",
    "OFFICIAL_START_MERGE_STEP",
    "OFFICIAL_FINAL_STEP",
    "START_MERGE_FRACTION",
    "FINAL_FRACTION",
    "FASTCOMPOSER_START_MERGE_STEP",
    "FASTCOMPOSER_START_FRACTION",
]

OFFICIAL_STEPS = 50
OFFICIAL_GUIDANCE = 5.0
OFFICIAL_START_MERGE_STEP = 15
OFFICIAL_FINAL_STEP = 30
START_MERGE_FRACTION = OFFICIAL_START_MERGE_STEP / OFFICIAL_STEPS  # 0.30
FINAL_FRACTION = OFFICIAL_FINAL_STEP / OFFICIAL_STEPS  # 0.60
# FastComposer (one model, delayed subject conditioning): the text prompt while i <= 10 of 50 steps
FASTCOMPOSER_START_MERGE_STEP = 10
FASTCOMPOSER_START_FRACTION = FASTCOMPOSER_START_MERGE_STEP / OFFICIAL_STEPS  # 0.20


class Stage(str, Enum):
    SCENE = "scene"  # TDM, empty prompt vs text prompt
    FUSION = "fusion"  # both models, Saliency-adaptive Noise Fusion
    SUBJECT = "subject"  # SDM, text prompt vs subject-augmented prompt

    @property
    def uses_scene_model(self) -> bool:
        return self is not Stage.SUBJECT

    @property
    def uses_subject_model(self) -> bool:
        return self is not Stage.SCENE


@dataclass(frozen=True)
class StageBounds:
    """Last step index of the scene stage and of the fusion stage (both inclusive).

    ``start_merge_step = -1`` means no scene stage; ``final_step == start_merge_step`` means
    no fusion stage; a ``final_step`` at or past the last step means no subject stage.
    """

    start_merge_step: int = OFFICIAL_START_MERGE_STEP
    final_step: int = OFFICIAL_FINAL_STEP

    def __post_init__(self) -> None:
        for name in ("start_merge_step", "final_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise StageError(f"{name} must be an integer step index, got {value!r}")
        if self.start_merge_step < -1:
            raise StageError(
                f"start_merge_step must be >= 0 (or -1 for no scene stage), got {self.start_merge_step}"
            )
        if self.final_step < self.start_merge_step:
            raise StageError(
                f"final_step ({self.final_step}) must be >= start_merge_step ({self.start_merge_step}); "
                "use final_step == start_merge_step for no fusion stage"
            )


def stage_at(step: int, bounds: StageBounds) -> Stage:
    """Stage of 0-based step index ``step``."""
    if step < 0:
        raise ValueError(f"step index must be >= 0, got {step}")
    if step <= bounds.start_merge_step:
        return Stage.SCENE
    if step <= bounds.final_step:
        return Stage.FUSION
    return Stage.SUBJECT


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5 + 1e-9)


def validate_fractions(start_fraction: float, final_fraction: float) -> None:
    """Stage fractions must satisfy ``0 <= start <= final <= 1``."""
    if not 0.0 <= start_fraction <= final_fraction <= 1.0:
        raise StageError(
            f"stage fractions must satisfy 0 <= start ({start_fraction}) <= final ({final_fraction}) <= 1; "
            "the fusion stage cannot end before it starts"
        )


def bounds_from_fractions(
    steps: int, start_fraction: float = START_MERGE_FRACTION, final_fraction: float = FINAL_FRACTION
) -> StageBounds:
    """Stage bounds for ``steps`` steps from fractions of the step count.

    0.30 / 0.60 of 50 steps gives the official 15 / 30. A start fraction of 0 means no scene
    stage, equal fractions mean no fusion stage, a final fraction of 1 means no subject stage.
    """
    if steps < 1:
        raise StageError(f"steps must be >= 1, got {steps}")
    validate_fractions(start_fraction, final_fraction)
    start = -1 if start_fraction == 0 else _round_half_up(start_fraction * steps)
    final = start if final_fraction == start_fraction else max(start, _round_half_up(final_fraction * steps))
    return StageBounds(start, final)


def step_index(sigma: float, sigmas: Sequence[float] | torch.Tensor, rtol: float = 1e-4) -> int:
    """Step index of a model evaluation at noise level ``sigma`` in a descending schedule.

    ``sigmas`` holds ``steps + 1`` values (the last usually 0). The result is the largest
    ``i`` in ``[0, steps - 1]`` with ``sigmas[i] >= sigma`` (within ``rtol``), so samplers that
    evaluate between grid sigmas (heun, dpm_2, ...) land in the step whose interval holds them.
    """
    values = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    if values.numel() < 2:
        raise ValueError(f"a sigma schedule needs at least 2 values, got {values.numel()}")
    grid = values[:-1]
    at_or_above = grid * (1.0 + rtol) >= float(sigma)
    count = int(at_or_above.sum())
    return min(max(count - 1, 0), grid.numel() - 1)
