"""Headless core of the Face-diffuser node pack (no ComfyUI imports anywhere in this package).

Four wings (``errors`` is shared by all): ``method`` and ``weights`` import no other wing, ``faces``
may import those two, and ``commands`` any; the nodes import no command module.

- ``method``: the algorithm (prompt parsing, subject encoder and postfuse, stages, SNF, guidance,
  the reference sampler, regions, pose boxes);
- ``weights``: checkpoints, their conversion, model folders and the download command line;
- ``faces``: face detection and crops, identity and prompt-consistency scores, the detailer's matching;
- ``commands``: ``generate``, ``evaluate``, ``download`` and the ComfyUI client and launcher behind
  them (``python -m facediffuser_core``, ``__main__``).

``tests/test_architecture.py`` checks these rules by reading the imports.
"""

from .errors import (
    CheckpointError,
    FaceDiffuserError,
    PromptError,
    ReferenceImageError,
    SamplingCancelled,
    StageError,
)
from .method.schedule import Stage, StageBounds, bounds_from_fractions, stage_at, step_index
from .method.snf import fuse_noise, saliency_map

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "FaceDiffuserError",
    "PromptError",
    "ReferenceImageError",
    "SamplingCancelled",
    "StageError",
    "Stage",
    "StageBounds",
    "bounds_from_fractions",
    "stage_at",
    "step_index",
    "fuse_noise",
    "saliency_map",
]
