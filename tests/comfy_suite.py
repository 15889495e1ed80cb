"""What the suites that run a real ComfyUI share (``tests/integration``, ``tests/browser``): they run
when COMFYUI_PATH points at a ComfyUI (0.3.75 or newer) checkout whose requirements are installed in this
environment, and report themselves skipped otherwise. Each suite's conftest imports the fixtures
from here and starts its server with :func:`start_server`; the server helpers live in
``tests/integration/harness.py`` and ``models.py``."""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
INTEGRATION = TESTS / "integration"
if str(INTEGRATION) not in sys.path:  # harness, models
    sys.path.insert(0, str(INTEGRATION))

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")


def skip_without_comfyui(items, folder: Path, suite: str) -> None:
    """Mark every collected test under ``folder`` skipped when COMFYUI_PATH is not set."""
    if COMFYUI_PATH:
        return
    skip = pytest.mark.skip(
        reason=f"COMFYUI_PATH is not set: the {suite} needs a ComfyUI (0.3.75 or newer) checkout "
        "(export COMFYUI_PATH=/path/to/ComfyUI, its requirements installed here; see docs/development.md)"
    )
    for item in items:
        if folder in Path(item.fspath).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    path = Path(COMFYUI_PATH).resolve()
    if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
        pytest.fail(f"COMFYUI_PATH={COMFYUI_PATH} is not a ComfyUI checkout (no main.py / comfy/)")
    return path


@pytest.fixture(scope="session")
def model_files():
    """Random-weight SDM/TDM files loaded as SD1.5, with the smallest such UNet (models.py; generated
    once, about a minute; cached outside the repo)."""
    from models import ensure_model_files

    return ensure_model_files()


@pytest.fixture(scope="session")
def face_pngs(tmp_path_factory) -> list[Path]:
    """The shared test photos as face_1.png / face_2.png, the names the shipped workflows use."""
    from PIL import Image

    from paths import FACES

    folder = tmp_path_factory.mktemp("faces")
    paths = []
    for index, source in enumerate(sorted(FACES.glob("*.jpeg")), start=1):
        path = folder / f"face_{index}.png"
        Image.open(source).convert("RGB").save(path)
        paths.append(path)
    return paths


STARTED: list = []  # every suite server started (harness.ComfyServer), for quiet_servers()
IN_PROCESS: list = []  # the in-process model set while it is held (tests/integration/conftest.py, ``loaded``)


# The suites' servers keep only the current prompt's outputs, dropping the last prompt's models before
# loading the next ones. ComfyUI 0.33's default cache (by RAM pressure) drops them after the first node
# of the next prompt has run, the Loader, so that a change of workflow briefly holds both model sets
# (12-13 GB here); a test keeps the default (test_comfy_server.py).
CACHE_ARGS = ["--cache-classic"]


