"""Importing ComfyUI and the pack into the test process (no server), as ComfyUI's own unit tests do."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

from paths import ROOT

PACK = "facediffuser_pack"


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
