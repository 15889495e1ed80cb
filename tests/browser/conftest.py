"""The browser suite: ComfyUI's own web UI (the comfyui-frontend-package its server serves) in Debian's
Chromium, driven headless by Playwright. Runs when COMFYUI_PATH is set, like tests/integration; the
browser comes from the system (``apt-get install chromium``), never from a download."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from comfy_suite import comfyui_path, model_files, skip_without_comfyui, start_server  # noqa: F401 (fixtures)

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
def server(comfyui_path, model_files, tmp_path_factory):
    """The browser suite's ComfyUI server (see ``comfy_suite.start_server``) as a user has it: the pack
    and the models the templates need, nothing put in input/ by the suite (the pack copies its example
    portraits and pose there on load, as for a user: the pictures this suite takes, published in the
    README, show those drawn portraits) and no LoRA."""
    comfy = start_server(comfyui_path, model_files, [], tmp_path_factory, templates_only=True)
    yield comfy
    comfy.stop()


def open_ui(browser, server):
    """A fresh browser context (empty storage) and its page with ComfyUI's web UI, ready to use."""
    from comfy_page import ComfyPage

    # A known user: no first-visit template dialog popping up over the canvas, no minimap in pictures,
    # and the right side panel closed (web UI 1.49.6 keeps it open on the server once a test opened it,
    # e.g. a node's help; open, it covers part of the canvas and repeats the selected node's widgets).
    settings = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.RightSidePanel.IsOpen": False}
    assert server.post("/settings", settings).ok
    context = browser.new_context(viewport=VIEWPORT)
    try:
        page = ComfyPage(context, server.url)
        page.open()
    except BaseException:
        context.close()
        raise
    return context, page


@pytest.fixture(scope="module")
def kept_ui():
    """Where ``shared_ui`` keeps its page between tests (closed by the next ``ui`` or at the module's end)."""
    kept: dict = {}
    yield kept
    close_kept(kept)


def close_kept(kept: dict) -> None:
    context = kept.pop("context", None)
    kept.pop("page", None)
    if context is not None:
        context.close()


@pytest.fixture
def ui(browser, server, kept_ui):
    """A fresh browser context (empty storage) with ComfyUI's web UI, ready to use."""
    close_kept(kept_ui)  # one browser page at a time
    context, page = open_ui(browser, server)
    try:
        yield page
    finally:
        context.close()


@pytest.fixture
def shared_ui(browser, server, kept_ui, request):
    """One web UI page for the tests that need no fresh storage, in turn: the Run button test of each
    template (it opens its template from the template browser) and the editor tests (each opens its
    workflow file), over whatever the test before left (a workflow, run without error; nothing on
    screen). A page load per test cost 3 to 5 s of the suite's time. The page's uncaught exceptions are
    counted per test; a failed test leaves a fresh page to the next."""
    if "page" not in kept_ui:
        kept_ui["context"], kept_ui["page"] = open_ui(browser, server)
    page = kept_ui["page"]
    page.page_errors.clear()
    page.page.mouse.move(0, 0)  # where a fresh page has it: hovering nothing
    failed = request.session.testsfailed
    yield page
    if request.session.testsfailed != failed:
        close_kept(kept_ui)
