"""Regions from an OpenPose render: skeletons the tests draw themselves at known limb coordinates
(so the boxes are known: the keypoints' extent plus the joint radius), found left to right, boxed
with a margin, one mask per person; a count mismatch names both counts; the shipped pose image is
the one tools/draw_pose.py draws and gives two people."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from facediffuser_core.errors import RegionError
from facediffuser_core.method.pose import DEFAULT_MARGIN, PoseError, SkeletonBox, pose_array, pose_backdrop, pose_boxes, skeleton_boxes
from facediffuser_core.method.regions import layout_masks, region_preview
from paths import ROOT

RADIUS = 5  # joint circles: the box of a skeleton reaches this far past its outermost keypoints
LINE = 3  # limb width, thinner than the joints
# keypoints of a stick figure around (0, 0): head, neck, hands, hips, feet (pixels)
FIGURE = [(0, -90), (0, -60), (-40, -60), (-55, 0), (40, -60), (55, 0), (0, 10), (-25, 90), (25, 90)]
LIMBS = [(0, 1), (1, 2), (2, 3), (1, 4), (4, 5), (1, 6), (6, 7), (6, 8)]
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (255, 128, 0), (128, 0, 255), (0, 128, 255)]


def draw(centres: list[tuple[int, int]], size: tuple[int, int], scale: float = 1.0) -> np.ndarray:
    """Figures at ``centres`` on black, as an IMAGE [H,W,3] in 0..1; their keypoints scaled by ``scale``."""
    image = Image.new("RGB", size)
    pen = ImageDraw.Draw(image)
    for cx, cy in centres:
        points = [(cx + scale * x, cy + scale * y) for x, y in FIGURE]
        for (a, b), colour in zip(LIMBS, COLOURS):
            pen.line([points[a], points[b]], fill=tuple(c * 6 // 10 for c in colour), width=LINE)
        for (x, y), colour in zip(points, COLOURS):
            pen.ellipse((x - RADIUS, y - RADIUS, x + RADIUS, y + RADIUS), fill=colour)
    return np.asarray(image, dtype=np.float32) / 255.0


def regions_from_pose(pose, people: int, margin: float = DEFAULT_MARGIN) -> torch.Tensor:
    """The pose layout's masks at the pose image's own size."""
    shape = np.asarray(pose).shape
    height, width = shape[-3:-1] if len(shape) >= 3 else (1, 1)  # a wrong shape: the error comes from the layout
    return layout_masks(width, height, people, "pose", pose=pose, margin=margin)


def expected_box(cx: int, cy: int, scale: float = 1.0) -> SkeletonBox:
    xs, ys = [cx + scale * x for x, _ in FIGURE], [cy + scale * y for _, y in FIGURE]
    return SkeletonBox(round(min(xs) - RADIUS), round(min(ys) - RADIUS), round(max(xs) + RADIUS) + 1, round(max(ys) + RADIUS) + 1)


def assert_near(found: SkeletonBox, expected: SkeletonBox, tolerance: int = 1) -> None:
    """Equal to a pixel: PIL's circle edges round either way."""
    for name in ("left", "top", "right", "bottom"):
        assert abs(getattr(found, name) - getattr(expected, name)) <= tolerance, (name, found, expected)


@pytest.mark.parametrize(
    "centres, size",
    [
        ([(150, 200), (360, 210)], (512, 400)),  # two people
        ([(120, 150), (300, 160), (470, 140)], (600, 320)),  # three people
    ],
)
def test_skeletons_are_boxed_left_to_right(centres, size):
    shuffled = centres[::-1]  # drawing order does not matter
    boxes = skeleton_boxes(draw(shuffled, size))
    assert len(boxes) == len(centres)
    for box, (cx, cy) in zip(boxes, centres):
        assert_near(box, expected_box(cx, cy))


def test_masks_are_the_boxes_widened_by_the_margin_in_marker_order():
    centres, size = [(100, 150), (260, 140), (420, 160)], (520, 300)
    pose = torch.from_numpy(draw(centres, size))[None]  # a ComfyUI IMAGE batch of one
    masks = regions_from_pose(pose, 3, margin=0.25)
    assert masks.shape == (3, size[1], size[0]) and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    for mask, (cx, cy) in zip(masks, centres):
        box = expected_box(cx, cy)
        dx, dy = 0.25 * (box.right - box.left), 0.25 * (box.bottom - box.top)
        rows, columns = mask.nonzero(as_tuple=True)
        assert abs(columns.min().item() - (box.left - dx)) <= 1.5 and abs(columns.max().item() + 1 - (box.right + dx)) <= 1.5
        assert abs(rows.min().item() - max(0, box.top - dy)) <= 1.5 and abs(rows.max().item() + 1 - min(size[1], box.bottom + dy)) <= 1.5
        assert mask.sum().item() == (columns.max() - columns.min() + 1).item() * (rows.max() - rows.min() + 1).item()  # a filled box


def test_a_margin_is_clipped_at_the_image_border():
    masks = regions_from_pose(draw([(60, 100)], (200, 200)), 1, margin=1.0)
    rows, columns = masks[0].nonzero(as_tuple=True)
    assert columns.min().item() == 0 and rows.min().item() == 0 and rows.max().item() == 199


