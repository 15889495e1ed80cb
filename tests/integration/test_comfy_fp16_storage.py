"""Why the in-process suite may keep its UNets stored in fp16 (conftest.load_test_models), inside an
imported ComfyUI on a CPU: a UNet stored in fp16 computes exactly what the same UNet stored in float32
computes, bit for bit (the files are fp16, and ComfyUI casts each weight to float32 where it is used);
and the subject encoder loaded in fp16 and upcast holds the weights the Loader's "fp32" gives."""

from __future__ import annotations

import torch

from comfy_suite import quiet_servers
from conftest import release_models
from facediffuser_core.weights.checkpoints import ModelKind, load_checkpoint


def test_a_unet_stored_in_fp16_computes_what_its_float32_copy_does(comfy, model_files):
    quiet_servers()  # the shared set goes: these two UNets are the only models held
    models = [comfy.loader.load_unet(load_checkpoint(model_files.tdm, ModelKind.TDM), dtype) for dtype in (torch.float16, torch.float32)]
    assert [next(m.model.diffusion_model.parameters()).dtype for m in models] == [torch.float16, torch.float32]
    comfy.model_management.load_models_gpu(models)
    generator = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 77, 768, generator=generator)
    sigmas = torch.tensor([14.6, 0.5])  # about timesteps 999 and 250
    with torch.no_grad():
        direct = [m.model.diffusion_model(x, timesteps=torch.tensor([981.0, 250.0]), context=context, transformer_options={}) for m in models]
        sampled = [m.model.apply_model(x, sigmas, c_crossattn=context) for m in models]  # what the samplers call
    for half, full in (direct, sampled):
        assert full.dtype == half.dtype == torch.float32
        assert not torch.equal(full[0], full[1]) and full.abs().max() > 0
        assert torch.equal(half, full)
    release_models(comfy, models)


def test_the_subject_encoder_upcast_from_fp16_has_the_float32_loaders_weights(comfy, model_files):
    state = load_checkpoint(model_files.sdm, ModelKind.SDM).subject_encoder
    half, full = (comfy.loader.SubjectEncoderModel(comfy.loader.SubjectEncoder.from_state_dict(state), dtype) for dtype in (torch.float16, torch.float32))
    upcast = half.patcher.model.float().state_dict()
    reference = full.patcher.model.state_dict()
    assert upcast.keys() == reference.keys() and all(torch.equal(upcast[k], reference[k]) for k in reference)
    assert all(v.dtype == torch.float32 for v in upcast.values() if v.is_floating_point())
