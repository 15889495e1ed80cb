"""Face-diffuser Regions: a region (MASK) per person, in marker order, from a layout, and its preview."""

from __future__ import annotations

from typing import Any, Optional

import torch
from comfy_api.latest import io, ui

from ..facediffuser_core.errors import RegionError
from ..facediffuser_core.method.pose import DEFAULT_MARGIN, pose_array, pose_backdrop
from ..facediffuser_core.method.prompt import MARKER, MAX_SUBJECTS
from ..facediffuser_core.method.regions import LAYOUTS, layout_masks, marked_words, picture_size, region_preview, regions_union
from .common import CATEGORY, errors_named

NAME = "Face-diffuser Regions"
UNION_NAME = "Face-diffuser Regions Union"
DEFAULT_BOXES = "0, 0, 0.5, 1; 0.5, 0, 1, 1"


def regions(width: int, height: int, people: int, layout: str, boxes: str, prompt: str, pose: Optional[torch.Tensor] = None, margin: float = DEFAULT_MARGIN) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(masks [people, height, width], preview [1, height, width, 3])``; the preview labels each
    region with its marked word when ``prompt`` is given (its markers must number ``people``) and, with
    layout pose, shows the pose under the regions."""
    words = marked_words(prompt) if prompt.strip() else ()
    if prompt.strip() and len(words) != people:
        raise RegionError(f"the prompt has {len(words)} {MARKER} marker(s) but people is {people}; set people to the number of markers")
    if layout == "pose" and pose is not None:
        pose = pose_array(pose)  # once, for the boxes and the preview's backdrop
    masks = layout_masks(width, height, people, layout, boxes, pose, margin)
    return masks, region_preview(masks, words, pose_backdrop(pose, width, height) if layout == "pose" else None)


class FaceDiffuserRegions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceDiffuserRegions",
            display_name=NAME,
            category=CATEGORY,
            description=f"Where each person of the prompt goes: one region (MASK) per {MARKER} marker, in marker order, "
            "for Subject Encode's masks. Side by side in columns, one box per person as fractions of the width and "
            "height, or from a pose image: one box around each skeleton of an OpenPose render, left to right in marker order. The preview shows each region in its own colour with its marker number and word. Painted masks "
            "(the mask editor, any MASK node) work the same way. Connect size_from to take the picture's size from its latent or image.",
            inputs=[
                io.Int.Input("width", default=512, min=8, max=16384, step=8, tooltip="Width of the masks in pixels: the picture's width (any size of the same aspect ratio works). Ignored when size_from is connected."),
                io.Int.Input("height", default=512, min=8, max=16384, step=8, tooltip="Height of the masks in pixels: the picture's height. Ignored when size_from is connected."),
                io.Int.Input("people", default=2, min=1, max=MAX_SUBJECTS, tooltip=f"How many people: one region per {MARKER} marker of the prompt."),
                io.Combo.Input(
                    "layout",
                    options=list(LAYOUTS),
                    default=LAYOUTS[0],
                    tooltip="columns: the people side by side in equal columns, the first marker on the left. "
                    "boxes: each person's region is the box given in boxes. "
                    "pose: each person's region is the box around one skeleton of the pose image, the leftmost skeleton for the first marker "
                    "(the image must show one skeleton per person). Each layout ignores the other layouts' inputs.",
                ),
                io.String.Input(
                    "boxes",
                    multiline=True,
                    default=DEFAULT_BOXES,
                    tooltip="With layout boxes: one box per person in marker order, separated by ';' or new lines, each "
                    "x0, y0, x1, y1 as fractions of the width and height (0, 0 is the top left; 0.5, 0, 1, 1 is the right half). Boxes may overlap.",
                ),
                io.String.Input(
                    "prompt",
                    optional=True,
                    multiline=True,
                    default="",
                    tooltip=f"Optional: the prompt with its {MARKER} markers (the same as Subject Encode's), to label each region with its marked word in the preview.",
                ),
                io.Image.Input(
                    "pose",
                    optional=True,
                    tooltip="With layout pose: an OpenPose render (coloured skeletons on black, as ComfyUI's pose preprocessors and pose "
                    "editors draw them; the same image as the pose ControlNet's), of the picture's aspect ratio.",
                ),
                io.Float.Input(
                    "margin",
                    optional=True,
                    default=DEFAULT_MARGIN,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="With layout pose: how far each region reaches past its skeleton's box, as a fraction of the box's width "
                    "(left and right) and height (top and bottom). The skeleton's head is a dot: leave room for hair.",
                ),
                io.MultiType.Input(
                    "size_from",
                    types=[io.Latent, io.Image],
                    optional=True,
                    tooltip="Optional: the picture itself, a LATENT (the Empty Latent Image, a VAE Encode) or an IMAGE (a Load Image, the pose): "
                    "the masks take its size (a latent's width and height times 8) and width and height are ignored, so the masks always fit the picture.",
                ),
            ],
            outputs=[
                io.Mask.Output("masks", display_name="masks", tooltip="One region per person in marker order (white inside): into Subject Encode's masks."),
                io.Image.Output("preview", display_name="preview", tooltip="The regions, each tinted in its own colour and labelled with its marker number and word: into Preview Image."),
            ],
        )

    @classmethod
    def execute(
        cls, width: int, height: int, people: int, layout: str, boxes: str, prompt: str = "", pose: Optional[torch.Tensor] = None, margin: float = DEFAULT_MARGIN, size_from: Optional[Any] = None
    ) -> io.NodeOutput:
        with errors_named(NAME):
            if size_from is not None:
                width, height = picture_size(size_from)
            masks, preview = regions(width, height, people, layout, boxes, prompt, pose, margin)
        # the preview also goes to the web UI (the node's onExecuted: its image, the box editor's backdrop)
        return io.NodeOutput(masks, preview, ui=ui.PreviewImage(preview, cls=cls))


class FaceDiffuserRegionsUnion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceDiffuserRegionsUnion",
            display_name=UNION_NAME,
            category=CATEGORY,
            description="One mask of everywhere any person's region is (the union of a MASK batch), e.g. into Set Latent Noise Mask "
            "so that only the people's regions of your own picture are repainted and the rest is kept.",
            inputs=[io.Mask.Input("masks", tooltip="The people's regions: Face-diffuser Regions' masks (or any MASK batch).")],
            outputs=[io.Mask.Output("mask", display_name="mask", tooltip="One mask [1,H,W]: 1 wherever any region is (the largest value at each pixel).")],
        )

    @classmethod
    def execute(cls, masks: torch.Tensor) -> io.NodeOutput:
        with errors_named(UNION_NAME):
            return io.NodeOutput(regions_union(masks))
