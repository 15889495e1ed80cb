"""The real-ComfyUI suite: runs when COMFYUI_PATH points at a ComfyUI (0.3.75 or newer) checkout whose
requirements are installed in this environment; otherwise every test here is skipped.

The in-process fixtures (ComfyUI imported into the test process, no server) live here so that every
module shares one import and one model set (``loaded``: loaded by the first module that asks, kept for
the next ones, dropped when a server or another set loads models: ``comfy_suite.quiet_servers``). New
in-process tests take ``loaded`` (and ``conditionings``) rather than loading models of their own.
The modules that need a server share one (``server``), which unloads its models whenever a test loads
its own (``quiet_servers``)."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_suite import IN_PROCESS, comfyui_path, face_pngs, map_large_blocks, model_files, quiet_servers, release_memory, skip_without_comfyui, start_server  # noqa: F401 (fixtures)

INTEGRATION = Path(__file__).resolve().parent
COMFY_MODULES = ("comfy.model_management", "comfy.samplers", "comfy.sample", "comfy.sampler_helpers", "nodes")
PACK_MODULES = ("loader", "encode", "subject", "guider", "sampler", "fastcomposer", "detailer", "scores", "regional_attention")


def pytest_collection_modifyitems(config, items):
    skip_without_comfyui(items, INTEGRATION, "real-ComfyUI integration suite")


@pytest.fixture(scope="session")
def comfy(comfyui_path):
    """ComfyUI's modules by last name (``comfy.samplers``, ``nodes`` for its core nodes, ...) and
    the pack's node modules (``loader``, ``encode``, ``subject``, ``guider``, ``sampler``, ``fastcomposer``, ``detailer``, ``scores``, ``regional_attention``),
    imported in-process."""
    from comfy_inprocess import import_comfy, import_pack

    map_large_blocks()
    import_comfy(comfyui_path)
    import_pack()
    modules = {name.split(".")[-1]: importlib.import_module(name) for name in COMFY_MODULES}
    pack = {name: importlib.import_module(f"facediffuser_pack.nodes.{name}") for name in PACK_MODULES}
    return type("Comfy", (), {**modules, **pack})


@pytest.fixture(scope="session")
def server(comfyui_path, model_files, face_pngs, facenet_file, tiny_clip_folder, tmp_path_factory):
    """The integration suite's ComfyUI server (see ``comfy_suite.start_server``), with random FaceNet
    weights in models/facenet, the tiny CLIP folder in models/clip_eval and a face-less blank.png in input/."""
    from models import CLIP, FACENET

    blank = tmp_path_factory.mktemp("blank") / "blank.png"
    Image.new("RGB", (128, 128), (100, 100, 100)).save(blank)
    comfy = start_server(
        comfyui_path, model_files, face_pngs, tmp_path_factory, [blank],
        {f"facenet/{FACENET}": facenet_file, f"clip_eval/{CLIP.split('/')[0]}": tiny_clip_folder},
    )  # fmt: skip
    yield comfy
    comfy.stop()


def load_test_models(comfy, sdm: Path, tdm: Path | None) -> tuple:
    """(tdm, sdm, clip, vae, subject_encoder) through the Loader's code, the UNets stored in fp16 (the
    files' dtype: ComfyUI computes in float32 on a CPU all the same, bit for bit as with float32 weights,
    test_comfy_fp16_storage.py) and the subject encoder in float32 (upcast from the files' fp16: the
    weights the Loader's "fp32" gives). Half the UNets' memory of "fp32"."""
    models = comfy.loader.load_models(str(sdm), None if tdm is None else str(tdm), "fp16")
    models[-1].patcher.model.float()
    return models


@pytest.fixture(scope="module")
def loaded(comfy, model_files):
    """(tdm, sdm, clip, vae, subject_encoder) from the converted files (:func:`load_test_models`):
    one set for every in-process module, loaded once and kept until a server or another set loads models."""
    if not IN_PROCESS:
        quiet_servers()
        IN_PROCESS.extend(load_test_models(comfy, model_files.sdm, model_files.tdm))
    return tuple(IN_PROCESS)


def release_models(comfy, models: list) -> None:
    """Drop a fixture's own models (emptied in place: pytest still holds the yielded list while the
    fixture tears down), unload every model and give the freed memory back to the system, which
    the servers of the later modules need."""
    models.clear()
    comfy.model_management.unload_all_models()
    release_memory()


def image_tensor(path: Path, size: int | None = None) -> torch.Tensor:
    """A photo as a ComfyUI IMAGE [1, H, W, 3] in 0..1 (resized to ``size`` x ``size`` if given)."""
    image = Image.open(path).convert("RGB")
    if size is not None:
        image = image.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


@pytest.fixture(scope="module")
def face() -> torch.Tensor:
    from paths import FACES

    return image_tensor(FACES / "man1.jpeg")


def empty_conditioning(clip):
    cond, pooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


@pytest.fixture(scope="module")
def conditionings(comfy, loaded, face):
    """(text, subject, empty) CONDITIONINGs of a one-subject prompt with the man1 photo."""
    _, _, clip, _, encoder = loaded
    text, subject = comfy.encode.encode_subjects(clip, encoder, face, "a photo of a man <|image|> in a garden", 512)
    return text, subject, empty_conditioning(clip)
