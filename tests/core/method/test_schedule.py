import pytest
import torch

from facediffuser_core.errors import StageError
from facediffuser_core.method.schedule import (
    FINAL_FRACTION,
    START_MERGE_FRACTION,
    Stage,
    StageBounds,
    bounds_from_fractions,
    stage_at,
    step_index,
)


def stages(steps, bounds):
    return [stage_at(i, bounds).value for i in range(steps)]


def test_official_defaults():
    bounds = StageBounds()
    assert (bounds.start_merge_step, bounds.final_step) == (15, 30)
    got = stages(50, bounds)
    assert got[:16] == ["scene"] * 16 and got[16:31] == ["fusion"] * 15 and got[31:] == ["subject"] * 19


def test_fractions_give_official_steps():
    assert (START_MERGE_FRACTION, FINAL_FRACTION) == (0.3, 0.6)
    assert bounds_from_fractions(50) == StageBounds(15, 30)


@pytest.mark.parametrize(
    "steps, start, final, expected",
    [
        (20, 0.3, 0.6, (6, 12)),
        (25, 0.3, 0.6, (8, 15)),  # 7.5 -> 8, 15.0 -> 15 (round half up)
        (50, 0.0, 0.6, (-1, 30)),  # no scene stage
        (50, 0.3, 0.3, (15, 15)),  # no fusion stage
        (50, 0.3, 1.0, (15, 50)),  # no subject stage
        (1, 0.3, 0.6, (0, 1)),
    ],
)
def test_bounds_from_fractions(steps, start, final, expected):
    assert bounds_from_fractions(steps, start, final) == StageBounds(*expected)


def test_stage_edges():
    assert stages(6, StageBounds(-1, 2)) == ["fusion"] * 3 + ["subject"] * 3
    assert stages(6, StageBounds(2, 2)) == ["scene"] * 3 + ["subject"] * 3
    assert stages(6, StageBounds(1, 10)) == ["scene"] * 2 + ["fusion"] * 4
    assert stages(3, StageBounds(-1, -1)) == ["subject"] * 3
    assert Stage.FUSION.uses_scene_model and Stage.FUSION.uses_subject_model
    assert not Stage.SCENE.uses_subject_model and not Stage.SUBJECT.uses_scene_model


@pytest.mark.parametrize(
    "start, final, message",
    [(20, 10, "final_step .10. must be >= start_merge_step .20."), (-2, 5, "start_merge_step must be >= 0"), (1.5, 3, "integer")],
)
def test_invalid_bounds(start, final, message):
    with pytest.raises(StageError, match=message):
        StageBounds(start, final)


@pytest.mark.parametrize("steps, start, final", [(0, 0.3, 0.6), (50, 0.7, 0.6), (50, -0.1, 0.5), (50, 0.3, 1.2)])
def test_invalid_fractions(steps, start, final):
    with pytest.raises(StageError):
        bounds_from_fractions(steps, start, final)


def test_negative_step_rejected():
    with pytest.raises(ValueError):
        stage_at(-1, StageBounds())


def test_step_index_on_and_between_grid():
    sigmas = torch.tensor([14.6, 10.0, 6.0, 3.0, 1.0, 0.0])
    assert [step_index(s, sigmas) for s in sigmas[:-1].tolist()] == [0, 1, 2, 3, 4]
    assert step_index(8.0, sigmas) == 1  # between grid sigmas (heun / dpm_2 midpoints)
    assert step_index(0.5, sigmas) == 4
    assert step_index(0.0, sigmas) == 4  # never past the last step
    assert step_index(20.0, sigmas) == 0
    assert step_index(10.0 * (1 + 5e-5), sigmas) == 1  # float noise above a grid sigma
    assert step_index(10.0 * (1 + 1e-3), sigmas) == 0


def test_step_index_with_truncated_schedule_is_relative():
    full = torch.linspace(14.6, 0.0, 51)
    tail = full[25:]  # denoise 0.5 keeps the last 25 steps
    assert step_index(float(tail[0]), tail) == 0
    assert step_index(float(tail[10]), tail) == 10
