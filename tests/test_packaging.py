"""The wheel ``pip install .`` builds, not the checkout: the core with every wing, and no console script
(the commands run from the pack's folder in ComfyUI's custom_nodes, or by its cli.py; a copy in
site-packages could find no ComfyUI and would print cli.py lines that point nowhere)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

import pytest

from paths import ROOT
from processes import git

PROJECT_FILES = ("pyproject.toml", "README.md", "LICENSE", "facediffuser_core")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    pytest.importorskip("setuptools", reason="builds the wheel with the environment's setuptools (no download)")
    source = tmp_path_factory.mktemp("source")
    for name in PROJECT_FILES:  # a copy, so the build leaves nothing in the checkout
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir() else {}))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out), str(source)],
                   check=True, capture_output=True, text=True, timeout=300)  # fmt: skip
    (path,) = out.glob("facediffuser_nodes-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def test_the_wheel_holds_every_module_of_the_core(wheel):
    modules = sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "facediffuser_core").rglob("*.py"))
    assert {"facediffuser_core/method/snf.py", "facediffuser_core/commands/__init__.py"} <= set(modules)
    assert sorted(name for name in wheel.namelist() if name.startswith("facediffuser_core/")) == modules


def test_the_wheel_installs_no_console_script(wheel):
    (metadata,) = [name for name in wheel.namelist() if name.endswith(".dist-info/METADATA")]
    entry_points = [name for name in wheel.namelist() if name.endswith(".dist-info/entry_points.txt")]
    assert entry_points == [] or "console_scripts" not in wheel.read(entry_points[0]).decode()
    assert wheel.read(metadata).decode().startswith("Metadata-Version")


# --- the Comfy Registry's archive and publishing ------------------------------------------------------

PACK_ROOT_FILES = {"__init__.py", "cli.py", "install.py", "requirements.txt", "pyproject.toml", "README.md", "LICENSE", "icon.png"}
PACK_FOLDERS = ("nodes/", "facediffuser_core/", "workflows/", "web/")  # every tracked file under these ships


def tracked_files() -> list[str]:
    """The repository's files as the next commit would track them (tracked, and new ones git does not
    ignore), that exist now."""
    listed = git("ls-files", "--cached", "--others", "--exclude-standard", cwd=ROOT)
    return sorted({name for name in listed.splitlines() if (ROOT / name).is_file()})


def comfy_cli() -> str:
    """comfy-cli's ``comfy``: $FACEDIFFUSER_COMFY_CLI (.ci/run installs it in a venv of its own, since its
    dependencies are not ComfyUI's), else one on PATH."""
    configured = os.environ.get("FACEDIFFUSER_COMFY_CLI")
    if configured:
        assert Path(configured).is_file(), f"FACEDIFFUSER_COMFY_CLI={configured} does not exist"
        return configured
    found = shutil.which("comfy")
    if not found:
        pytest.skip("comfy-cli is not installed (pip install comfy-cli; .ci/run does, in a venv of its own)")
    return found


@pytest.fixture(scope="module")
def registry_checkout(tmp_path_factory) -> Path:
    """The repository's tracked files as they are now, in a git repository of their own: what the
    registry's tools see (they archive git-tracked files)."""
    if not shutil.which("git"):
        pytest.skip("git is needed to list the tracked files")
    checkout = tmp_path_factory.mktemp("pack") / "ComfyUI-FaceDiffuser"
    for name in tracked_files():
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, checkout / name)
    git("init", "-q", cwd=checkout)
    git("add", "-A", cwd=checkout)
    return checkout


def run_comfy(checkout: Path, *args: str) -> subprocess.CompletedProcess:
    home = checkout.parent / "home"  # comfy-cli keeps its settings there, not in the user's
    environment = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "COMFY_CLI_DISABLE_TRACKING": "1"}
    return subprocess.run([comfy_cli(), "--skip-prompt", "--no-enable-telemetry", *args], cwd=checkout, env=environment, capture_output=True, text=True, timeout=300)