def start_server(
    comfyui_path: Path, model_files, face_pngs: list[Path], tmp_path_factory, inputs: list[Path] = (),
    models: dict[str, Path] | None = None, cache_args: list[str] = CACHE_ARGS, suite_settings: bool = True,
    templates_only: bool = False,
):  # fmt: skip
    """A ComfyUI server (``--cpu``, 127.0.0.1) with the pack in custom_nodes; in models/facediffuser the
    converted files under the README's names (FastComposer's too) and the official SDM/ and TDM/
    folders; an SD1.5 checkpoint and a LoRA under the scene-checkpoint workflow's names in
    models/checkpoints and models/loras, the tests' random ControlNet under the pose workflow's name in
    models/controlnet, plus ``models`` (``facenet/x`` -> file); an SDXL-shaped file in a folder of
    extra_model_paths.yaml; face_1.png, face_2.png, the shipped pose image and ``inputs`` in input/. Stop it
    with ``.stop()``. ``cache_args``: ComfyUI's cache options (``[]``: its default); ``suite_settings``:
    False runs ComfyUI as users do (no ``harness.SERVER_ARGS``, no ``LOW_MEMORY_ENV``). ``templates_only``:
    only the pack and the models the shipped templates need, as a user has after the README's steps:
    nothing copied into input/ (the pack's ``add_example_inputs`` fills it on load; ``face_pngs`` and
    ``inputs`` must be empty) and no LoRA (the scene-checkpoint template's LoRA loader is bypassed)."""
    from harness import ComfyServer, make_base_directory
    from models import CONTROLNET, FASTCOMPOSER_FILE, SCENE_CHECKPOINT, SCENE_LORA, ensure_controlnet_file, ensure_fastcomposer_file, ensure_scene_files

    release_in_process()  # before a server loads models beside this process's
    if templates_only:
        assert not face_pngs and not inputs, "templates_only: the pack provides the inputs"
    scene = dict(zip((f"checkpoints/{SCENE_CHECKPOINT}", f"loras/{SCENE_LORA}"), ensure_scene_files(model_files, comfyui_path)))
    if templates_only:
        del scene[f"loras/{SCENE_LORA}"]

    base = tmp_path_factory.mktemp("comfy-base")
    make_base_directory(
        base,
        {
            "facediffuser_sdm.safetensors": model_files.sdm,
            "facediffuser_tdm.safetensors": model_files.tdm,
            "SDM": model_files.sdm_official.parent,
            "TDM": model_files.tdm_official.parent,
            FASTCOMPOSER_FILE: ensure_fastcomposer_file(model_files),
        },
        [] if templates_only else [*face_pngs, TESTS.parent / "workflows" / "inputs" / "pose_two_people.png", *inputs],
        {
            **scene,
            f"controlnet/{CONTROLNET}": ensure_controlnet_file(model_files, comfyui_path),
            **(models or {}),
        },
    )
    extra = tmp_path_factory.mktemp("extra-models")
    (extra / "sdxl_shaped.safetensors").symlink_to(model_files.sdxl_shaped)
    yaml = base / "extra_model_paths.yaml"
    yaml.write_text(f"facediffuser_tests:\n  base_path: {extra}\n  facediffuser: .\n")
    comfy = ComfyServer(comfyui_path, base, ["--preview-method", "latent2rgb", "--extra-model-paths-config", str(yaml), *cache_args], suite_settings=suite_settings)
    STARTED.append(comfy)
    return comfy.start()


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The C library of this process where it is glibc (Linux), else None (nothing to tune)."""
    return ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def map_large_blocks() -> None:
    """This process's LOW_MEMORY_ENV (harness.py), set at run time: blocks above 64 KiB are mapped on
    their own and go back to the system when freed, so the activations of one in-process test are not
    kept in the heap beside the next test's models (glibc; elsewhere nothing to do)."""
    from harness import LOW_MEMORY_ENV

    if glibc():
        glibc().mallopt(M_MMAP_THRESHOLD, int(LOW_MEMORY_ENV["MALLOC_MMAP_THRESHOLD_"]))


def release_memory() -> None:
    """Collect garbage and give the freed heap back to the system (glibc otherwise keeps it in this
    process: after the in-process modules, about 9 GB next to the servers of the later ones)."""
    gc.collect()
    if glibc():
        glibc().malloc_trim(0)


def release_in_process() -> None:
    """Drop the in-process model set, unload every model ComfyUI holds in this process and give the
    memory back to the system (the modules still holding the set keep it until they end)."""
    if IN_PROCESS:
        IN_PROCESS.clear()
        import comfy.model_management

        comfy.model_management.unload_all_models()
    release_memory()


def quiet_servers() -> None:
    """Unload the models of every running suite server and of this process (before a test loads its
    own, in this process or in a ComfyUI it starts): one loaded SD1.5-sized set at a time keeps the
    suite within 10 GiB."""
    release_in_process()
    for comfy in STARTED:
        if comfy.running:
            comfy.free()
