"""Face-diffuser Regions inside an imported ComfyUI (no models): its outputs are the core's masks and
preview, as ComfyUI's MASK and IMAGE types, the preview also goes to the web UI, size_from gives the
masks the size of a LATENT or an IMAGE (in-process and through a server's validation of both links),
and its errors name the node and the fix."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness import status_message
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


def test_regions_node_sends_its_preview_to_the_web_ui(comfy):
    """The UI part of the output (the node's onExecuted in the web UI: the box editor's backdrop) is
    the preview output, saved as a temp PNG."""
    import folder_paths

    output = importlib.import_module("facediffuser_pack.nodes.regions").FaceDiffuserRegions.execute(
        width=96, height=64, people=2, layout="columns", boxes="", prompt="a man <|image|> and a woman <|image|>"
    )
    masks, preview = output.args
    (saved,) = output.ui.as_dict()["images"]
    assert saved["type"] == "temp"
    path = Path(folder_paths.get_temp_directory()) / saved["subfolder"] / saved["filename"]
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.round(preview[0].numpy() * 255).astype(np.uint8))


def test_size_from_a_latent_or_an_image_sets_the_masks_size_and_ignores_width_and_height(comfy):
    boxes = "0,0,0.6,1; 0.4,0,1,1"
    latent = {"samples": torch.zeros(1, 4, 448 // 8, 640 // 8)}  # EmptyLatentImage width 640, height 448
    masks, preview = run(comfy, layout="boxes", boxes=boxes, size_from=latent)  # width 96, height 64 ignored
    assert masks.shape == (2, 448, 640) and preview.shape == (1, 448, 640, 3)
    assert torch.equal(masks, layout_masks(640, 448, 2, "boxes", boxes))
    masks, _ = run(comfy, layout="boxes", boxes=boxes, size_from={"samples": torch.zeros(2, 4, 40, 64)})
    assert torch.equal(masks, layout_masks(512, 320, 2, "boxes", boxes))  # another latent: other masks, same node inputs
    image = torch.zeros(1, 300, 200, 3)  # an IMAGE [B,H,W,3] of any size
    masks, preview = run(comfy, size_from=image)
    assert torch.equal(masks, layout_masks(200, 300, 2, "columns")) and preview.shape == (1, 300, 200, 3)
    pose = pose_image()  # the pose both gives the boxes and the size
    masks, preview = run(comfy, layout="pose", pose=pose, size_from=pose)
    height, width = pose.shape[1:3]
    assert torch.equal(masks, layout_masks(width, height, 2, "pose", pose=pose))
    assert torch.equal(preview, region_preview(masks, (), pose_backdrop(pose, width, height)))
    unconnected, _ = run(comfy, size_from=None)  # bit for bit the node without size_from
    assert torch.equal(unconnected, layout_masks(96, 64, 2, "columns"))


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
            {"size_from": torch.zeros(64, 96)},
            "size_from got a Tensor of shape [64, 96]; connect a LATENT (e.g. the Empty Latent Image) or an IMAGE (e.g. a Load Image), or leave it unconnected and set width and height",
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


def size_graph(source: dict, width: int = 512, height: int = 512) -> dict:
    """``source`` (a node giving a LATENT or an IMAGE at output 0) into the Regions node's size_from,
    its masks previewed (MaskToImage -> PreviewImage) and its own preview sent to the UI."""
    return {
        "1": source,
        "2": {"class_type": "FaceDiffuserRegions", "inputs": {"width": width, "height": height, "people": 2, "layout": "boxes", "boxes": "0,0,0.6,1; 0.4,0,1,1", "size_from": ["1", 0]}},
        "3": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 0]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }


def sizes(server, graph: dict) -> tuple[tuple, list]:
    """(the Regions node's UI preview's size, the masks' sizes) of a run of ``graph``, as PIL (width, height)."""
    import io

    entry = server.run(graph)
    assert entry["status"]["status_str"] == "success", status_message(entry, "execution_error")
    (preview,) = entry["outputs"]["2"]["images"]
    masks = entry["outputs"]["4"]["images"]
    return Image.open(io.BytesIO(server.view(preview))).size, [Image.open(io.BytesIO(server.view(mask))).size for mask in masks]


def test_server_takes_a_latent_or_an_image_into_size_from(server):
    """The server validates a LATENT and an IMAGE link into size_from (the MultiType input), and the
    masks follow the latent's size: changing the Empty Latent Image changes them, the node untouched."""
    info = server.get("/object_info/FaceDiffuserRegions")["FaceDiffuserRegions"]
    assert info["input"]["optional"]["size_from"][0] == "LATENT,IMAGE"
    latent = {"class_type": "EmptyLatentImage", "inputs": {"width": 640, "height": 448, "batch_size": 1}}
    assert sizes(server, size_graph(latent)) == ((640, 448), [(640, 448), (640, 448)])
    latent["inputs"].update(width=320, height=576)
    assert sizes(server, size_graph(latent)) == ((320, 576), [(320, 576), (320, 576)])
    image = {"class_type": "LoadImage", "inputs": {"image": "blank.png"}}  # 128x128
    assert sizes(server, size_graph(image, width=64, height=32)) == ((128, 128), [(128, 128), (128, 128)])
