"""The regional cross-attention of facediffuser_core.method.regional_attention, against float64 restatements."""

from __future__ import annotations

import math

import pytest
import torch

from facediffuser_core.errors import RegionError
from facediffuser_core.method.regional_attention import (
    Regions,
    batch_bias,
    check_fits_latent,
    check_inside_noise_mask,
    grid_inside,
    people_regions,
    region_bias,
    regional_attention,
    sdpa_attention,
)

HEADS, DIM = 2, 8
TOKENS = 77


def cell_means(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Area resize restated: each grid cell's mean over the pixels [floor(i H / h), ceil((i+1) H / h)), float64 [h, w]."""
    (height, width), (h, w) = mask.shape, grid
    out = torch.empty(h, w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            rows = slice(i * height // h, -(-(i + 1) * height // h))
            cols = slice(j * width // w, -(-(j + 1) * width // w))
            out[i, j] = mask.double()[rows, cols].mean()
    return out


def reference_probabilities(q, k, inside, positions, period):
    """float64 attention probabilities [b, heads, n_q, n_k] with person p's columns masked outside ``inside[p]`` [n_q]."""
    b, n_q, inner = q.shape
    n_k = k.shape[1]
    split = lambda t: t.double().reshape(b, -1, HEADS, inner // HEADS).transpose(1, 2)  # noqa: E731
    logits = split(q) @ split(k).transpose(-1, -2) / math.sqrt(inner // HEADS)
    for person, position in enumerate(positions):
        for column in range(position, n_k, period):
            logits[:, :, ~inside[person], column] = -math.inf
    return logits.softmax(dim=-1)


@pytest.fixture
def two_people():
    """Two people (three of the five grid columns each, sharing the middle one) on a 12x10 mask; grid 6x5."""
    masks = torch.zeros(2, 12, 10)
    masks[0, :, :6] = 1
    masks[1, :, 4:] = 1
    return Regions(masks, (2, 5), ("man", "woman"))


def test_rows_outside_a_region_ignore_that_persons_token(two_people):
    torch.manual_seed(0)
    grid, context = (6, 5), 2 * TOKENS  # the conditioning repeated twice, as ComfyUI pads it to a 154-token negative
    q = torch.randn(1, 30, HEADS * DIM)
    k, v = torch.randn(1, context, HEADS * DIM), torch.randn(1, context, HEADS * DIM)
    bias = batch_bias([(two_people, TOKENS)], 1, grid, context, torch.float32)
    out = regional_attention(q, k, v, HEADS, bias)

    inside = torch.stack([cell_means(mask, grid).flatten() >= 0.5 for mask in two_people.masks])
    assert inside[0].sum() == 18 and inside[1].sum() == 18 and (inside[0] & inside[1]).sum() == 6  # independent grid: 3 columns each, one shared
    changed_k, changed_v = k.clone(), v.clone()
    for column in (2, 2 + TOKENS):  # person A's token at both repeats
        changed_k[:, column], changed_v[:, column] = torch.randn(HEADS * DIM), torch.randn(HEADS * DIM)
    changed = regional_attention(q, changed_k, changed_v, HEADS, bias)
    assert torch.equal(out[0, ~inside[0]], changed[0, ~inside[0]])
    assert (out[0, inside[0]] - changed[0, inside[0]]).abs().amax(dim=-1).min() > 1e-4

    probabilities = reference_probabilities(q, k, inside, two_people.positions, TOKENS)
    assert torch.all(probabilities[..., ~inside[0], :][..., [2, 2 + TOKENS]] == 0)
    assert torch.all(probabilities[..., ~inside[1], :][..., [5, 5 + TOKENS]] == 0)
    overlap = inside[0] & inside[1]
    assert torch.all(probabilities[..., overlap, :][..., [2, 5, 2 + TOKENS, 5 + TOKENS]] > 0)  # both open where they overlap
    assert torch.all(probabilities[..., 0] > 0)  # BOS open everywhere: no row is fully masked
    split = lambda t: t.double().reshape(1, -1, HEADS, DIM).transpose(1, 2)  # noqa: E731
    expected = (probabilities @ split(v)).transpose(1, 2).reshape(1, 30, HEADS * DIM)
    assert torch.allclose(out.double(), expected, atol=1e-5, rtol=0)


def test_unregioned_chunks_and_the_stock_attention(two_people):
    torch.manual_seed(1)
    q, k, v = torch.randn(4, 30, HEADS * DIM), torch.randn(4, TOKENS, HEADS * DIM), torch.randn(4, TOKENS, HEADS * DIM)
    bias = batch_bias([None, (two_people, TOKENS)], 2, (6, 5), TOKENS, torch.float32)
    assert bias.shape == (4, 30, TOKENS)
    assert torch.equal(bias[:2], torch.zeros(2, 30, TOKENS))  # the negative's rows are left open
    assert torch.isinf(bias[2:]).any() and torch.equal(bias[2], bias[3])
    stock = sdpa_attention(q, k, v, HEADS)
    split = lambda t: t.double().reshape(4, -1, HEADS, DIM).transpose(1, 2)  # noqa: E731
    expected = ((split(q) @ split(k).transpose(-1, -2) / math.sqrt(DIM)).softmax(-1) @ split(v)).transpose(1, 2).reshape(4, 30, -1)
    assert torch.allclose(stock.double(), expected, atol=1e-5, rtol=0)
    assert torch.allclose(regional_attention(q, k, v, HEADS, bias)[:2], stock[:2], atol=1e-6, rtol=0)


@pytest.mark.parametrize("context, period, columns", [(77, 77, [3]), (154, 77, [3, 80]), (231, 77, [3, 80, 157]), (154, 154, [3])])
def test_bias_marks_every_repeat_of_the_token(context, period, columns):
    inside = torch.tensor([[True, False, True]])
    bias = region_bias(inside, (3,), context, period)
    assert bias.shape == (3, context)
    expected = torch.zeros(3, context)
    expected[1, columns] = -math.inf
    assert torch.equal(bias, expected)


@pytest.mark.parametrize("size, grid", [((72, 104), (9, 13)), ((72, 104), (5, 7)), ((72, 104), (3, 4)), ((64, 96), (8, 12)), ((128, 96), (16, 12))])
def test_grid_is_the_area_resize_thresholded(size, grid):
    torch.manual_seed(2)
    masks = torch.rand(3, *size)
    masks[1] = (masks[1] > 0.7).float()
    inside = grid_inside(masks, grid)
    expected = torch.stack([cell_means(mask, grid).flatten() >= 0.5 for mask in masks])
    near = torch.stack([(cell_means(mask, grid).flatten() - 0.5).abs() < 1e-6 for mask in masks])  # float32 rounding at the threshold
    assert torch.equal(inside[~near], expected[~near])


def test_people_regions_from_masks_or_subjects():
    masks = torch.ones(2, 8, 12)
    assert people_regions(None, [], (1, 4), ("man", "woman")) is None
    assert people_regions(masks, [], (1, 4), ("man", "woman")) is None  # all ones: nothing to install
    assert people_regions(masks * 0.5, [], (1, 4), ("man", "woman")) is None  # every value inside at every grid
    masks[1, :, :6] = 0
    regions = people_regions(masks, [], (1, 4), ("man", "woman"))
    assert torch.equal(regions.masks, masks) and regions.positions == (1, 4) and regions.words == ("man", "woman")
    from_subjects = people_regions(None, [masks[:1], masks[1]], (1, 4), ("man", "woman"))  # [1,H,W] and [H,W]
    assert torch.equal(from_subjects.masks, masks)


@pytest.mark.parametrize(
    "masks, subject_masks, message",
    [
        (
            torch.zeros(3, 8, 8), [],
            "masks has 3 mask(s) but the prompt marks 2 person(s) with <|image|> (marker 1 ('man'), marker 2 ('woman')); "
            "give exactly one mask per marker, in marker order (e.g. the Face-diffuser Regions node with that many people)",
        ),
        (
            torch.zeros(1, 8, 8), [],
            "masks has 1 mask(s) but the prompt marks 2 person(s) with <|image|> (marker 1 ('man'), marker 2 ('woman')); "
            "give exactly one mask per marker, in marker order (e.g. the Face-diffuser Regions node with that many people)",
        ),
        (
            torch.zeros(1, 2, 8, 8), [],
            "masks must be a MASK batch [N,H,W], got shape (1, 2, 8, 8); connect one mask per <|image|> marker as a MASK batch "
            "(e.g. the Face-diffuser Regions node's masks)",
        ),
        (
            None, [torch.zeros(1, 8, 8), None],
            "some people have a region and some do not: marker 2 ('woman') has no mask; connect a mask to every Face-diffuser Subject node, or to none",
        ),
        (
            None, [torch.zeros(1, 8, 8), torch.zeros(1, 8, 16)],
            "marker 2 ('woman'): its mask is 16x8 but marker 1 ('man')'s is 8x8; give every person's mask the size of the image",
        ),
        (
            torch.zeros(2, 8, 8), [torch.zeros(1, 8, 8), torch.zeros(1, 8, 8)],
            "masks is connected and Subject nodes have a mask too; give each person's region in one place: either masks (one per marker) "
            "or each Subject node's mask",
        ),
    ],
)  # fmt: skip
def test_people_regions_errors(masks, subject_masks, message):
    """The whole message: what is wrong, for which marker, and the fix (which input, what it needs)."""
    with pytest.raises(RegionError) as raised:
        people_regions(masks, subject_masks, (1, 4), ("man", "woman"))
    assert str(raised.value) == message


def test_masks_must_fit_the_latent():
    masks = torch.zeros(2, 512, 768)
    masks[0, :, :384], masks[1, :, 380:] = 1, 1
    regions = Regions(masks, (1, 4), ("man", "woman"))
    check_fits_latent(regions, (64, 96))
    check_fits_latent(Regions(torch.ones(1, 72, 104), (1,), ("man",)), (9, 13))
    check_fits_latent(Regions(torch.ones(1, 516, 512), (1,), ("man",)), (64, 64))  # within one latent cell
    with pytest.raises(RegionError, match=r"^the masks are 768x512 but the latent is 64x64 \(512x512 px\): their aspect ratios differ; make the masks at the image's size \(e\.g\. the Face-diffuser Regions node with the latent's width and height\)$"):
        check_fits_latent(regions, (64, 64))
    masks[1] = 0
    masks[1, 100:103, 600:603] = 1  # 3x3 pixels: under half of any 8x8 cell
    with pytest.raises(RegionError, match=r"^marker 2 \('woman'\): its region is empty at the latent's 96x64 resolution \(less than half of every 8x8 pixel cell is inside\); make the region larger$"):
        check_fits_latent(regions, (64, 96))


def test_each_region_must_lie_mostly_inside_the_noise_mask():
    """With a latent noise mask, a region at least half inside it passes; one mostly outside is an error
    naming the person and the fix (the picture would keep the photo over the person)."""
    masks = torch.zeros(2, 64, 96)
    masks[0, :, :48] = 1.0  # marker 1: the left half
    masks[1, :, 48:] = 1.0  # marker 2: the right half
    regions = Regions(masks, (2, 5), ("man", "woman"))
    noise_mask = torch.zeros(1, 4, 8, 12)  # [B,C,h,w] as the sampler prepares it
    noise_mask[..., :6] = 1.0  # repaint the left half only
    with pytest.raises(RegionError) as error:
        check_inside_noise_mask(regions, noise_mask)
    assert str(error.value) == (
        "marker 2 ('woman'): only 0% of its region lies inside the latent's noise mask (the part of the picture that is repainted), "
        "so the kept picture would cut the person off; draw the region inside the masked area, or make the noise mask cover it "
        "(e.g. the regions' union: Face-diffuser Regions Union into Set Latent Noise Mask)"
    )
    noise_mask[..., 6:9] = 1.0  # three quarters of the width: half of marker 2's region
    check_inside_noise_mask(regions, noise_mask)
    check_inside_noise_mask(regions, torch.ones(8, 12))  # [h, w] too
    noise_mask[..., 8] = 0.0  # a third of it
    with pytest.raises(RegionError, match="marker 2 .'woman'.: only 33% of its region"):
        check_inside_noise_mask(regions, noise_mask)
