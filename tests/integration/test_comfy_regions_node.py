"""Face-diffuser Regions inside an imported ComfyUI (no models): its outputs are the core's masks and
preview, as ComfyUI's MASK and IMAGE types, and its errors name the node and the fix."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from PIL import Image

from facediffuser_core.method.pose import pose_backdrop
from facediffuser_core.method.regions import layout_masks, region_preview
from paths import ROOT

POSE = ROOT / "workflows" / "inputs" / "pose_two_people.png"  # two skeletons, one in each half


def pose_image() -> torch.Tensor:
    """The shipped pose image as LoadImage gives it: IMAGE [1,H,W,3] in 0..1."""
    return torch.from_numpy(np.asarray(Image.open(POSE).convert("RGB"), dtype=np.float32) / 255.0)[None]


def run(comfy, **inputs):
    """The node's outputs for ``inputs`` (``comfy``: the pack imported inside ComfyUI)."""
    node = importlib.import_module("facediffuser_pack.nodes.regions").FaceDiffuserRegions
    values = {"width": 96, "height": 64, "people": 2, "layout": "columns", "boxes": "", **inputs}
    return node.execute(**values).args


def test_regions_node_outputs_the_core_masks_and_labelled_preview(comfy):
    masks, preview = run(comfy, layout="boxes", boxes="0,0,0.6,1; 0.4,0,1,1", prompt="a man <|image|> hugs a woman <|image|>")
    expected = layout_masks(96, 64, 2, "boxes", "0,0,0.6,1; 0.4,0,1,1")
    assert torch.equal(masks, expected) and masks.shape == (2, 64, 96)  # MASK: [N,H,W]
    assert torch.equal(preview, region_preview(expected, ("man", "woman"))) and preview.shape == (1, 64, 96, 3)  # IMAGE: [1,H,W,3]
    assert not torch.equal(preview, region_preview(expected))  # the words are drawn
    columns, _ = run(comfy, boxes="not used with columns")
    assert torch.equal(columns, layout_masks(96, 64, 2, "columns"))


def test_regions_node_boxes_each_skeleton_of_a_pose_and_previews_over_it(comfy):
    pose = pose_image()
    masks, preview = run(comfy, layout="pose", pose=pose, margin=0.2, width=256, height=256, boxes="not used with pose")
    expected = layout_masks(256, 256, 2, "pose", pose=pose, margin=0.2)
    assert torch.equal(masks, expected) and masks.shape == (2, 256, 256)
    left, right = (mask.nonzero(as_tuple=True)[1] for mask in masks)
    assert left.max() < 128 <= right.min()  # the left skeleton is the first marker's
    assert torch.equal(preview, region_preview(expected, (), pose_backdrop(pose, 256, 256)))
    wider, _ = run(comfy, layout="pose", pose=pose, width=256, height=256)  # the default margin, 0.1
    assert wider.sum() < masks.sum()
    columns, _ = run(comfy, pose=pose)  # columns ignores a connected pose
    assert torch.equal(columns, layout_masks(96, 64, 2, "columns"))


EXAMPLE = "e.g. '0,0,0.5,1; 0.5,0,1,1'"


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"layout": "boxes", "boxes": "0,0,1"}, f"box 1 '0,0,1' is not four numbers x0,y0,x1,y1; write one box per person as fractions, {EXAMPLE}"),
        ({"layout": "boxes", "boxes": "   "}, f"boxes is empty; give one box per person as fractions x0,y0,x1,y1 separated by ';', {EXAMPLE}"),
        ({"layout": "boxes", "boxes": "0,0,1,1"}, "boxes gives 1 box(es) but people is 2; give one box per person, in marker order, separated by ';'"),
        ({"layout": "boxes", "boxes": "0,0,0.5,1; 0.5,0,1.2,1"}, "box 2 (0.5,0,1.2,1) reaches outside 0..1; give fractions of the width and height between 0 and 1"),
        ({"layout": "boxes", "boxes": "0,0,0.5,1; 0.5,1,1,0"}, "box 2 (0.5,1,1,0) is empty: x0 must be below x1 and y0 below y1 (x0,y0 is the top-left corner)"),
        ({"layout": "boxes", "boxes": "0,0,0.5,1; 0.5,0,0.505,1"}, "box 2 (0.5,0,0.505,1) covers no pixel of a 96x64 picture; make it larger"),
        ({"prompt": "a man <|image|> in a park"}, "the prompt has 1 <|image|> marker(s) but people is 2; set people to the number of markers"),
        ({"layout": "pose"}, "layout pose needs a pose image: connect an OpenPose render (coloured skeletons on black) to pose"),
        (
            {"layout": "pose", "people": 3, "pose": pose_image()},
            "the pose image has 2 skeleton(s) for 3 people (one per <|image|> marker); draw one skeleton per person, left to right in marker order, or give the regions another way",
        ),
        (
            {"layout": "pose", "pose": torch.zeros(2, 64, 96, 3)},
            "the pose input is a batch of 2 images; give one pose image (all people in one picture)",
        ),
    ],
)
def test_regions_node_errors_name_the_node_and_the_fix(comfy, inputs, message):
    """The whole message: the node, what is wrong and the fix (which input, what it needs)."""
    with pytest.raises(ValueError) as error:
        run(comfy, **inputs)
    assert str(error.value) == f"Face-diffuser Regions: {message}"
