"""FastComposer's one model inside an imported ComfyUI, loaded from a file converted as FastComposer's:
the FastComposer Guider against an independent restatement of FastComposer's inference loop under
DDIM, and against the stock KSampler when every step is on one side of start_merge."""

from __future__ import annotations

import math

import pytest
import torch

from comfy_inprocess import run_guider
from comfy_suite import quiet_servers
from conftest import empty_conditioning, load_test_models, release_models
from facediffuser_core.weights.checkpoints import ModelKind, declared_kind
from facediffuser_core.method.sampler import ddim_timesteps, sd15_alphas_cumprod

SD15_SCALE = 0.18215
STEPS = 5
CFG = 5.0


@pytest.fixture(scope="module")
def fastcomposer(comfy, model_files):
    """(model, clip, vae, subject_encoder) from the FastComposer file, through the Loader's code with no TDM
    (in place of the shared set, which is dropped first)."""
    from models import ensure_fastcomposer_file

    path = ensure_fastcomposer_file(model_files)
    assert declared_kind(path) is ModelKind.FASTCOMPOSER
    quiet_servers()
    tdm, *models = load_test_models(comfy, path, None)
    assert tdm is None
    yield models
    release_models(comfy, models)


@pytest.fixture(scope="module")
def prompts(comfy, fastcomposer, face):
    """(text, subject, empty) as the FastComposer workflow encodes them (object_resolution 224)."""
    _, clip, _, encoder = fastcomposer
    text, subject = comfy.encode.encode_subjects(clip, encoder, face, "a photo of a man <|image|> in a garden", 224)
    return text, subject, empty_conditioning(clip)


def guider(comfy, fastcomposer, prompts, start_merge: float):
    text, subject, negative = prompts
    return comfy.fastcomposer.FastComposerGuider.execute(fastcomposer[0], text, subject, negative, CFG, start_merge).result[0]


def fastcomposer_loop(unet, noise, text, subject, empty, start_merge_step: int) -> torch.Tensor:
    """FastComposer's inference (pipeline.py, delayed subject conditioning) restated: DDIM (eta 0,
    SD1.5 schedule, no final alpha of one), CFG of (empty, text) while i <= start_merge_step and of
    (empty, subject) afterwards; returns the last predicted x0 (in latent units)."""
    alphas = sd15_alphas_cumprod().double()
    timesteps = ddim_timesteps(STEPS)
    x = noise.double() * math.sqrt(1 - float(alphas[timesteps[0]]))  # ComfyUI's ddim starts at sigma(981) * noise
    x0 = None
    for i, t in enumerate(timesteps):
        positive = text if i <= start_merge_step else subject
        context = torch.cat([empty, positive])
        eps_empty, eps_positive = unet(torch.cat([x, x]).float(), timesteps=torch.full((2,), float(t)), context=context, transformer_options={}).double().chunk(2)
        eps = eps_empty + CFG * (eps_positive - eps_empty)
        alpha = alphas[t]
        alpha_prev = alphas[timesteps[i + 1]] if i + 1 < len(timesteps) else alphas[0]
        x0 = (x - (1 - alpha).sqrt() * eps) / alpha.sqrt()
        x = alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps
    return x0 / SD15_SCALE


def test_guider_matches_fastcomposers_loop_under_ddim(comfy, fastcomposer, prompts):
    model = fastcomposer[0]
    text, subject, empty = (c[0][0] for c in prompts)
    ours, noise, _ = run_guider(comfy, guider(comfy, fastcomposer, prompts, 0.4), STEPS)
    comfy.model_management.load_models_gpu([model])
    unet = model.model.diffusion_model
    with torch.no_grad():
        reference = fastcomposer_loop(unet, noise, text, subject, empty, start_merge_step=2)  # 0.4 of 5 steps
        shifted = fastcomposer_loop(unet, noise, text, subject, empty, start_merge_step=3)
    scale = reference.abs().max().item()
    difference = (ours.double() - reference).abs().max().item()
    assert difference <= 2e-3 * scale, f"max |difference| {difference:.3g} vs max |latent| {scale:.3g}"
    assert (ours.double() - shifted).abs().max().item() > 10 * max(difference, 1e-6 * scale)  # the switch step matters


@pytest.mark.parametrize("start_merge, positive", [(1.0, "text"), (0.0, "subject")])
def test_every_step_on_one_side_is_the_stock_ksampler(comfy, fastcomposer, prompts, start_merge, positive):
    model = fastcomposer[0]
    text, subject, empty = prompts
    ours, noise, sigmas = run_guider(comfy, guider(comfy, fastcomposer, prompts, start_merge), 4, size=8)
    stock = comfy.samplers.CFGGuider(model)
    stock.set_conds({"text": text, "subject": subject}[positive], empty)
    stock.set_cfg(CFG)
    reference = stock.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("ddim"), sigmas, seed=3, disable_pbar=True)
    assert torch.equal(ours, reference)


def test_a_scene_model_that_is_not_sd1_is_refused(comfy, fastcomposer, prompts):
    from test_comfy_scene_model import tiny_model

    with pytest.raises(ValueError, match=r"^FastComposer Guider: model: the model is SDXL, not SD1.x; connect the Face-diffuser Loader's sdm"):
        comfy.fastcomposer.FastComposerGuider.execute(tiny_model("SDXL"), *prompts, CFG, 0.2)
