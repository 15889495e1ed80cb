"""The Face-diffuser nodes called inside an imported ComfyUI, checked against ComfyUI's own pieces:
its seeded noise, its stock KSampler (denoise < 1, noise masks), its SD1 tokenizer with two faces,
and where the Sampler's subject mask lands."""

from __future__ import annotations

import pytest
import torch

from comfy_inprocess import run_sampler
from conftest import image_tensor
from facediffuser_core.method.sampler import initial_noise
from paths import FACES

SIZE = 64  # pixels: 8x8 latents keep the SD1.5-sized UNets quick on a CPU
SUBJECT_STAGE_ONLY = {"start_merge": 0.0, "final": 0.0}
SCENE_STAGE_ONLY = {"start_merge": 1.0, "final": 1.0}


def stock_ksampler(comfy, model, positive, negative, latent: dict, *, seed=5, steps=4, denoise=1.0) -> torch.Tensor:
    (out,) = comfy.nodes.common_ksampler(model, seed, steps, 5.0, "ddim", "ddim_uniform", positive, negative, latent, denoise=denoise)
    return out["samples"]


def assert_same(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """Bit for bit up to float noise: relative max difference below 1e-5."""
    scale = reference.abs().max().item()
    assert scale > 0
    assert (ours - reference).abs().max().item() <= 1e-5 * scale


@pytest.fixture(scope="module")
def encoded_photo(comfy, loaded) -> dict:
    """man2 at 64x64 through the VAE: the LATENT an img2img workflow samples from."""
    vae = loaded[3]
    (latent,) = comfy.nodes.VAEEncode().encode(vae, image_tensor(FACES / "man2.jpeg", SIZE))
    return latent


@pytest.mark.parametrize("shape, seed", [((1, 4, 8, 8), 42), ((3, 4, 16, 24), 7)])
def test_initial_noise_is_comfyuis_seeded_noise(comfy, shape, seed):
    """The headless sampler starts from the noise ComfyUI's samplers start from for that seed."""
    assert torch.equal(initial_noise(shape, seed), comfy.sample.prepare_noise(torch.zeros(shape), seed))


@pytest.mark.parametrize("stage", ["scene", "subject"])
def test_sampler_with_denoise_below_one_is_the_stock_ksampler_in_one_stage(comfy, loaded, conditionings, encoded_photo, stage):
    tdm, sdm, *_ = loaded
    text, subject, negative = conditionings
    fractions = SCENE_STAGE_ONLY if stage == "scene" else SUBJECT_STAGE_ONLY
    ours, _ = run_sampler(comfy, loaded, conditionings, encoded_photo, denoise=0.6, **fractions)
    if stage == "scene":
        reference = stock_ksampler(comfy, tdm, text, negative, encoded_photo, denoise=0.6)
    else:
        reference = stock_ksampler(comfy, sdm, subject, text, encoded_photo, denoise=0.6)
    assert_same(ours["samples"], reference)
    # denoise < 1 starts from the photo: the result is nearer to it than a full denoise is
    full, _ = run_sampler(comfy, loaded, conditionings, encoded_photo, denoise=1.0, **fractions)
    photo = encoded_photo["samples"]
    assert (ours["samples"] - photo).abs().mean() < (full["samples"] - photo).abs().mean()


def test_sampler_with_a_noise_mask_keeps_the_unmasked_latent(comfy, loaded, conditionings, encoded_photo):
    tdm, sdm, *_ = loaded
    text, subject, _ = conditionings
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, :, : SIZE // 2] = 1.0  # repaint the left half
    (masked,) = comfy.nodes.SetLatentNoiseMask().set_mask(encoded_photo, mask)

    ours, _ = run_sampler(comfy, loaded, conditionings, masked, **SUBJECT_STAGE_ONLY)
    assert_same(ours["samples"], stock_ksampler(comfy, sdm, subject, text, masked))
    assert torch.equal(ours["noise_mask"], masked["noise_mask"])  # the mask travels on, as with KSampler

    # all three stages: the right half stays the photo's latent, the left half is repainted
    fused, _ = run_sampler(comfy, loaded, conditionings, masked)
    photo, samples = encoded_photo["samples"], fused["samples"]
    right, left = (slice(None), slice(None), slice(None), slice(4, None)), (slice(None), slice(None), slice(None), slice(None, 4))
    assert (samples[right] - photo[right]).abs().max().item() <= 1e-4 * photo.abs().max().item()
    assert (samples[left] - photo[left]).abs().mean().item() > 0.1 * photo[left].abs().mean().item()


def test_two_faces_land_on_their_own_words(comfy, loaded):
    """Through ComfyUI's tokenizer and encode_subjects: face i's fused embedding sits at the word
    before marker i and equals the core subject encoder's result for that face alone there."""
    _, _, clip, _, encoder = loaded
    faces = torch.cat([image_tensor(FACES / "man1.jpeg", 256), image_tensor(FACES / "man2.jpeg", 256)])
    text, subject = comfy.encode.encode_subjects(clip, encoder, faces, "a man <|image|> and a woman <|image|> at a cafe", 512)
    text_cond, subject_cond = text[0][0], subject[0][0]
    positions = [2, 5]  # BOS, a, man, and, a, woman: one CLIP token per word
    changed = (subject_cond - text_cond).abs().amax(dim=-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == positions

    core = encoder.encoder  # the headless SubjectEncoder the node wraps
    with torch.no_grad():
        alone = [core(text_cond, faces[i : i + 1], [positions[i]], 512)[:, positions[i]] for i in range(2)]
    for i, position in enumerate(positions):
        fused = subject_cond[:, position]
        assert torch.allclose(fused, alone[i], rtol=1e-4, atol=1e-5 * alone[i].abs().max().item())
        other = alone[1 - i]
        assert (fused - other).abs().max() > 100 * (fused - alone[i]).abs().max()  # not the other face


@pytest.fixture
def salient_subject_region(comfy, loaded, conditionings, monkeypatch):
    """Replace UNet evaluations: every prediction is x0 = x / 2, except the SDM's subject-conditioned
    one, which moves the top-left 3x3 latent pixels; so only the SDM responds, and only there."""
    _, sdm, *_ = loaded
    subject_tensor = conditionings[1][0][0]

    def is_subject(cond) -> bool:
        return cond is not None and torch.equal(cond[0]["model_conds"]["c_crossattn"].cond.to(subject_tensor), subject_tensor)

    def fake_calc_cond_batch(model, conds, x, timestep, model_options):
        outputs = []
        for cond in conds:
            out = x / 2
            if model is sdm.model and is_subject(cond):
                out = out.clone()
                out[:, :, :3, :3] -= 1.0
            outputs.append(out)
        return outputs

    monkeypatch.setattr(comfy.samplers, "calc_cond_batch", fake_calc_cond_batch)


def test_subject_mask_is_white_where_the_subject_model_responds(comfy, loaded, conditionings, salient_subject_region):
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    _, mask = run_sampler(comfy, loaded, conditionings, latent, steps=10)
    assert mask.shape == (2, SIZE, SIZE)
    # the middle of the response's 3x3 latent block is the SDM's (8x8 image pixels per latent pixel)
    assert (mask[:, 8:16, 8:16] == 1).all()
    # latent pixels beyond SNF's 4x4 box filter's reach are the TDM's: there the SDM's saliency is
    # below the TDM's uniform 1/64 (its response is zero everywhere)
    assert (mask[:, 40:, :] == 0).all() and (mask[:, :, 40:] == 0).all()


def test_subject_mask_is_black_without_a_fusion_step(comfy, loaded, conditionings, salient_subject_region):
    _, mask = run_sampler(comfy, loaded, conditionings, {"samples": torch.zeros(1, 4, 8, 8)}, steps=4, **SUBJECT_STAGE_ONLY)
    assert mask.shape == (1, SIZE, SIZE) and (mask == 0).all()

