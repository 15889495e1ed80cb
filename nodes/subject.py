"""Face-diffuser Subject: one person's photos (any sizes), chained in marker order for Subject Encode."""

from __future__ import annotations

from typing import Optional

import torch
from comfy_api.latest import io

from ..facediffuser_core.errors import RegionError
from ..facediffuser_core.method.prompt import MARKER
from ..facediffuser_core.method.subjects import COMBINE_MODES, DEFAULT_COMBINE, Subject
from .common import CATEGORY, errors_named

NAME = "Face-diffuser Subject"
EXTRA_PHOTO_INPUTS = ("images_2", "images_3", "images_4")

SubjectsType = io.Custom("FACEDIFFUSER_SUBJECTS")
"""A tuple of :class:`~facediffuser_core.method.subjects.Subject`, one per marker, in marker order."""


def add_subject(
    previous: Optional[tuple[Subject, ...]], combine: str, photos: dict[str, Optional[torch.Tensor]], mask: Optional[torch.Tensor] = None
) -> tuple[Subject, ...]:
    """``previous`` subjects plus one made of the connected photo inputs (name -> IMAGE or None) and
    its region ``mask`` (a MASK [1,H,W] or [H,W]; None: no region)."""
    marker = len(previous or ()) + 1
    if mask is not None:
        mask = mask[None] if mask.ndim == 2 else mask
        if mask.ndim != 3 or mask.shape[0] != 1:
            raise RegionError(
                f"mask of marker {marker} is a batch of {mask.shape[0] if mask.ndim == 3 else tuple(mask.shape)} masks; a Subject node takes one "
                "person's region: connect a single mask (e.g. pick one with an image/mask batch picker), or give all masks to Subject Encode's masks"
            )
    connected = {f"input {name} of its {NAME} node": batch for name, batch in photos.items() if batch is not None}
    return (*(previous or ()), Subject(tuple(connected.values()), tuple(connected), combine, mask))


class FaceDiffuserSubject(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceDiffuserSubject",
            display_name=NAME,
            category=CATEGORY,
            description=f"One person of the prompt, with one or more photos of any size. Chain one Subject node per "
            f"{MARKER} marker, in marker order: subjects into the next one's previous_subjects (empty on the first), "
            "the last one's subjects into Subject Encode's subjects. The photos' CLIP image embeddings are combined "
            "into one before the postfuse MLP fuses it into the person's word.",
            inputs=[
                io.Image.Input("images", tooltip="Photos of this person (a batch of one or more). Photos of another size go into images_2, images_3, images_4. Crops centred on the face work best."),
                io.Combo.Input(
                    "combine",
                    options=list(COMBINE_MODES),
                    default=DEFAULT_COMBINE,
                    tooltip="How the photos' image embeddings become one: average (their mean), or norm average (the mean "
                    "direction, at the photos' mean length). Both give the photo's own embedding for a single photo.",
                ),
                *(io.Image.Input(name, optional=True, tooltip="More photos of this person, of any size (a batch of one or more).") for name in EXTRA_PHOTO_INPUTS),
                io.Mask.Input(
                    "mask",
                    optional=True,
                    tooltip="Optional: this person's region, one MASK at the image's size; the identity acts only inside it. "
                    "Give every Subject node a mask, or none.",
                ),
                SubjectsType.Input(
                    "previous_subjects",
                    optional=True,
                    tooltip=f"The people of the earlier {MARKER} markers: the subjects output of the previous Face-diffuser Subject. Leave empty for the first marker.",
                ),
            ],
            outputs=[
                SubjectsType.Output(
                    "subjects",
                    display_name="subjects",
                    tooltip="The people so far, in marker order: into the next Face-diffuser Subject, or into Subject Encode's subjects.",
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        images: torch.Tensor,
        combine: str,
        images_2: Optional[torch.Tensor] = None,
        images_3: Optional[torch.Tensor] = None,
        images_4: Optional[torch.Tensor] = None,
        previous_subjects: Optional[tuple[Subject, ...]] = None,
        mask: Optional[torch.Tensor] = None,
    ) -> io.NodeOutput:
        with errors_named(NAME):
            photos = {"images": images, "images_2": images_2, "images_3": images_3, "images_4": images_4}
            return io.NodeOutput(add_subject(previous_subjects, combine, photos, mask))
