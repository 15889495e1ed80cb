"""The real-ComfyUI suite: runs when COMFYUI_PATH points at a ComfyUI (0.3.75 or newer) checkout whose
requirements are installed in this environment; otherwise every test here is skipped."""

from __future__ import annotations

from pathlib import Path

from comfy_suite import comfyui_path, face_pngs, model_files, server, skip_without_comfyui  # noqa: F401 (fixtures)

INTEGRATION = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    skip_without_comfyui(items, INTEGRATION, "real-ComfyUI integration suite")
