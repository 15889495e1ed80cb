"""Several reference photos per subject: which photos belong to which ``<|image|>`` marker, and how
one subject's image embeddings combine into the single embedding the postfuse MLP fuses into its word.

The official method embeds one photo per subject: CLIP ViT-L/14's projected image embedding
([D], D = 768) goes with the marked word's text embedding into the postfuse MLP. With several photos
each photo is embedded alone, and the subject's embeddings are combined here, before the MLP, so the
MLP still sees one [D] image embedding per subject, as in training.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..errors import ReferenceImageError
from .prompt import MARKER

__all__ = [
    "COMBINE_MODES",
    "DEFAULT_COMBINE",
    "Subject",
    "References",
    "combine_embeddings",
    "marker_label",
    "check_count",
    "check_subjects",
    "people_references",
    "photos_of",
]

COMBINE_MODES = ("average", "norm average")
DEFAULT_COMBINE = "average"


@dataclass(frozen=True)
class Subject:
    """One subject's reference photos: ComfyUI IMAGE batches [N,H,W,C] in 0..1 whose sizes may differ
    from batch to batch, ``names`` labelling each batch in messages (e.g. the input it came from),
    ``combine``, one of :data:`COMBINE_MODES`, and ``mask``, the person's region (a MASK [1,H,W]) or None."""

    photos: tuple[torch.Tensor, ...]
    names: tuple[str, ...]
    combine: str = DEFAULT_COMBINE
    mask: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.combine not in COMBINE_MODES:
            raise ReferenceImageError(f"combine must be one of {', '.join(COMBINE_MODES)}, got '{self.combine}'")
        if len(self.names) != len(self.photos):
            raise ValueError(f"{len(self.photos)} photo batches with {len(self.names)} names")
        for name, batch in zip(self.names, self.photos):
            if batch.ndim != 4:
                raise ReferenceImageError(f"the photos in {name} must be an IMAGE batch [N,H,W,C], got {tuple(batch.shape)}")

    @property
    def count(self) -> int:
        """How many photos the subject has."""
        return sum(batch.shape[0] for batch in self.photos)

    def to(self, device: Union[torch.device, str]) -> "Subject":
        return dataclasses.replace(self, photos=tuple(batch.to(device) for batch in self.photos))


References = Union[torch.Tensor, Sequence[Subject]]
"""A ComfyUI IMAGE [S,H,W,C] (image i is the subject of marker i), or S :class:`Subject` in marker order."""


def combine_embeddings(embeds: torch.Tensor, mode: str = DEFAULT_COMBINE) -> torch.Tensor:
    """One subject's [N, D] image embeddings -> [D], in ``embeds``' dtype (computed in float32 or wider).

    ``average``: the mean. ``norm average``: the mean of the unit-length embeddings e_i / |e_i|,
    scaled to the mean length of the e_i (a plain mean is shorter than its inputs when the photos
    differ; this keeps a single photo's length, as the postfuse MLP saw in training). One photo: its
    embedding, bit for bit.
    """
    if embeds.ndim != 2 or embeds.shape[0] == 0:
        raise ValueError(f"embeds must be [N, D] with N >= 1, got {tuple(embeds.shape)}")
    if mode not in COMBINE_MODES:
        raise ValueError(f"mode must be one of {COMBINE_MODES}, got '{mode}'")
    if embeds.shape[0] == 1:
        return embeds[0]
    wide = embeds.to(torch.promote_types(embeds.dtype, torch.float32))
    if mode == "average":
        combined = wide.mean(dim=0)
    else:
        direction = F.normalize(F.normalize(wide, dim=-1).mean(dim=0), dim=0)
        combined = direction * wide.norm(dim=-1).mean()
    return combined.to(embeds.dtype)


def marker_label(index: int, words: Optional[Sequence[str]] = None) -> str:
    """``marker 2 ('woman')`` for index 1 (``marker 2`` without words)."""
    return f"marker {index + 1} ('{words[index]}')" if words else f"marker {index + 1}"


def check_count(given: int, markers: int, unit: str, words: Optional[Sequence[str]] = None) -> None:
    """One ``unit`` (reference image, subject) per marker, or an error naming the first marker
    without one, or the first ``unit`` without a marker."""
    if given < markers:
        raise ReferenceImageError(
            f"{marker_label(given, words)} has no photo: the prompt marks {markers} subject(s) with {MARKER} but "
            f"{given} {unit}(s) were given; give one {unit} per marker, in marker order"
        )
    if given > markers:
        marked = ", ".join(marker_label(i, words) for i in range(markers)) or "none"
        raise ReferenceImageError(
            f"{given} {unit}(s) were given but the prompt marks only {markers} subject(s) with {MARKER} ({marked}): "
            f"{unit} {markers + 1} has no marker; put {MARKER} after its class word in the prompt, or remove it"
        )


def check_subjects(subjects: Sequence[Subject], markers: int, words: Optional[Sequence[str]] = None) -> None:
    """One subject per marker, each batch of its photos non-empty; errors name the marker."""
    check_count(len(subjects), markers, "subject", words)
    for index, subject in enumerate(subjects):
        if not subject.photos:
            raise ReferenceImageError(f"{marker_label(index, words)} has no photo: its subject has no photo batch; connect at least one photo")
        for name, batch in zip(subject.names, subject.photos):
            if batch.shape[0] == 0:
                raise ReferenceImageError(
                    f"{marker_label(index, words)}: the photos in {name} are an empty batch (0 images); "
                    "connect at least one photo there, or disconnect it"
                )


def people_references(references: References, words: Sequence[str]) -> list[References]:
    """Each marker's own References (an IMAGE [1,H,W,C] or one Subject, without its region mask: each
    person is alone in its references), checked as the subject encoder checks them: one person per
    marker, each with a photo."""
    if isinstance(references, torch.Tensor):
        check_count(references.shape[0], len(words), "reference image", words)
        return [references[index : index + 1] for index in range(len(words))]
    check_subjects(references, len(words), words)
    return [(dataclasses.replace(subject, mask=None),) for subject in references]


def photos_of(person: References) -> list[torch.Tensor]:
    """Every photo batch of References: the IMAGE itself, or each Subject's batches in order."""
    return [person] if isinstance(person, torch.Tensor) else [batch for subject in person for batch in subject.photos]
