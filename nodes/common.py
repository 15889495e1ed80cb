"""Pieces shared by the Face-diffuser nodes: the model folder, the category, error wording."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import folder_paths

from ..facediffuser_core.errors import FaceDiffuserError

CATEGORY = "Face-diffuser"
MODEL_FOLDER = "facediffuser"


def register_model_folder() -> None:
    """Register ``models/facediffuser`` for model files, keeping any extra_model_paths.yaml entries.

    The yaml is applied before packs import; ``add_model_folder_path`` would then leave an empty
    extension set (which lists every file), so the set is filled in explicitly.
    """
    default = os.path.join(folder_paths.models_dir, MODEL_FOLDER)
    folder_paths.add_model_folder_path(MODEL_FOLDER, default)
    paths, extensions = folder_paths.folder_names_and_paths[MODEL_FOLDER]
    if not extensions:
        folder_paths.folder_names_and_paths[MODEL_FOLDER] = (paths, set(folder_paths.supported_pt_extensions))


@contextmanager
def errors_named(node: str) -> Iterator[None]:
    """Re-raise the core's user-facing errors with the node's display name in front."""
    try:
        yield
    except FaceDiffuserError as error:
        raise type(error)(f"{node}: {error}") from None
