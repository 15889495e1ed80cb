import pytest
import torch

from facediffuser_core.method.guidance import Conditionings, cfg, combine, combine_guided, guided_from, predict_noise
from facediffuser_core.method.schedule import Stage
from facediffuser_core.method.snf import fuse_noise, saliency_map
from toy_models import ToyEpsNet, toy_conditionings

SCALE = 5.0


@pytest.fixture
def setup():
    tdm, sdm = ToyEpsNet(seed=1), ToyEpsNet(seed=2)
    empty, text, subject = toy_conditionings()
    x = torch.randn(2, 4, 16, 12, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([801, 801])
    return tdm, sdm, Conditionings(empty, text, subject), x, t


def expected_eps(stage, tdm, sdm, conds, x, t):
    """Each model called separately per conditioning (no batching), official formulas."""
    b = x.shape[0]
    run = lambda model, c: model(x, t, c.expand(b, -1, -1))
    e0, et = run(tdm, conds.empty), run(tdm, conds.text)
    st, sa = run(sdm, conds.text), run(sdm, conds.subject)
    eps_scene, eps_subject = e0 + SCALE * (et - e0), st + SCALE * (sa - st)
    if stage is Stage.SCENE:
        return eps_scene, None
    if stage is Stage.SUBJECT:
        return eps_subject, None
    return fuse_noise(eps_scene, eps_subject, SCALE * (et - e0), SCALE * (sa - st))


@pytest.mark.parametrize("stage", list(Stage))
def test_predict_noise_matches_formulas(setup, stage):
    tdm, sdm, conds, x, t = setup
    got = predict_noise(stage, x, t, tdm, sdm, conds, SCALE)
    want, want_mask = expected_eps(stage, ToyEpsNet(seed=1), ToyEpsNet(seed=2), conds, x, t)
    assert torch.allclose(got.eps, want, atol=1e-5)
    if stage is Stage.FUSION:
        assert torch.equal(got.subject_mask, want_mask)
        assert 0 < got.subject_mask.float().mean() < 1
    else:
        assert got.subject_mask is None


@pytest.mark.parametrize("stage, tdm_calls, sdm_calls", [(Stage.SCENE, 1, 0), (Stage.FUSION, 1, 1), (Stage.SUBJECT, 0, 1)])
def test_each_model_called_at_most_once_with_batched_conditionings(setup, stage, tdm_calls, sdm_calls):
    tdm, sdm, conds, x, t = setup
    predict_noise(stage, x, t, tdm, sdm, conds, SCALE)
    assert len(tdm.calls) == tdm_calls and len(sdm.calls) == sdm_calls
    for model in (tdm, sdm):
        for batch, timesteps in model.calls:
            assert batch == 2 * x.shape[0] and timesteps.tolist() == [801] * 4


def test_negative_first_positive_second():
    seen = []

    def recorder(x, t, context):
        seen.append(context.clone())
        return torch.zeros_like(x)

    empty, text, subject = (torch.full((1, 3, 2), v) for v in (0.0, 1.0, 2.0))
    predict_noise(Stage.FUSION, torch.zeros(1, 4, 8, 8), 5, recorder, recorder, Conditionings(empty, text, subject), SCALE)
    tdm_ctx, sdm_ctx = seen
    assert tdm_ctx[:, 0, 0].tolist() == [0.0, 1.0]  # TDM: empty, text
    assert sdm_ctx[:, 0, 0].tolist() == [1.0, 2.0]  # SDM: text (its negative), subject


def test_the_scene_models_own_prompts_replace_empty_and_text_for_it_alone():
    seen = []

    def recorder(x, t, context):
        seen.append(context.clone())
        return torch.zeros_like(x)

    empty, text, subject, scene_negative, scene_positive = (torch.full((1, 3, 2), v) for v in (0.0, 1.0, 2.0, 3.0, 4.0))
    conds = Conditionings(empty, text, subject, scene_negative=scene_negative, scene_positive=scene_positive)
    predict_noise(Stage.FUSION, torch.zeros(1, 4, 8, 8), 5, recorder, recorder, conds, SCALE)
    tdm_ctx, sdm_ctx = seen
    assert tdm_ctx[:, 0, 0].tolist() == [3.0, 4.0]  # scene model: its own negative, its own positive
    assert sdm_ctx[:, 0, 0].tolist() == [1.0, 2.0]  # SDM: unchanged, text (its negative) and subject
    seen.clear()
    predict_noise(Stage.SCENE, torch.zeros(1, 4, 8, 8), 5, recorder, recorder, Conditionings(empty, text, subject, scene_positive=scene_positive), SCALE)
    assert seen[0][:, 0, 0].tolist() == [0.0, 4.0]  # only the positive given: the empty prompt stays its negative


@pytest.mark.parametrize("stage", list(Stage))
def test_scene_prompts_equal_to_the_defaults_change_nothing(setup, stage):
    tdm, sdm, conds, x, t = setup
    same = Conditionings(conds.empty, conds.text, conds.subject, scene_negative=conds.empty.clone(), scene_positive=conds.text.clone())
    got, want = predict_noise(stage, x, t, tdm, sdm, same, SCALE), predict_noise(stage, x, t, tdm, sdm, conds, SCALE)
    assert torch.equal(got.eps, want.eps)


def test_long_prompt_conditionings_are_repeated_to_common_length():
    seen = []

    def recorder(x, t, context):
        seen.append(context.shape)
        return torch.zeros_like(x)

    conds = Conditionings(torch.zeros(1, 77, 8), torch.ones(1, 154, 8), torch.ones(1, 154, 8))
    predict_noise(Stage.SCENE, torch.zeros(2, 4, 8, 8), 5, recorder, recorder, conds, SCALE)
    assert seen == [torch.Size([4, 154, 8])]


def test_cfg_and_combine():
    neg, pos = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 0.0])
    eps, response = cfg(neg, pos, 3.0)
    assert eps.tolist() == [4.0, -4.0] and response.tolist() == [3.0, -6.0]
    with pytest.raises(ValueError, match="fusion stage needs the subject model"):
        combine(Stage.FUSION, (neg, pos), None, 3.0)
    with pytest.raises(ValueError, match="scene stage needs the scene model"):
        combine(Stage.SCENE, None, (neg, pos), 3.0)


