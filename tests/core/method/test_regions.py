"""Regions per person (facediffuser_core.method.regions): the masks of a layout against a per-pixel reference
in float64 (a pixel is inside a box when its centre is), the box text, named regions, the preview's
colours and labels, and every error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facediffuser_core.errors import PromptError
from facediffuser_core.errors import RegionError
from facediffuser_core.method.regions import (
    BACKGROUND,
    COLOURS,
    TINT,
    box_masks,
    format_boxes,
    layout_masks,
    marked_words,
    named_region,
    parse_boxes,
    picture_size,
    regions_union,
    region_preview,
)


def reference_masks(boxes, width: int, height: int) -> np.ndarray:
    """[N,H,W] float64: pixel (i, j) is in box (x0, y0, x1, y1) when its centre ((j+0.5)/W, (i+0.5)/H) is in [x0,x1) x [y0,y1)."""
    out = np.zeros((len(boxes), height, width))
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        for i in range(height):
            for j in range(width):
                cx, cy = (j + 0.5) / width, (i + 0.5) / height
                out[k, i, j] = float(x0 <= cx < x1 and y0 <= cy < y1)
    return out


@pytest.mark.parametrize("width, height", [(64, 64), (96, 64), (13, 9), (7, 5)])
@pytest.mark.parametrize("people", [1, 2, 3, 4])
def test_columns_split_the_width_side_by_side_in_marker_order(people, width, height):
    masks = layout_masks(width, height, people, "columns")
    assert masks.shape == (people, height, width) and masks.dtype == torch.float32
    boxes = [(k / people, 0.0, (k + 1) / people, 1.0) for k in range(people)]
    np.testing.assert_array_equal(masks.numpy(), reference_masks(boxes, width, height))
    assert torch.equal(masks.sum(0), torch.ones(height, width))  # every pixel is exactly one person's
    first_columns = [int(torch.nonzero(mask[0])[0]) for mask in masks]
    assert first_columns == sorted(first_columns)  # marker 1 on the left


def test_boxes_are_fractions_of_width_and_height_and_may_overlap():
    text = "0, 0, 0.6, 1; 0.4,0.25,1,0.75"
    masks = layout_masks(40, 20, 2, "boxes", text)
    np.testing.assert_array_equal(masks.numpy(), reference_masks(parse_boxes(text), 40, 20))
    assert masks[0, :, :24].all() and not masks[0, :, 24:].any()
    assert masks[1, 5:15, 16:].all() and not masks[1, :5].any() and not masks[1, 15:].any()
    assert (masks.sum(0) == 2).sum() == 10 * 8  # the overlap: both people open there


def test_boxes_split_by_new_lines_and_read_back_from_their_text():
    boxes = parse_boxes("0,0,0.5,1\n0.5,0,1,1\n")
    assert boxes == [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
    odd = [(1 / 3, 0.0, 2 / 3, 0.875)]
    assert parse_boxes(format_boxes(odd))[0] == pytest.approx(odd[0], abs=1e-9)


EXAMPLE = "e.g. '0,0,0.5,1; 0.5,0,1,1'"  # the fix each box-text error ends with


@pytest.mark.parametrize(
    "text, message",
    [
        ("", f"boxes is empty; give one box per person as fractions x0,y0,x1,y1 separated by ';', {EXAMPLE}"),
        ("0,0,0.5", f"box 1 '0,0,0.5' is not four numbers x0,y0,x1,y1; write one box per person as fractions, {EXAMPLE}"),
        ("0,0,0.5,1; a,0,1,1", f"box 2 'a,0,1,1' is not four numbers x0,y0,x1,y1; write one box per person as fractions, {EXAMPLE}"),
        ("0,0,1.5,1", "box 1 (0,0,1.5,1) reaches outside 0..1; give fractions of the width and height between 0 and 1"),
        ("-0.1,0,0.5,1", "box 1 (-0.1,0,0.5,1) reaches outside 0..1; give fractions of the width and height between 0 and 1"),
        ("0,0,nan,1", "box 1 (0,0,nan,1) reaches outside 0..1; give fractions of the width and height between 0 and 1"),
        ("0.5,0,0.5,1", "box 1 (0.5,0,0.5,1) is empty: x0 must be below x1 and y0 below y1 (x0,y0 is the top-left corner)"),
        ("0,0.8,1,0.2", "box 1 (0,0.8,1,0.2) is empty: x0 must be below x1 and y0 below y1 (x0,y0 is the top-left corner)"),
    ],
)
def test_bad_box_text_is_an_error_saying_how_to_write_it(text, message):
    """The whole message: what is wrong with which box, and how to write it instead."""
    with pytest.raises(RegionError) as raised:
        parse_boxes(text)
    assert str(raised.value) == message


def test_layout_errors_name_the_fix():
    """Each message ends with its remedy: which input to change and to what."""
    cases = [
        (lambda: layout_masks(64, 64, 2, "boxes", "0,0,1,1"), "boxes gives 1 box(es) but people is 2; give one box per person, in marker order, separated by ';'"),
        (lambda: layout_masks(64, 64, 5, "columns"), "people is 5; give 1 to 4, one per <|image|> marker"),
        (lambda: layout_masks(64, 64, 0, "columns"), "people is 0; give 1 to 4, one per <|image|> marker"),
        (lambda: layout_masks(64, 64, 2, "rows"), "unknown layout 'rows'; use one of columns, boxes, pose"),
        (lambda: layout_masks(64, 64, 1, "pose"), "layout pose needs a pose image: connect an OpenPose render (coloured skeletons on black) to pose"),
        (lambda: box_masks([(0.0, 0.0, 0.005, 1.0)], 64, 64), "box 1 (0,0,0.005,1) covers no pixel of a 64x64 picture; make it larger"),  # 0.32 px: no pixel centre
    ]
    for make, message in cases:
        with pytest.raises(RegionError) as raised:
            make()
        assert str(raised.value) == message
    wider = box_masks([(0.0, 0.0, 0.005, 1.0)], 200, 8)  # 1 px: the first column
    assert wider[0, :, 0].all() and not wider[0, :, 1:].any()


def test_named_regions_and_nth_of_n_columns():
    assert named_region("left") == (0.0, 0.0, 0.5, 1.0)
    assert named_region("Right") == (0.5, 0.0, 1.0, 1.0)
    assert named_region("centre") == named_region("center") == (0.25, 0.0, 0.75, 1.0)
    assert named_region("2/3") == pytest.approx((1 / 3, 0.0, 2 / 3, 1.0))
    assert named_region("1/1") == (0.0, 0.0, 1.0, 1.0)
    assert named_region("masks/a.png") is None and named_region("a.png") is None
    fix = "n/N takes 1 <= n <= N, e.g. 2/3 for the middle of three"
    with pytest.raises(RegionError, match=rf"^region '4/3' asks for column 4 of 3; {fix}$"):
        named_region("4/3")
    with pytest.raises(RegionError, match=rf"^region '0/2' asks for column 0 of 2; {fix}$"):
        named_region("0/2")


def test_marked_words_follow_the_prompt_parser():
    assert marked_words("a man <|image|> and a woman <|image|> at a cafe") == ("man", "woman")
    assert marked_words("a forest") == ()
    with pytest.raises(PromptError, match="has no word before it"):
        marked_words("<|image|> a man")


def test_preview_tints_each_region_in_its_colour_and_labels_it():
    masks = layout_masks(96, 48, 2, "boxes", "0,0,0.5,1; 0.25,0,1,1")
    preview = region_preview(masks, ("man", "woman"))
    assert preview.shape == (1, 48, 96, 3) and preview.dtype == torch.float32
    assert 0 <= float(preview.min()) and float(preview.max()) <= 1
    pixels = np.round(preview[0].numpy() * 255).astype(int)
    background, red, blue = (np.array(c, dtype=np.float64) for c in (BACKGROUND, COLOURS[0], COLOURS[1]))
    expected = {
        (47, 10): background * (1 - TINT) + red * TINT,  # only person 1 (below the labels)
        (47, 90): background * (1 - TINT) + blue * TINT,  # only person 2
        (47, 40): background * (1 - TINT) + (red + blue) / 2 * TINT,  # the overlap mixes both
    }
    for (i, j), colour in expected.items():
        np.testing.assert_allclose(pixels[i, j], colour, atol=0.51)
    unlabelled = region_preview(masks)
    drawn = (preview - unlabelled).abs().sum(-1)[0].numpy() > 0
    assert drawn[:16, :24].any() and drawn[:16, 24:40].any()  # "#1 man" at region 1's top left, "#2 woman" at region 2's
    assert not drawn[32:].any()


def test_preview_of_an_empty_mask_is_the_plain_canvas():
    preview = region_preview(torch.zeros(1, 8, 8))
    np.testing.assert_allclose(preview[0].numpy() * 255, np.broadcast_to(np.array(BACKGROUND, dtype=np.float64), (8, 8, 3)), atol=0.51)


def test_picture_size_of_a_latent_is_its_decoded_size_and_of_an_image_its_own():
    latent = {"samples": torch.zeros(2, 4, 56, 80)}  # the Empty Latent Image of width 640, height 448, batch 2
    assert picture_size(latent) == (640, 448)
    assert picture_size({"samples": torch.zeros(1, 4, 64, 64), "noise_mask": torch.ones(1, 1, 512, 512)}) == (512, 512)
    assert picture_size(torch.zeros(1, 448, 641, 3)) == (641, 448)  # IMAGE [B,H,W,C]: any size, not only multiples of 8
    masks = layout_masks(*picture_size(latent), 2, "boxes", "0,0,0.6,1; 0.4,0,1,1")
    assert masks.shape == (2, 448, 640)  # [N, height, width]: the latent's picture, by construction


@pytest.mark.parametrize(
    "picture, described",
    [
        ({"noise_mask": torch.ones(1, 8, 8)}, "a dict with keys ['noise_mask']"),
        (torch.zeros(8, 8), "a Tensor of shape [8, 8]"),
        ("512x512", "a str"),
    ],
)
def test_picture_size_of_anything_else_is_an_error_naming_what_to_connect(picture, described):
    with pytest.raises(RegionError) as error:
        picture_size(picture)
    assert str(error.value) == f"size_from got {described}; connect a LATENT (e.g. the Empty Latent Image) or an IMAGE (e.g. a Load Image), or leave it unconnected and set width and height"


def test_the_union_of_regions_is_one_mask_of_everywhere_any_region_is():
    masks = layout_masks(96, 64, 2, "boxes", "0,0,0.25,0.5; 0.5,0.5,1,1")
    union = regions_union(masks)
    assert union.shape == (1, 64, 96)
    assert torch.equal(union[0], ((masks[0] > 0) | (masks[1] > 0)).float())
    soft = torch.tensor([[[0.2, 0.9]], [[0.6, 0.1]]])  # painted, soft masks: the largest value
    assert torch.equal(regions_union(soft), torch.tensor([[[0.6, 0.9]]]))
    with pytest.raises(RegionError, match=r"masks must be a MASK batch \[N,H,W\] with at least one mask, got shape \[0, 4, 4\]"):
        regions_union(torch.zeros(0, 4, 4))
