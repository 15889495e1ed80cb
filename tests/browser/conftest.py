"""The browser suite: ComfyUI's own web UI (the comfyui-frontend-package its server serves) in Debian's
Chromium, driven headless by Playwright. Runs when COMFYUI_PATH is set, like tests/integration; the
browser comes from the system (``apt-get install chromium``), never from a download."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from comfy_suite import comfyui_path, model_files, skip_without_comfyui, start_server  # noqa: F401 (fixtures; face_pngs is below)

BROWSER = Path(__file__).resolve().parent
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser")
# What the browser may do on a closed network: no background requests, updates, sync or QUIC.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1600, "height": 1000}
_screenshot_dirs: list[Path] = []


def pytest_collection_modifyitems(config, items):
    skip_without_comfyui(items, BROWSER, "browser suite (ComfyUI's web UI in Chromium)")


def pytest_terminal_summary(terminalreporter):
    kept = "" if os.environ.get("FACEDIFFUSER_SCREENSHOTS") else " (pytest removes it when every test passes: set FACEDIFFUSER_SCREENSHOTS=DIR to keep them)"
    for folder in _screenshot_dirs:
        terminalreporter.write_line(f"browser suite screenshots: {folder}{kept}")


def chromium_executable() -> str:
    """``$FACEDIFFUSER_CHROMIUM``, else Debian's chromium on the PATH."""
    configured = os.environ.get("FACEDIFFUSER_CHROMIUM")
    if configured:
        return configured
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(
        "the browser suite needs Chromium from the system packages: apt-get install chromium "
        "(or set FACEDIFFUSER_CHROMIUM to a Chromium executable); .ci/run installs it when COMFYUI_PATH is set"
    )


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory) -> Path:
    """Where the suite saves its pictures: ``$FACEDIFFUSER_SCREENSHOTS``, else a temporary folder
    (printed at the end of the run). ``<workflow>.png``: the graph as opened; ``<workflow>_run.png``:
    after a run; ``<workflow>.jpg``: template browser thumbnail; ``template_browser.png``; ``node_help.png``."""
    configured = os.environ.get("FACEDIFFUSER_SCREENSHOTS")
    folder = Path(configured).resolve() if configured else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    _screenshot_dirs.append(folder)
    return folder


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium under Playwright (its driver ships in the Python package; no browser download).
    Playwright gives each launch a fresh temporary --user-data-dir."""
    from playwright.sync_api import sync_playwright

    executable = chromium_executable()
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def server(comfyui_path, model_files, face_pngs, tmp_path_factory):
    """The browser suite's ComfyUI server (see ``comfy_suite.start_server``), with the drawn faces."""
    comfy = start_server(comfyui_path, model_files, face_pngs, tmp_path_factory)
    yield comfy
    comfy.stop()


@pytest.fixture
def ui(browser, server):
    """A fresh browser context (empty storage) with ComfyUI's web UI, ready to use."""
    from comfy_page import ComfyPage

    # A known user: no first-visit template dialog popping up over the canvas, no minimap in pictures.
    assert server.post("/settings", {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}).ok
    context = browser.new_context(viewport=VIEWPORT)
    page = ComfyPage(context, server.url)
    try:
        page.open()
        yield page
    finally:
        context.close()


@pytest.fixture(scope="session")
def face_pngs(tmp_path_factory) -> list[Path]:
    """face_1.png / face_2.png for the UI: drawn portraits rather than the photos of the other suites,
    since the pictures this suite takes are published in the README (the models are random anyway)."""
    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("drawn-faces")
    looks = [  # background, skin, hair, shirt
        ((176, 208, 232), (236, 194, 160), (70, 46, 30), (60, 90, 150)),
        ((232, 214, 170), (196, 140, 104), (30, 26, 24), (150, 60, 60)),
    ]
    paths = []
    for index, (background, skin, hair, shirt) in enumerate(looks, start=1):
        image = Image.new("RGB", (512, 512), background)
        draw = ImageDraw.Draw(image)
        draw.ellipse((96, 400, 416, 640), fill=shirt)  # shoulders
        draw.rectangle((226, 330, 286, 420), fill=skin)  # neck
        draw.ellipse((146, 70, 366, 250), fill=hair)  # hair
        draw.ellipse((156, 110, 356, 370), fill=skin)  # face
        for x in (210, 302):
            draw.ellipse((x - 22, 208, x + 22, 236), fill=(250, 250, 250))  # eyes
            draw.ellipse((x - 10, 212, x + 10, 232), fill=(50, 40, 35))
            draw.line((x - 26, 192, x + 24, 188), fill=hair, width=7)  # brows
        draw.line((256, 240, 248, 290, 262, 292), fill=tuple(c - 40 for c in skin), width=4)  # nose
        draw.arc((216, 290, 296, 340), 20, 160, fill=(150, 60, 60), width=6)  # mouth
        path = folder / f"face_{index}.png"
        image.save(path)
        paths.append(path)
    return paths
