"""Another SD1.x model as the scene model, with its own prompts (scene_positive / scene_negative),
inside an imported ComfyUI: where the prompts go in each stage (checked against the stock KSampler
and the headless sampler), nothing changes while they are unconnected, and what is refused."""

from __future__ import annotations

import pytest
import torch

from comfy_inprocess import headless_reference, run_guider, run_sampler
from conftest import empty_conditioning
from facediffuser_core.method.guidance import Conditionings
from facediffuser_core.method.schedule import bounds_from_fractions
from test_comfy_nodes import SCENE_STAGE_ONLY, SUBJECT_STAGE_ONLY, assert_same, stock_ksampler

LATENT = {"samples": torch.zeros(1, 4, 8, 8)}


def encode(clip, text: str):
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


@pytest.fixture(scope="module")
def scene_prompts(loaded):
    """(scene_positive, scene_negative): other prompts than the text / empty pair, as a scene model's own."""
    clip = loaded[2]
    return encode(clip, "an oil painting of a man in a garden, impressionism"), encode(clip, "blurry, photo")


def test_in_the_scene_stage_the_scene_model_samples_its_own_prompts_as_a_stock_ksampler(comfy, loaded, conditionings, scene_prompts):
    tdm, *_ = loaded
    positive, negative = scene_prompts
    ours, _ = run_sampler(comfy, loaded, conditionings, LATENT, scene=(positive, negative), **SCENE_STAGE_ONLY)
    assert_same(ours["samples"], stock_ksampler(comfy, tdm, positive, negative, LATENT))
    # only the positive connected: the negative input stays the scene model's negative
    ours, _ = run_sampler(comfy, loaded, conditionings, LATENT, scene=(positive, None), **SCENE_STAGE_ONLY)
    assert_same(ours["samples"], stock_ksampler(comfy, tdm, positive, conditionings[2], LATENT))


def test_in_the_subject_stage_the_scene_prompts_are_not_used(comfy, loaded, conditionings, scene_prompts):
    sdm = loaded[1]
    text, subject, _ = conditionings
    ours, _ = run_sampler(comfy, loaded, conditionings, LATENT, scene=scene_prompts, **SUBJECT_STAGE_ONLY)
    assert_same(ours["samples"], stock_ksampler(comfy, sdm, subject, text, LATENT))


def test_unconnected_scene_prompts_change_nothing_bit_for_bit(comfy, loaded, conditionings, scene_prompts):
    text, _, negative = conditionings
    today, today_mask = run_sampler(comfy, loaded, conditionings, LATENT)
    same, same_mask = run_sampler(comfy, loaded, conditionings, LATENT, scene=(text, negative))  # the pair it uses anyway
    assert torch.equal(today["samples"], same["samples"]) and torch.equal(today_mask, same_mask)
    other, _ = run_sampler(comfy, loaded, conditionings, LATENT, scene=scene_prompts)
    assert not torch.equal(today["samples"], other["samples"])


def test_three_stages_with_scene_prompts_match_the_headless_sampler(comfy, loaded, conditionings, scene_prompts):
    """As test_comfy_inprocess's parity test (same step mapping), the scene model on its own pair."""
    tdm, sdm, *_ = loaded
    text, subject, negative = conditionings
    positive, scene_negative = scene_prompts
    steps = 5  # bounds 2 / 3: every stage
    guider = comfy.guider.build_guider(tdm, sdm, text, subject, negative, 5.0, 0.3, 0.6, positive, scene_negative)
    comfy_latent, noise, _ = run_guider(comfy, guider, steps)

    def agreeing(conds: Conditionings) -> float:
        """The fraction of latent values within 2e-3 of the latent's scale of the headless sampler's on ``conds``."""
        reference = headless_reference(comfy, tdm, sdm, conds, noise, steps, 5.0, bounds_from_fractions(steps, 0.3, 0.6))
        return ((comfy_latent - reference).abs() <= 2e-3 * reference.abs().max()).float().mean().item()

    own = Conditionings(negative[0][0], text[0][0], subject[0][0], scene_negative=scene_negative[0][0], scene_positive=positive[0][0])
    # Where the two models' saliencies are nearly equal, float rounding (ComfyUI runs the UNet on
    # sigma-scaled inputs, the headless sampler on DDIM's) can flip the noise fusion's choice at a
    # pixel, so a few values may differ more; every other value agrees to float precision.
    assert agreeing(own) >= 0.99
    assert agreeing(Conditionings(negative[0][0], text[0][0], subject[0][0])) < 0.5  # the scene prompts were used


def tiny_model(model_type: str):
    """A small random UNet of another model type (SDXL, SD2.x) as ComfyUI builds it from a checkpoint."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    extra = {
        "SDXL": {"adm_in_channels": 2816, "context_dim": 2048, "use_linear_in_transformer": True, "num_classes": "sequential"},
        "SD20": {"adm_in_channels": None, "context_dim": 1024, "use_linear_in_transformer": True, "num_classes": None},
    }[model_type]
    unet_config = dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2],
        transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1], transformer_depth_middle=1, num_head_channels=8,
        use_spatial_transformer=True, legacy=False, use_temporal_attention=False, use_temporal_resblock=False, **extra,
    )  # fmt: skip
    model = getattr(comfy.supported_models, model_type)(unet_config).get_model({})
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, device, comfy.model_management.unet_offload_device())


@pytest.mark.parametrize("model_type", ["SDXL", "SD20"])
def test_a_scene_model_that_is_not_sd1_is_refused_with_its_type(comfy, loaded, conditionings, model_type):
    sdm = loaded[1]
    other = tiny_model(model_type)
    with pytest.raises(ValueError, match=rf"^Face-diffuser Sampler: tdm: the model is {model_type}, not SD1.x; connect the Face-diffuser Loader's tdm or an SD1.5 checkpoint"):
        comfy.sampler.FaceDiffuserSampler.execute(other, sdm, *conditionings, LATENT, 5, 2, 5.0, "ddim", "ddim_uniform", 0.3, 0.6, 1.0)
    with pytest.raises(ValueError, match=rf"^Face-diffuser Guider: sdm: the model is {model_type}, not SD1.x"):
        comfy.guider.FaceDiffuserGuider.execute(loaded[0], other, *conditionings, 5.0, 0.3, 0.6)


def test_a_scene_prompt_from_another_clip_is_refused_with_its_width(comfy, loaded, conditionings):
    tdm, sdm, *_ = loaded
    wide = [[torch.zeros(1, 77, 1024), {}]]  # what an SD2 CLIP (OpenCLIP ViT-H) encodes
    with pytest.raises(ValueError, match=r"^Face-diffuser Guider: scene_negative has 1024-wide embeddings but the scene model takes 768; encode it with the scene model's own CLIP"):
        comfy.guider.FaceDiffuserGuider.execute(tdm, sdm, *conditionings, 5.0, 0.3, 0.6, empty_conditioning(loaded[2]), wide)