def test_comfy_node_validate_passes_with_no_security_warning(registry_checkout):
    result = run_comfy(registry_checkout, "node", "validate")
    said = result.stdout + result.stderr  # rich writes some lines to stderr when not on a terminal
    assert result.returncode == 0, said
    assert "All validation checks passed" in said and "Security warnings" not in said


def test_the_packed_archive_is_the_pack_a_user_installs(registry_checkout):
    result = run_comfy(registry_checkout, "node", "pack")
    assert result.returncode == 0, result.stdout + result.stderr
    with zipfile.ZipFile(registry_checkout / "node.zip") as archive:
        packed = set(archive.namelist())
    expected = {name for name in tracked_files() if name in PACK_ROOT_FILES or name.startswith(PACK_FOLDERS)}
    assert packed == expected, (sorted(packed - expected), sorted(expected - packed))
    assert PACK_ROOT_FILES <= packed and not any(name.startswith(("tests/", ".ci/", "benchmarks/", "docs/", "tools/", ".github/")) for name in packed)
    assert {"workflows/facediffuser_two_subjects.json", "workflows/api/facediffuser_two_subjects.json", "workflows/facediffuser_two_subjects.jpg"} <= packed


def test_the_registry_icon_is_the_packs_own_square_picture():
    from PIL import Image

    icon = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["comfy"]["Icon"]
    repository = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    owner_and_name = repository.removeprefix("https://github.com/")
    assert icon == f"https://raw.githubusercontent.com/{owner_and_name}/main/icon.png"  # the pack's file, not another project's
    with Image.open(ROOT / "icon.png") as picture:
        assert picture.size[0] == picture.size[1] >= 200 and picture.format == "PNG"


def test_the_icon_is_what_its_script_draws(tmp_path):
    """icon.png is tools/draw_icon.py's output (rerun it after changing the drawing)."""
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import draw_icon
    finally:
        sys.path.remove(str(ROOT / "tools"))
    with Image.open(ROOT / "icon.png") as shipped:
        assert np.array_equal(np.asarray(shipped.convert("RGB")), np.asarray(draw_icon.draw_icon()))


def publish_step() -> str:
    yaml = pytest.importorskip("yaml")
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "publish.yml").read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as true
    assert triggers["push"] == {"branches": ["main"], "paths": ["pyproject.toml"]}
    steps = workflow["jobs"]["publish"]["steps"]
    (check,) = [step for step in steps if step.get("id") == "version"]
    (publish,) = [step for step in steps if step.get("uses", "").startswith("Comfy-Org/publish-node-action")]
    assert publish["if"] == "steps.version.outputs.publish == 'true'"
    assert publish["with"]["personal_access_token"] == "${{ secrets.REGISTRY_ACCESS_TOKEN }}"
    return check["run"]


@pytest.mark.skipif(sys.platform == "win32" or not shutil.which("git") or not shutil.which("bash"), reason="the workflow runs bash on ubuntu-latest")
@pytest.mark.parametrize("old, new, event, publishes", [("0.1.0", "0.2.0", "push", True), ("0.1.0", "0.1.0", "push", False), ("0.1.0", "0.1.0", "workflow_dispatch", True)])
def test_the_publish_workflow_publishes_when_the_version_changes(tmp_path, old, new, event, publishes):
    """The workflow's version check, run as GitHub runs it, on a repository whose last commit changes
    (or keeps) pyproject.toml's version."""
    script = publish_step()
    repo = tmp_path / "repo"
    repo.mkdir()
    git("init", "-q", cwd=repo)
    for version, description in ((old, "first"), (new, "second")):
        (repo / "pyproject.toml").write_text(f'[project]\nname = "x"\nversion = "{version}"\ndescription = "{description}"\n')
        git("add", "pyproject.toml", cwd=repo)
        git("commit", "-qm", description, cwd=repo)
    output = tmp_path / "github_output"
    result = subprocess.run(["bash", "-e", "-c", script], cwd=repo, env={**os.environ, "GITHUB_OUTPUT": str(output), "GITHUB_EVENT_NAME": event}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"version {old} -> {new}" in result.stdout
    assert output.read_text() == f"publish={'true' if publishes else 'false'}\n"
    assert len(git("log", "--oneline", cwd=repo).splitlines()) == 2
