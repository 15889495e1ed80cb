"""The real-ComfyUI suite: runs when COMFYUI_PATH points at a ComfyUI 0.8 checkout whose
requirements are installed in this environment; otherwise every test here is skipped."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_suite import comfyui_path, face_pngs, model_files, server, skip_without_comfyui  # noqa: F401 (fixtures)

INTEGRATION = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    skip_without_comfyui(items, INTEGRATION, "real-ComfyUI integration suite")


# In-process suites: ComfyUI and the pack imported into the test process, the models loaded once per module


@pytest.fixture(scope="module")
def comfy(comfyui_path):
    from comfy_inprocess import import_comfy, import_pack

    import_comfy(comfyui_path)
    import_pack()
    modules = {name: importlib.import_module(name) for name in ("comfy.model_management", "comfy.samplers", "comfy.sample", "comfy.sampler_helpers")}
    pack = {name: importlib.import_module(f"facediffuser_pack.nodes.{name}") for name in ("loader", "encode", "guider", "sampler")}
    return type("Comfy", (), {**{k.split(".")[-1]: v for k, v in modules.items()}, **pack})


@pytest.fixture(scope="module")
def loaded(comfy, model_files):
    """(tdm, sdm, clip, vae, subject_encoder) from the converted files, UNets in fp32."""
    return comfy.loader.load_models(str(model_files.sdm), str(model_files.tdm), "fp32")


@pytest.fixture(scope="module")
def face() -> torch.Tensor:
    from paths import FACES

    array = np.asarray(Image.open(FACES / "man1.jpeg").convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None]


def empty_conditioning(clip):
    cond, pooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


@pytest.fixture(scope="module")
def conditionings(comfy, loaded, face):
    _, _, clip, _, encoder = loaded
    text, subject = comfy.encode.encode_subjects(clip, encoder, face, "a photo of a man <|image|> in a garden", 512)
    return text, subject, empty_conditioning(clip)
