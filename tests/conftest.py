import os
import re
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
for path in (ROOT, TESTS):  # facediffuser_core, and the tests' helper modules
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def comfyui_version(path: Path) -> str:
    """The version a ComfyUI tree declares in comfyui_version.py ("unknown" without one)."""
    try:
        match = re.search(r'__version__\s*=\s*"([^"]+)"', (path / "comfyui_version.py").read_text())
    except OSError:
        match = None
    return match.group(1) if match else "unknown"


def pytest_report_header(config):
    """Which ComfyUI the integration and browser suites run against, for readers of a CI log."""
    configured = os.environ.get("COMFYUI_PATH")
    if not configured:
        return "ComfyUI: none (COMFYUI_PATH is not set; the integration and browser suites are skipped)"
    path = Path(configured).resolve()
    return f"ComfyUI: {comfyui_version(path)} at {path}"


MODULE_SECONDS: dict[str, float] = {}  # test file -> seconds of its tests' setup, call and teardown
MODULE_STARTED: dict[str, str] = {}  # test file -> wall-clock time its first test started (HH:MM:SS)


def pytest_runtest_logstart(nodeid, location):
    MODULE_STARTED.setdefault(nodeid.split("::")[0], time.strftime("%H:%M:%S"))


def pytest_runtest_logreport(report):
    module = report.nodeid.split("::")[0]
    MODULE_SECONDS[module] = MODULE_SECONDS.get(module, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    """The time of each test module, slowest first, so that CI's log shows where the suite's time goes
    (module-scoped fixtures count in their module's first test), and when it started: the clock time of
    a peak that .ci/peak_memory.py reports falls in the module that started last before it."""
    if not MODULE_SECONDS:
        return
    terminalreporter.section("time per module")
    width = max(map(len, MODULE_SECONDS))
    for module, seconds in sorted(MODULE_SECONDS.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"{module:<{width}}  {seconds / 60:6.1f} min  {seconds:7.1f} s  from {MODULE_STARTED.get(module, '-')}")
    total = sum(MODULE_SECONDS.values())
    terminalreporter.write_line(f"{'all':<{width}}  {total / 60:6.1f} min  {total:7.1f} s")


@pytest.fixture(scope="session")
def official_files(tmp_path_factory):
    """Tiny random-weight SDM and TDM in the official layout: {"SDM": path, "TDM": path}."""
    import factories

    root = tmp_path_factory.mktemp("official")
    return {kind: factories.write_official(root, kind, "tiny", seed) for seed, kind in enumerate(("SDM", "TDM"))}


@pytest.fixture(scope="session")
def clip_tokenize():
    """The real CLIP BPE tokenizer (open-clip-torch ships its vocabulary): text -> ids, no BOS/EOS."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer().encode



@pytest.fixture(scope="session")
def face_photos():
    """man1, man2 (the shared test photos) and scikit-image's astronaut, as RGB PIL images."""
    import eval_models

    return eval_models.face_photos()


@pytest.fixture(scope="session")
def facenet_file(tmp_path_factory) -> Path:
    """Random FaceNet weights in the layout of 20180402-114759-vggface2.pt (with logits.*)."""
    import eval_models

    return eval_models.write_facenet(tmp_path_factory.mktemp("facenet") / "facenet-random.pt")


@pytest.fixture(scope="session")
def tiny_clip_folder(tmp_path_factory) -> Path:
    """A tiny random CLIPModel as a Hugging Face folder, with the real CLIP tokenizer files."""
    import eval_models

    return eval_models.write_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))
