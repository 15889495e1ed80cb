"""Pieces shared by the Face-diffuser nodes: model folders, the workflows' example inputs, the category,
error wording, progress, and small models kept under ComfyUI's model management."""

from __future__ import annotations

import functools
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, TypeVar

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch

from ..facediffuser_core.errors import FaceDiffuserError
from ..facediffuser_core.weights.model_folders import MODEL_FOLDER, download_command_line

CATEGORY = "Face-diffuser"
EXAMPLE_INPUTS = Path(__file__).resolve().parents[1] / "workflows" / "inputs"  # the portraits, pose and park the shipped workflows load
T = TypeVar("T")


def register_model_folder(name: str = MODEL_FOLDER, extensions: Iterable[str] = folder_paths.supported_pt_extensions) -> None:
    """Register ``models/<name>`` for model files with ``extensions``, keeping any
    extra_model_paths.yaml entries for that name.

    The yaml is applied before packs import; ``add_model_folder_path`` would then leave an empty
    extension set (which lists every file), so the set is filled in explicitly.
    """
    folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))
    paths, known = folder_paths.folder_names_and_paths[name]
    if not known:
        folder_paths.folder_names_and_paths[name] = (paths, set(extensions))


def add_example_inputs(input_directory: Optional[str] = None) -> list[str]:
    """Copy the shipped workflows' example pictures (two drawn portraits, a two-person pose, a park) into
    ComfyUI's input folder (``input_directory``, default ComfyUI's), each only where no file of that
    name is there yet, so that a template opened from the template browser runs as it is; a user's own
    file of that name is never replaced. Returns the names copied. A folder it cannot write to is
    logged, not raised: the pack still loads."""
    target = Path(input_directory or folder_paths.get_input_directory())
    copied = []
    for source in sorted(EXAMPLE_INPUTS.glob("*.png")):
        if (target / source.name).exists():
            continue
        try:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target / source.name)
        except OSError as error:
            logging.warning("Face-diffuser: could not copy the example input %s into %s (%s); the shipped workflows need it there", source.name, target, error)
            continue
        copied.append(source.name)
    return copied


def missing_model(node: str, folder: str, name: Optional[str], flags: Sequence[str] = ()) -> Optional[str]:
    """A ``validate_inputs`` message for a model file ``name`` that is not in ComfyUI's ``folder``
    (it names the folders searched and the exact ``download`` command that fills the first one with
    the official files: ``flags`` pick them); None when the file is there (or the input is linked)."""
    if name is None or name in folder_paths.get_filename_list(folder):
        return None
    folders = folder_paths.get_folder_paths(folder)
    what = f"there is no file '{name}'" if name else "no model file was picked"
    command = download_command_line(flags, to=Path(folders[0]))
    return (
        f"{node}: {what} in models/{folder} ({', '.join(folders)}). Download the official files with: "
        f"{command}   then press R in the web UI to refresh the lists."
    )


@contextmanager
def errors_named(node: str) -> Iterator[None]:
    """Re-raise the core's user-facing errors with the node's display name in front."""
    try:
        yield
    except FaceDiffuserError as error:
        raise type(error)(f"{node}: {error}") from None


def progress(total: int) -> Callable[[int, int], None]:
    """A core ``progress(done, total)`` callback: ComfyUI's progress bar, and Cancel between images."""
    bar = comfy.utils.ProgressBar(total)

    def update(done: int, count: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, count)

    return update


def cached_by_file(load: Callable[[str], T]) -> Callable[[str], T]:
    """``load(path)`` memoised for the latest path; a file changed on disk is loaded again."""

    @functools.lru_cache(maxsize=1)
    def cached(path: str, stamp: int) -> T:
        return load(path)

    return lambda path: cached(path, os.stat(path).st_mtime_ns)


class _Holder(torch.nn.Module):
    """A plain module around the model: ModelPatcher sets ``.device`` on what it manages, which
    transformers models do not allow."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner


def auxiliary_model(module: torch.nn.Module, dtype: Optional[torch.dtype] = None) -> comfy.model_patcher.ModelPatcher:
    """A model under ComfyUI's model management, as the text encoders are: kept on the offload device
    and moved to the text-encoder device only while it runs (see :func:`loaded`). ``dtype`` defaults
    to the text encoders' 16-bit dtype on a GPU and float32 on a CPU."""
    load_device, offload_device = mm.text_encoder_device(), mm.text_encoder_offload_device()
    if dtype is None:
        dtype = torch.float32 if mm.is_device_cpu(load_device) else mm.text_encoder_dtype(load_device)
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):  # fp8 text encoders
            dtype = torch.float16
    holder = _Holder(module.to(device=offload_device, dtype=dtype).eval())
    return comfy.model_patcher.ModelPatcher(holder, load_device=load_device, offload_device=offload_device)


def loaded(patcher: comfy.model_patcher.ModelPatcher) -> torch.nn.Module:
    """The model of an :func:`auxiliary_model`, moved to its load device (freeing memory as ComfyUI does)."""
    mm.load_model_gpu(patcher)
    return patcher.model.inner
