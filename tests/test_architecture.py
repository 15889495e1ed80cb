"""The pack's layers, read from the imports themselves (``ast``), so a change cannot quietly undo them:

- ``facediffuser_core`` imports no ComfyUI module (it stays testable anywhere);
- its wings: ``method`` and ``weights`` import no other wing, ``faces`` only those two, ``commands`` any
  (``errors`` and the package root are shared by all);
- ``nodes/`` imports no command module (loading the nodes must not load the commands' HTTP clients).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Iterator

import pytest

from paths import ROOT

CORE = ROOT / "facediffuser_core"
WINGS = ("method", "weights", "faces", "commands")
MAY_IMPORT = {"method": set(), "weights": set(), "faces": {"method", "weights"}, "commands": {"method", "weights", "faces"}}
# Top-level modules of a ComfyUI tree (0.3.75 and 0.33): the core must import none of them.
COMFYUI_MODULES = {
    "comfy", "comfy_api", "comfy_api_nodes", "comfy_config", "comfy_execution", "comfy_extras", "app", "api_server",
    "folder_paths", "latent_preview", "node_helpers", "nodes", "execution", "server", "main", "cuda_malloc",
    "comfyui_version", "hook_breaker_ac10a0", "protocol", "utils", "middleware", "new_updater",
}  # fmt: skip
CORE_PATH = re.compile(r"(facediffuser_pack\.)?facediffuser_core(\.\w+)+")  # a dotted path into the core, in a string


def imported_modules(path: Path, package: str) -> Iterator[tuple[int, str]]:
    """(line, absolute dotted name) of every module ``path`` imports, lazy imports inside functions
    included; ``package`` is the file's own package (``facediffuser_core.method``), which resolves
    relative imports. ``from X import name`` yields ``X.name`` too, since ``name`` may be a module.
    A string that is a dotted core path (``importlib.import_module("facediffuser_pack.facediffuser_core.x")``,
    a ``monkeypatch.setattr`` target) counts as an import of it."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and CORE_PATH.fullmatch(node.value):
            yield node.lineno, node.value
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                if len(base) != len(parts) - node.level + 1:
                    raise ValueError(f"{path}:{node.lineno}: relative import above the top package")
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"


def package_of(path: Path) -> str:
    """The dotted package a file of the repository belongs to, with the repository's folder as the pack
    (``nodes/x.py`` -> ``pack.nodes``, ``facediffuser_core/method/x.py`` -> ``pack.facediffuser_core.method``)."""
    return ".".join(["pack", *path.relative_to(ROOT).parent.parts])


def core_name(module: str) -> str | None:
    """``facediffuser_core.<rest>`` for a module of the core, whether imported absolutely
    (``facediffuser_core.x``, as the tests do), relatively from the pack (``pack.facediffuser_core.x``) or
    through the pack loaded as a package the way ComfyUI loads it (``facediffuser_pack.facediffuser_core.x``,
    the in-process tests' and benchmarks' name for it)."""
    for prefix in ("pack.facediffuser_core", "facediffuser_pack.facediffuser_core", "facediffuser_core"):
        if module == prefix or module.startswith(prefix + "."):
            return "facediffuser_core" + module[len(prefix):]
    return None


def wing_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in WINGS else None


def violations(paths: list[Path]) -> list[str]:
    """Every import in ``paths`` that breaks a rule of the module docstring, as ``file:line: why`` (once
    per line and rule: ``from x import y`` is checked as ``x`` and as ``x.y``)."""
    found: dict[tuple[str, str], str] = {}
    for path in paths:
        package = package_of(path)
        here = core_name(package)
        own_wing = wing_of(here) if here else None
        for line, module in imported_modules(path, package):
            where = f"{path.relative_to(ROOT)}:{line}"
            target = core_name(module)
            if here is not None and module.split(".")[0] in COMFYUI_MODULES:
                found.setdefault((where, "comfyui"), f"{where}: the core imports ComfyUI's {module}")
            if target is None:
                continue
            target_wing = wing_of(target)
            if package.startswith("pack.nodes") and target_wing == "commands":
                found.setdefault((where, "nodes"), f"{where}: a node imports the command module {target}")
            if own_wing and target_wing and target_wing != own_wing and target_wing not in MAY_IMPORT[own_wing]:
                found.setdefault((where, "wings"), f"{where}: the {own_wing} wing imports the {target_wing} wing ({target})")
    return list(found.values())


def test_the_core_the_wings_and_the_nodes_keep_their_layers():
    paths = sorted(CORE.rglob("*.py")) + sorted((ROOT / "nodes").glob("*.py"))
    assert len(paths) > 30 and all(any(CORE.joinpath(wing).glob("*.py")) for wing in WINGS)
    assert violations(paths) == []