def test_guidance_from_elsewhere_fuses_on_its_own_responses():
    """A host's guidance (not CFG of anything: e.g. after RescaleCFG or PAG) enters SNF as given:
    the guided eps, and as response the guided eps minus the negative's eps."""
    g = torch.Generator().manual_seed(5)
    neg_scene, guided_scene, neg_subject, guided_subject = (torch.randn(2, 4, 16, 12, generator=g) for _ in range(4))
    scene, subject = guided_from(neg_scene, guided_scene), guided_from(neg_subject, guided_subject)
    assert torch.equal(scene[1], guided_scene - neg_scene)
    assert torch.equal(combine_guided(Stage.SCENE, scene, None).eps, guided_scene)
    assert torch.equal(combine_guided(Stage.SUBJECT, None, subject).eps, guided_subject)
    fused = combine_guided(Stage.FUSION, scene, subject)
    mask = saliency_map(guided_subject - neg_subject) > saliency_map(guided_scene - neg_scene)
    assert torch.equal(fused.subject_mask, mask) and 0 < mask.float().mean() < 1
    assert torch.equal(fused.eps, torch.where(mask, guided_subject, guided_scene))
    with pytest.raises(ValueError, match="fusion stage needs the scene model"):
        combine_guided(Stage.FUSION, None, subject)


def test_conditionings_validation():
    with pytest.raises(ValueError, match="one shape"):
        Conditionings(torch.zeros(1, 77, 8), torch.zeros(1, 77, 8), torch.zeros(1, 154, 8))
    with pytest.raises(ValueError, match="empty conditioning"):
        Conditionings(torch.zeros(1, 77, 4), torch.zeros(1, 77, 8), torch.zeros(1, 77, 8))
    with pytest.raises(ValueError, match=r"scene_positive conditioning must be \[B,L,8\], got \(1, 77, 4\)"):
        Conditionings(torch.zeros(1, 77, 8), torch.zeros(1, 77, 8), torch.zeros(1, 77, 8), scene_positive=torch.zeros(1, 77, 4))
    conds = Conditionings(torch.zeros(3, 77, 8), torch.zeros(1, 77, 8), torch.zeros(1, 77, 8))
    with pytest.raises(ValueError, match="batch of 3 does not fit a latent batch of 2"):
        predict_noise(Stage.SCENE, torch.zeros(2, 4, 8, 8), 1, ToyEpsNet(0, width=8), ToyEpsNet(1, width=8), conds, SCALE)
