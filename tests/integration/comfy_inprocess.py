"""Importing ComfyUI and the pack into the test process (no server), as ComfyUI's own unit tests do."""

from __future__ import annotations

import importlib.util
import math
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch

from facediffuser_core.method.guidance import Conditionings
from facediffuser_core.method.sampler import ddim_timesteps, sample, sd15_alphas_cumprod
from facediffuser_core.method.schedule import StageBounds
from paths import ROOT

PACK = "facediffuser_pack"
SD15_SCALE = 0.18215  # SD1.x VAE latents times this are the model's latents


def import_comfy(comfyui_path: Path) -> None:
    """Put ComfyUI first on sys.path (its top-level ``nodes`` must win over the pack's) and select
    the CPU before ``comfy.model_management`` queries the device."""
    if str(comfyui_path) in sys.path:
        sys.path.remove(str(comfyui_path))
    sys.path.insert(0, str(comfyui_path))
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401


def import_pack() -> ModuleType:
    """The repository as the package ComfyUI loads (relative imports included)."""
    if PACK in sys.modules:
        return sys.modules[PACK]
    import folder_paths

    # loading the pack copies its example inputs into ComfyUI's input folder: a temporary one, not the
    # ComfyUI checkout's (shared by every run on this machine)
    folder_paths.set_input_directory(tempfile.mkdtemp(prefix="facediffuser-input-"))
    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    return module


def run_guider(comfy, guider, steps, sampler="ddim", scheduler="ddim_uniform", denoise=1.0, size=16, seed=3):
    """Sample an empty latent [1,4,size,size] with ``guider`` as SamplerCustomAdvanced does: (latent, noise, sigmas)."""
    latent = torch.zeros(1, 4, size, size)
    sigmas = comfy.samplers.KSampler(guider.model_patcher, steps, "cpu", sampler, scheduler, denoise).sigmas
    noise = comfy.sample.prepare_noise(latent, seed)
    out = guider.sample(noise, latent, comfy.samplers.sampler_object(sampler), sigmas, seed=seed, disable_pbar=True)
    return out, noise, sigmas


def run_sampler(comfy, loaded, conditionings, latent: dict, *, scene: tuple | None = None, seed=5, steps=4, denoise=1.0, start_merge=0.3, final=0.6) -> tuple:
    """The Face-diffuser Sampler node (cfg 5, ddim / ddim_uniform): returns (LATENT dict, subject MASK
    [B, H, W]). ``scene`` is (scene_positive, scene_negative), passed only when given (None: unconnected)."""
    tdm, sdm, *_ = loaded
    text, subject, negative = conditionings
    output = comfy.sampler.FaceDiffuserSampler.execute(
        tdm, sdm, text, subject, negative, latent, seed, steps, 5.0, "ddim", "ddim_uniform", start_merge, final, denoise, *(scene or ())
    )
    return output.result


def headless_reference(comfy, tdm, sdm, conds: Conditionings, noise: torch.Tensor, steps: int, cfg: float, bounds: StageBounds) -> torch.Tensor:
    """The headless sampler on the ModelPatchers' UNets, comparable with ComfyUI's "ddim" on ddim_uniform
    sigmas: it starts from run_guider's unit-variance ``noise`` [B, 4, h, w] scaled by sqrt(1 - alphabar) of
    the first DDIM timestep (ComfyUI's sigma-scaled start) and returns its last predicted x0 [B, 4, h, w] in
    LATENT units (model latents / 0.18215), where ComfyUI's last step, to sigma 0, ends."""
    comfy.model_management.load_models_gpu([tdm, sdm])

    def eps_model(patcher):
        unet = patcher.model.diffusion_model
        return lambda x, t, context: unet(x, timesteps=t.float(), context=context, transformer_options={})

    start = noise * math.sqrt(1 - float(sd15_alphas_cumprod()[ddim_timesteps(steps)[0]]))
    x0 = []
    sample(eps_model(tdm), eps_model(sdm), conds, start, steps, cfg, bounds, callback=lambda i, n, x, pred: x0.append(pred))
    return x0[-1] / SD15_SCALE