def missing_core_paths(files: list[Path]) -> list[str]:
    """``file:line: name`` for each core path that ``files`` import (or name in a string) and that
    resolves to no file, package, or name defined in one."""
    import importlib

    missing = []
    for path in files:
        for line, module in imported_modules(path, package_of(path)):
            name = core_name(module)
            if name is None:
                continue
            head, _, attribute = name.rpartition(".")
            if _is_package_path(name) or (_is_package_path(head) and hasattr(importlib.import_module(head), attribute)):
                continue
            missing.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    return missing


def test_every_core_import_names_a_module_or_name_that_exists():
    """No file imports a core module path that no longer exists (the moves of the wings), the pack's
    scripts and benchmarks included: each dotted name resolves to a file, a package or a name defined
    in one."""
    files = [*CORE.rglob("*.py"), *(ROOT / "nodes").glob("*.py"), *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "tools").glob("*.py"),
             *(ROOT / "tests").rglob("*.py"), ROOT / "cli.py", ROOT / "install.py"]  # fmt: skip
    assert missing_core_paths(files) == []


def test_a_path_that_no_longer_exists_is_found_in_imports_and_strings(tmp_path):
    source = tmp_path / "t.py"
    source.write_text(
        "import importlib\nfrom facediffuser_core.snf import fuse_noise\nfrom facediffuser_core.method.snf import fuse\n"
        "importlib.import_module('facediffuser_pack.facediffuser_core.comfy_launch')\nx = 'facediffuser_core.method.snf.fuse_noise'\n"
    )
    source.rename(ROOT / "tests" / "_architecture_probe.py")
    try:
        found = missing_core_paths([ROOT / "tests" / "_architecture_probe.py"])
    finally:
        (ROOT / "tests" / "_architecture_probe.py").unlink()
    assert found == [
        "tests/_architecture_probe.py:2: facediffuser_core.snf",
        "tests/_architecture_probe.py:2: facediffuser_core.snf.fuse_noise",
        "tests/_architecture_probe.py:3: facediffuser_core.method.snf.fuse",
        "tests/_architecture_probe.py:4: facediffuser_core.comfy_launch",
    ]


def _is_package_path(name: str) -> bool:
    """Whether ``name`` is a path of files in the core (``facediffuser_core.method.snf``), not a name
    defined inside a module (``facediffuser_core.method.snf.fuse_noise``)."""
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


@pytest.mark.parametrize(
    "source, where, expected",
    [
        ("from ..faces.detection import detect\n", "facediffuser_core/method/x.py", "the method wing imports the faces wing"),
        ("from ..commands import generate\n", "facediffuser_core/weights/x.py", "the weights wing imports the commands wing"),
        ("def f():\n    from ..commands.generate import generate\n", "facediffuser_core/faces/x.py", "the faces wing imports the commands wing"),
        ("import comfy.sd\n", "facediffuser_core/method/x.py", "the core imports ComfyUI's comfy.sd"),
        ("import folder_paths\n", "facediffuser_core/x.py", "the core imports ComfyUI's folder_paths"),
        ("from ..facediffuser_core.commands.download import MODELS\n", "nodes/x.py", "a node imports the command module"),
        ("from facediffuser_core.commands import download\n", "nodes/x.py", "a node imports the command module"),
    ],
)
def test_each_rule_catches_its_break(tmp_path, monkeypatch, source, where, expected):
    """The checker itself: a file that breaks each rule is reported (files written under a stand-in
    repository root, so the real tree is untouched)."""
    import test_architecture as module

    path = tmp_path.joinpath(where)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    monkeypatch.setattr(module, "ROOT", tmp_path)
    (found,) = violations([path])
    assert expected in found and found.startswith(f"{where}:")


@pytest.mark.parametrize(
    "source, where",
    [
        ("from ..errors import FaceDiffuserError\nfrom .snf import fuse_noise\n", "facediffuser_core/method/x.py"),
        ("from ..method.preprocess import to_rgb\nfrom ..weights.checkpoints import read_state_dict\n", "facediffuser_core/faces/x.py"),
        ("from ..faces.detection import detect\nfrom .comfy_client import build_graph\n", "facediffuser_core/commands/x.py"),
        ("import comfy.sd\nfrom ..facediffuser_core.weights.model_folders import download_command_line\n", "nodes/x.py"),
    ],
)
def test_what_the_rules_allow_passes(tmp_path, monkeypatch, source, where):
    import test_architecture as module

    path = tmp_path.joinpath(where)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    monkeypatch.setattr(module, "ROOT", tmp_path)
    assert violations([path]) == []
