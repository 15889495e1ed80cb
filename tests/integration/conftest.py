"""The real-ComfyUI suite: runs when COMFYUI_PATH points at a ComfyUI 0.8 checkout whose
requirements are installed in this environment; otherwise every test here is skipped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

INTEGRATION = Path(__file__).resolve().parent
COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
SKIP_REASON = (
    "COMFYUI_PATH is not set: the real-ComfyUI integration suite needs a ComfyUI 0.8 checkout "
    "(export COMFYUI_PATH=/path/to/ComfyUI, its requirements installed here; see README)"
)


def pytest_collection_modifyitems(config, items):
    if COMFYUI_PATH:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if INTEGRATION in Path(item.fspath).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    path = Path(COMFYUI_PATH).resolve()
    if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
        pytest.fail(f"COMFYUI_PATH={COMFYUI_PATH} is not a ComfyUI checkout (no main.py / comfy/)")
    return path


@pytest.fixture(scope="session")
def model_files():
    """SD1.5-sized random-weight SDM/TDM files (generated once, minutes; cached outside the repo)."""
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
