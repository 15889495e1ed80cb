"""Headless core of the Face-diffuser node pack (no ComfyUI imports anywhere in this package).

Modules: ``snf`` (Saliency-adaptive Noise Fusion), ``schedule`` (stages), ``guidance``
(per-stage noise prediction), ``sampler`` (reference DDIM sampler), ``prompt`` (``<|image|>``
parsing), ``postfuse`` / ``preprocess`` / ``subject_encoder`` / ``subjects`` (subject conditioning,
several photos per subject), ``checkpoints`` / ``convert`` (model files), ``faces`` (face detection
and crops), ``identity`` / ``consistency`` (the paper's IP and PC scores), ``generate`` and
``evaluate`` (the commands, with ``comfy_client``: graphs and ComfyUI's HTTP/websocket API,
``comfy_launch``: a headless ComfyUI for one run, and ``report``).
"""

from .errors import (
    CheckpointError,
    FaceDiffuserError,
    PromptError,
    ReferenceImageError,
    SamplingCancelled,
    StageError,
)
from .schedule import Stage, StageBounds, bounds_from_fractions, stage_at, step_index
from .snf import fuse_noise, saliency_map

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
