"""The headless DDIM sampler against diffusers' DDIMScheduler and the official stage loop."""

import pytest
import torch
from diffusers import DDIMScheduler

from facediffuser_core.errors import SamplingCancelled
from facediffuser_core.method.guidance import Conditionings
from facediffuser_core.method.sampler import ddim_timesteps, initial_noise, sample, sd15_alphas_cumprod
from facediffuser_core.method.schedule import StageBounds
from test_snf import official_fusion
from toy_models import ToyEpsNet, toy_conditionings

SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)
SCALE = 5.0


def diffusers_scheduler(steps):
    scheduler = DDIMScheduler(**SD15_SCHEDULER)
    scheduler.set_timesteps(steps)
    return scheduler


def official_loop(tdm, sdm, conds, noise, steps, start_merge_step, final_step):
    """The official pipeline's loop: separate model calls, diffusers DDIM steps (4x64x64 latents)."""
    scheduler = diffusers_scheduler(steps)
    x = noise
    for i, t in enumerate(scheduler.timesteps):
        tt = t.reshape(1).expand(x.shape[0])
        call = lambda model, c: model(x, tt, c.expand(x.shape[0], -1, -1))
        if i <= start_merge_step:
            null, text = call(tdm, conds.empty), call(tdm, conds.text)
            eps = null + SCALE * (text - null)
        elif i <= final_step:
            null, text = call(tdm, conds.empty), call(tdm, conds.text)
            text_, aug = call(sdm, conds.text), call(sdm, conds.subject)
            eps, _ = official_fusion(null + SCALE * (text - null), text_ + SCALE * (aug - text_), SCALE * (text - null), SCALE * (aug - text_))
        else:
            text_, aug = call(sdm, conds.text), call(sdm, conds.subject)
            eps = text_ + SCALE * (aug - text_)
        x = scheduler.step(eps, t, x).prev_sample
    return x


@pytest.mark.parametrize("steps", [1, 7, 20, 25, 50, 999])
def test_timesteps_match_diffusers(steps):
    assert torch.equal(ddim_timesteps(steps), diffusers_scheduler(steps).timesteps)


def test_alphas_match_diffusers():
    ours = sd15_alphas_cumprod()
    theirs = DDIMScheduler(**SD15_SCHEDULER).alphas_cumprod
    assert torch.allclose(ours.float(), theirs, rtol=1e-6, atol=0)


def test_official_timesteps_for_50_steps():
    timesteps = ddim_timesteps(50).tolist()
    assert timesteps[0] == 981 and timesteps[-1] == 1 and len(timesteps) == 50


@pytest.fixture(scope="module")
def conds():
    return Conditionings(*toy_conditionings(batch=1))


def test_matches_official_loop_at_64x64(conds):
    """Scene, fusion and subject stages at the official 4x64x64 size, 12 steps, bounds 3 / 7."""
    noise = initial_noise((1, 4, 64, 64), seed=11)
    ours = sample(ToyEpsNet(1), ToyEpsNet(2), conds, noise, steps=12, guidance_scale=SCALE, bounds=StageBounds(3, 7))
    ref = official_loop(ToyEpsNet(1), ToyEpsNet(2), conds, noise, 12, 3, 7)
    assert (ours.latents - ref).abs().max().item() <= 1e-4


def test_call_counts_for_official_schedule(conds):
    tdm, sdm = ToyEpsNet(1), ToyEpsNet(2)
    sample(tdm, sdm, conds, initial_noise((2, 4, 8, 8), seed=0), steps=50, guidance_scale=SCALE)
    timesteps = ddim_timesteps(50)
    assert len(tdm.calls) == 31 and len(sdm.calls) == 34  # TDM: steps 0..30, SDM: steps 16..49
    assert [int(t[0]) for _, t in tdm.calls] == timesteps[:31].tolist()
    assert [int(t[0]) for _, t in sdm.calls] == timesteps[16:].tolist()
    assert {batch for batch, _ in tdm.calls + sdm.calls} == {4}  # 2 conditionings x batch 2


def test_deterministic_for_a_seed(conds):
    run = lambda seed: sample(ToyEpsNet(1), ToyEpsNet(2), conds, initial_noise((1, 4, 16, 24), seed), steps=10).latents
    assert torch.equal(run(5), run(5))
    assert not torch.allclose(run(5), run(6))


def test_progress_callback_and_masks(conds):
    seen = []
    result = sample(
        ToyEpsNet(1),
        ToyEpsNet(2),
        conds,
        initial_noise((1, 4, 16, 16), 0),
        steps=10,
        bounds=StageBounds(2, 5),
        callback=lambda i, total, x, x0: seen.append((i, total, x.shape, x0.shape)),
        return_masks=True,
    )
    assert [s[0] for s in seen] == list(range(10)) and {s[1] for s in seen} == {10}
    assert all(s[2] == s[3] == (1, 4, 16, 16) for s in seen)
    masks = result.subject_masks
    assert [m is not None for m in masks] == [False] * 3 + [True] * 3 + [False] * 4
    assert all(m.dtype == torch.bool and m.shape == (1, 1, 16, 16) for m in masks[3:6])


def test_masks_not_collected_by_default(conds):
    assert sample(ToyEpsNet(1), ToyEpsNet(2), conds, initial_noise((1, 4, 8, 8), 0), steps=3).subject_masks is None


def test_cooperative_cancel_stops_within_one_step(conds):
    tdm, sdm = ToyEpsNet(1), ToyEpsNet(2)
    polls = []

    def should_cancel():
        polls.append(1)
        return len(polls) > 4

    with pytest.raises(SamplingCancelled, match="before step 5 of 50"):
        sample(tdm, sdm, conds, initial_noise((1, 4, 8, 8), 0), steps=50, should_cancel=should_cancel)
    assert len(tdm.calls) == 4 and len(sdm.calls) == 0
