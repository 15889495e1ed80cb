"""Exceptions raised by the headless core.

Every error is a ``ValueError`` subclass (or ``RuntimeError`` for cancellation) whose
message says what was wrong and what to change, so a ComfyUI node can re-raise it
with its own name in front and the user knows which input to fix.
"""


class FaceDiffuserError(ValueError):
    """Base class for user-facing input errors."""


class PromptError(FaceDiffuserError):
    """A prompt with ``<|image|>`` markers that cannot be parsed."""


class StageError(FaceDiffuserError):
    """Invalid stage boundaries (start_merge_step / final_step)."""


class CheckpointError(FaceDiffuserError):
    """A model file that cannot be used: a Face-diffuser SDM or TDM checkpoint, or an evaluation
    model (FaceNet, CLIP)."""


class ReferenceImageError(FaceDiffuserError):
    """Reference images of the wrong shape, channel count or value range, or not one subject per marker."""


class RegionError(FaceDiffuserError):
    """People's region masks that cannot be used: not one per marker, of different sizes, of another
    aspect ratio than the latent, or empty at the latent's resolution; or a layout of regions (a bad
    box, boxes that do not match the people)."""


class FaceNotFoundError(FaceDiffuserError):
    """An image in which the face detector found no face (or not the requested one)."""


class MissingDependencyError(FaceDiffuserError):
    """An optional package a feature needs (facenet-pytorch, matplotlib) is not installed."""


class EvaluationError(FaceDiffuserError):
    """Evaluation-command input that cannot be used (subjects folder, prompt list, workflow, output folder)."""


class SamplingCancelled(RuntimeError):
    """Raised by the sampler when its cancel callback asks it to stop."""
