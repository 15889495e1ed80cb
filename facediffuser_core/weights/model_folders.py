"""The folders a ComfyUI searches for one kind of model, worked out without importing ComfyUI, and the
``download`` command line that fills them (which the nodes' missing-model messages print).

It follows ComfyUI's own rules (``folder_paths`` and ``utils/extra_config.py``): the entries under
that key in the ``extra_model_paths.yaml`` next to its ``main.py`` and in each
``--extra-model-paths-config`` file (``is_default: true`` ones first), then ``models/<name>`` of its
base directory (``--base-directory DIR``, as the desktop app starts it; ``--models-directory``
where that ComfyUI has it), which the pack registers after the yaml files were applied.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

from ..errors import FaceDiffuserError

__all__ = [
    "PACK", "MODEL_FOLDER", "FACENET_FOLDER", "CLIP_EVAL_FOLDER", "FACENET_WEIGHTS", "CLIP_TOKENIZER_FILES",
    "comfyui_model_folders", "desktop_app_config", "find_model", "quote_command", "download_command_line",
]  # fmt: skip

PACK = Path(__file__).absolute().parents[2]  # the pack folder as this module was imported (not resolved)

MODEL_FOLDER = "facediffuser"  # the pack's model folder names (nodes/__init__.py registers them)
FACENET_FOLDER = "facenet"
CLIP_EVAL_FOLDER = "clip_eval"
FACENET_WEIGHTS = "20180402-114759-vggface2.pt"  # FaceNet VGGFace2 as facenet-pytorch publishes it, in FACENET_FOLDER
CLIP_TOKENIZER_FILES = ("vocab.json", "merges.txt")  # next to a CLIP model in CLIP_EVAL_FOLDER


def _add(paths: list[Path], path: Path, is_default: bool) -> None:
    """``folder_paths.add_model_folder_path``: a default path goes (or moves) first, others last."""
    if path in paths:
        if is_default:
            paths.remove(path)
            paths.insert(0, path)
    elif is_default:
        paths.insert(0, path)
    else:
        paths.append(path)


def _yaml_folders(config: Path, name: str) -> list[tuple[Path, bool]]:
    """The ``name`` folders an extra_model_paths.yaml adds, with each section's ``is_default``."""
    import yaml  # PyYAML: a requirement of ComfyUI and of transformers

    try:
        sections = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise FaceDiffuserError(f"{config}: cannot read it as ComfyUI's extra_model_paths.yaml ({error})") from None
    folders = []
    for section in sections.values():
        if not isinstance(section, dict) or not isinstance(section.get(name), str):
            continue
        base = section.get("base_path")
        if base:
            base = Path(os.path.expandvars(os.path.expanduser(str(base))))
            base = base if base.is_absolute() else config.parent.absolute() / base
        for entry in filter(None, section[name].split("\n")):
            path = Path(base) / entry if base else Path(entry) if Path(entry).is_absolute() else config.parent.absolute() / entry
            folders.append((Path(os.path.normpath(path)), bool(section.get("is_default", False))))
    return folders


def desktop_app_config(platform: str = sys.platform, environ: Optional[Mapping[str, str]] = None, home: Optional[Path] = None) -> Path:
    """The desktop app's ``extra_models_config.yaml`` (in its settings folder, Electron's userData:
    ``%APPDATA%\\ComfyUI`` on Windows, ``~/Library/Application Support/ComfyUI`` on macOS,
    ``$XDG_CONFIG_HOME/ComfyUI`` or ``~/.config/ComfyUI`` elsewhere), which the app passes to its
    ComfyUI as ``--extra-model-paths-config``. It may not exist."""
    environ = os.environ if environ is None else environ
    home = Path.home() if home is None else home
    if platform == "win32":
        settings = Path(environ["APPDATA"]) if environ.get("APPDATA") else home / "AppData" / "Roaming"
    elif platform == "darwin":
        settings = home / "Library" / "Application Support"
    else:
        settings = Path(environ["XDG_CONFIG_HOME"]) if environ.get("XDG_CONFIG_HOME") else home / ".config"
    return settings / "ComfyUI" / "extra_models_config.yaml"


def comfyui_model_folders(comfyui: Path, comfyui_args: Sequence[str] = (), name: str = MODEL_FOLDER) -> list[Path]:
    """The folders, in search order, where the ComfyUI at ``comfyui`` started with ``comfyui_args``
    looks for models of the folder ``name``."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--base-directory")
    options.add_argument("--models-directory")
    options.add_argument("--extra-model-paths-config", nargs="+", action="append", default=[])
    known, _ = options.parse_known_args(list(comfyui_args))
    root = Path(os.path.realpath(comfyui))
    configs = [root / "extra_model_paths.yaml"] if (root / "extra_model_paths.yaml").is_file() else []
    configs += [Path(path) for group in known.extra_model_paths_config for path in group]
    paths: list[Path] = []
    for config in configs:
        for path, is_default in _yaml_folders(config, name):
            _add(paths, path, is_default)
    base = Path(os.path.abspath(known.base_directory)) if known.base_directory else root
    models = Path(os.path.abspath(known.models_directory)) if known.models_directory else base / "models"
    _add(paths, models / name, False)
    return paths


def find_model(folders: Sequence[Path], file: str) -> Path | None:
    """The first ``folder/file`` that exists, as ComfyUI picks it, else None."""
    return next((folder / file for folder in folders if (folder / file).is_file()), None)


def quote_command(args: Sequence[str], platform: str = sys.platform) -> str:
    """``args`` as one command line to paste into the platform's shell: double quotes where needed on
    Windows (cmd and PowerShell), POSIX shell quoting elsewhere."""
    return subprocess.list2cmdline(list(args)) if platform == "win32" else shlex.join(args)


def download_command_line(flags: Sequence[str] = (), to: Optional[Path] = None, comfyui: Optional[Path] = None, python: str = sys.executable) -> str:
    """The ``download`` command with ``flags`` (e.g. ``--scores``), writing to ``to`` or into the
    model folders of ``comfyui``, run by ``python`` (the running interpreter: ComfyUI's, e.g.
    ``python_embeded\\python.exe`` on the Windows portable build) through the pack's ``cli.py`` (so it
    works from any folder, and where the working directory is not on ``sys.path``), quoted for this
    platform's shell."""
    where = ["--to", str(to)] if to else ["--comfyui", str(comfyui)] if comfyui else []
    return quote_command([python, str(PACK / "cli.py"), "download", *flags, *where])