def test_dots_near_a_skeleton_join_it_and_specks_are_ignored():
    image = (draw([(150, 150), (350, 150)], (500, 300)) * 255).astype(np.uint8)
    pen = Image.fromarray(image)
    draw_on = ImageDraw.Draw(pen)
    for dx in (-6, 0, 6):  # face dots 3 px above the head's circle: joined by the dilation
        draw_on.point((150 + dx, 150 - 90 - RADIUS - 3), fill=(255, 255, 255))
    draw_on.point((480, 290), fill=(255, 255, 255))  # a stray pixel far from both
    boxes = skeleton_boxes(np.asarray(pen, dtype=np.float32) / 255.0)
    assert len(boxes) == 2
    assert boxes[0].top == 150 - 90 - RADIUS - 3  # the dots belong to the left skeleton
    assert_near(boxes[1], expected_box(350, 150))


def test_a_count_mismatch_names_both_counts_and_the_fix():
    fix = "draw one skeleton per person, left to right in marker order, or give the regions another way"
    with pytest.raises(PoseError, match=rf"^the pose image has 3 skeleton\(s\) for 2 people \(one per <\|image\|> marker\); {fix}$"):
        regions_from_pose(draw([(100, 150), (260, 140), (420, 160)], (520, 300)), 2)
    with pytest.raises(PoseError, match=rf"^the pose image has 0 skeleton\(s\) for 1 people \(one per <\|image\|> marker\); {fix}$"):
        regions_from_pose(np.zeros((64, 64, 3), np.float32), 1)


def test_one_pose_image_only():
    with pytest.raises(PoseError, match=r"^the pose input is a batch of 2 images; give one pose image \(all people in one picture\)$"):
        regions_from_pose(torch.zeros(2, 64, 64, 3), 1)
    with pytest.raises(PoseError) as raised:
        regions_from_pose(torch.zeros(64, 64), 1)  # a MASK
    assert str(raised.value) == (
        "the pose image must be an IMAGE [H,W,3] (or [1,H,W,3]), got shape [64, 64]; connect a picture "
        "(e.g. Load Image of an OpenPose render: coloured skeletons on black), not a mask or a latent"
    )


def test_the_shipped_pose_image_is_drawn_by_the_script_and_has_two_people(tmp_path):
    shipped = ROOT / "workflows" / "inputs" / "pose_two_people.png"
    subprocess.run([sys.executable, str(ROOT / "tools" / "draw_pose.py"), "-o", str(tmp_path / "pose.png")], check=True, capture_output=True)
    drawn = np.asarray(Image.open(tmp_path / "pose.png"))
    assert np.array_equal(drawn, np.asarray(Image.open(shipped)))
    masks = regions_from_pose(drawn.astype(np.float32) / 255.0, 2)
    left, right = (mask.nonzero(as_tuple=True)[1] for mask in masks)
    assert left.max() < 256 <= right.min()  # one person on each side


def test_the_regions_scale_with_the_picture():
    """The boxes are fractions of the pose image: at twice its size each mask is the native one's box
    with every edge doubled (to a pixel, the rounding of each edge's centre)."""
    pose = draw([(100, 150), (260, 140)], (400, 300))
    native, double = regions_from_pose(pose, 2), layout_masks(800, 600, 2, "pose", pose=pose)
    for small, large in zip(native, double):
        (rows, columns), (big_rows, big_columns) = small.nonzero(as_tuple=True), large.nonzero(as_tuple=True)
        for edge, big_edge in ((columns.min(), big_columns.min()), (columns.max() + 1, big_columns.max() + 1), (rows.min(), big_rows.min()), (rows.max() + 1, big_rows.max() + 1)):
            assert abs(2 * edge.item() - big_edge.item()) <= 1


def test_the_pose_layout_needs_a_pose_image():
    with pytest.raises(RegionError, match=r"^layout pose needs a pose image: connect an OpenPose render \(coloured skeletons on black\) to pose$"):
        layout_masks(64, 64, 1, "pose")


def test_the_preview_draws_the_regions_over_the_pose():
    """Outside every region the preview is the pose itself (resized to the masks' size); inside, the
    pose shows through the region's tint."""
    pose = draw([(100, 150), (260, 140)], (400, 300))
    masks = layout_masks(200, 150, 2, "pose", pose=pose)
    backdrop = pose_backdrop(pose, 200, 150)
    assert backdrop.shape == (150, 200, 3)
    expected_backdrop = np.asarray(Image.fromarray(np.round(pose * 255).astype(np.uint8)).resize((200, 150), Image.BILINEAR), np.float32) / 255
    assert np.array_equal(backdrop, expected_backdrop)
    preview = region_preview(masks, backdrop=backdrop)[0].numpy()
    outside = masks.sum(0).numpy() == 0
    assert outside.any() and np.abs(preview[outside] - backdrop[outside]).max() <= 0.5 / 255 + 1e-6
    plain = region_preview(masks)[0].numpy()
    inside = (masks[0].numpy() == 1) & (backdrop.max(-1) > 0.5)  # the skeleton's bright pixels in region 1
    assert inside.any() and (preview[inside].sum(-1) > plain[inside].sum(-1)).all()


def test_a_pose_converted_once_gives_what_the_image_gives_without_a_second_copy():
    """The Regions node converts the pose IMAGE once (pose_array) for its boxes and its backdrop: the
    array comes back as it is (the same memory), and both give what the IMAGE tensor gives."""
    image = torch.from_numpy(draw([(100, 120), (300, 120)], (400, 240)))[None]
    array = pose_array(image)
    assert array.shape == (240, 400, 3) and np.shares_memory(pose_array(array), array)
    assert pose_boxes(array, 2) == pose_boxes(image, 2)
    assert np.array_equal(pose_backdrop(array, 200, 120), pose_backdrop(image, 200, 120))
