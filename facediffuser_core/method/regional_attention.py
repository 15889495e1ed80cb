"""A region per person: regional cross-attention on the marked tokens.

A person's identity lives in one token column of the conditioning: the class word before its
``<|image|>`` marker, where the postfuse MLP writes the fused embedding. Confining person k to a
region means giving that column's attention logit -inf at every latent position (query row) outside
k's region, at every repeat of the column when the conditioning is repeated to a longer context (ComfyUI
repeats a conditioning to the least common multiple of the batched ones' lengths). BOS and every other
token stay open, so no query row is ever fully masked; inside the region nothing changes, and where
regions overlap both people are open.

Masks are ComfyUI MASKs ([N, H, W], 0..1). At a layer whose token grid is h x w a mask is
area-resized to h x w and a cell is inside where the result is >= :data:`THRESHOLD`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import RegionError
from .prompt import MARKER
from .subjects import marker_label

__all__ = [
    "REGIONS_KEY",
    "THRESHOLD",
    "Regions",
    "people_regions",
    "check_fits_latent",
    "INSIDE_NOISE_MASK",
    "check_inside_noise_mask",
    "grid_inside",
    "region_bias",
    "batch_bias",
    "sdpa_attention",
    "regional_attention",
]

REGIONS_KEY = "facediffuser_regions"
"""The key of a CONDITIONING entry's dict under which Subject Encode puts its :class:`Regions`."""

THRESHOLD = 0.5

Attention = Callable[..., torch.Tensor]
"""``attention(q, k, v, heads, mask=bias) -> [b, n_q, heads*dim]``, e.g. ComfyUI's optimized_attention."""


@dataclass(frozen=True)
class Regions:
    """The people's regions of one prompt, in marker order.

    ``masks``: float [N, H, W] in 0..1, one per marker (>= 0.5 is inside); ``positions``: per marker, the
    index of its marked token in the conditioning's token columns (BOS at 0; < 77, the first chunk);
    ``words``: the marked words, for messages."""

    masks: torch.Tensor
    positions: tuple[int, ...]
    words: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.masks.ndim != 3 or self.masks.shape[0] != len(self.positions) or len(self.words) != len(self.positions):
            raise ValueError(f"masks [N,H,W] must have one mask per position: {tuple(self.masks.shape)} for {len(self.positions)} positions")


def _as_batch(mask: torch.Tensor) -> torch.Tensor:
    """A MASK [H,W] or [B,H,W] as float [B,H,W] on the CPU."""
    return (mask[None] if mask.ndim == 2 else mask).detach().to("cpu", torch.float32)


def people_regions(
    masks: Optional[torch.Tensor],
    subject_masks: Sequence[Optional[torch.Tensor]],
    positions: Sequence[int],
    words: Sequence[str],
) -> Optional[Regions]:
    """The regions of a prompt's people, or None when there are none to apply.

    ``masks``: a MASK batch [N, H, W], mask i for marker i (Subject Encode's ``masks``); ``subject_masks``:
    per marker, the MASK [1, H, W] of its Subject node or None (empty when the people came as images).
    None when no mask is given or every mask is >= 0.5 everywhere (a full region changes nothing at any
    grid, so nothing is installed). Raises :class:`RegionError` for both kinds of masks at once, a
    count that is not one per marker, some people with a region and some without, masks of different
    sizes, or masks that are not [N, H, W]."""
    given = [mask is not None for mask in subject_masks]
    if masks is not None and any(given):
        raise RegionError("masks is connected and Subject nodes have a mask too; give each person's region in one place: either masks (one per marker) or each Subject node's mask")
    if masks is None and not any(given):
        return None
    if masks is not None:
        batch = _as_batch(masks)
        if batch.ndim != 3:
            raise RegionError(
                f"masks must be a MASK batch [N,H,W], got shape {tuple(masks.shape)}; connect one mask per {MARKER} marker "
                "as a MASK batch (e.g. the Face-diffuser Regions node's masks)"
            )
        if batch.shape[0] != len(positions):
            marked = ", ".join(marker_label(i, words) for i in range(len(positions))) or "none"
            raise RegionError(
                f"masks has {batch.shape[0]} mask(s) but the prompt marks {len(positions)} person(s) with {MARKER} ({marked}); "
                "give exactly one mask per marker, in marker order (e.g. the Face-diffuser Regions node with that many people)"
            )
        people = list(batch)
    else:
        missing = [marker_label(i, words) for i, has in enumerate(given) if not has]
        if missing:
            raise RegionError(
                f"some people have a region and some do not: {', '.join(missing)} has no mask; "
                "connect a mask to every Face-diffuser Subject node, or to none"
            )
        people = [_as_batch(mask)[0] for mask in subject_masks]
        first = tuple(people[0].shape)
        for index, mask in enumerate(people):
            if tuple(mask.shape) != first:
                raise RegionError(
                    f"{marker_label(index, words)}: its mask is {mask.shape[1]}x{mask.shape[0]} but {marker_label(0, words)}'s is "
                    f"{first[1]}x{first[0]}; give every person's mask the size of the image"
                )
    stacked = torch.stack(people)
    if bool((stacked >= THRESHOLD).all()):
        return None
    return Regions(stacked, tuple(positions), tuple(words))


def grid_inside(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Masks [N, H, W] area-resized to ``grid`` (h, w) and thresholded: bool [N, h*w], rows in
    row-major (h, w) order, as a layer's query rows."""
    resized = F.interpolate(masks[:, None].float(), size=tuple(grid), mode="area")[:, 0]
    return (resized >= THRESHOLD).flatten(1)


def check_fits_latent(regions: Regions, latent: tuple[int, int]) -> None:
    """The masks must have the latent's (h, w) aspect ratio (within one latent cell) and every region
    must keep at least one latent cell."""
    height, width = latent
    mask_h, mask_w = regions.masks.shape[-2:]
    if abs(mask_w * height / mask_h - width) > 1 or abs(mask_h * width / mask_w - height) > 1:
        raise RegionError(
            f"the masks are {mask_w}x{mask_h} but the latent is {width}x{height} ({8 * width}x{8 * height} px): their aspect ratios differ; "
            "make the masks at the image's size (e.g. the Face-diffuser Regions node with the latent's width and height)"
        )
    empty = torch.nonzero(~grid_inside(regions.masks, latent).any(dim=1)).flatten().tolist()
    if empty:
        index = empty[0]
        raise RegionError(
            f"{marker_label(index, regions.words)}: its region is empty at the latent's {width}x{height} resolution "
            "(less than half of every 8x8 pixel cell is inside); make the region larger"
        )


INSIDE_NOISE_MASK = 0.5  # the least share of a person's region that the noise mask must repaint


def check_inside_noise_mask(regions: Regions, noise_mask: torch.Tensor) -> None:
    """With a latent noise mask (only where it is > 0 is the picture repainted), each person's region
    must lie mostly inside it: at least :data:`INSIDE_NOISE_MASK` of the region's area, the region
    area-resized to the mask's latent grid and weighted by the mask (averaged over its batch).
    ``noise_mask``: [h, w], [B, h, w] or [B, C, h, w] at the latent's resolution."""
    mask = noise_mask.detach().to("cpu", torch.float32)
    mask = mask.reshape(-1, *mask.shape[-2:]).mean(dim=0).clamp(0, 1)
    resized = F.interpolate(regions.masks[:, None].float(), size=tuple(mask.shape), mode="area")[:, 0]
    areas = resized.sum(dim=(1, 2))
    shares = (resized * mask).sum(dim=(1, 2)) / areas.clamp_min(1e-12)
    for index, share in enumerate(shares.tolist()):
        if share < INSIDE_NOISE_MASK:
            raise RegionError(
                f"{marker_label(index, regions.words)}: only {share:.0%} of its region lies inside the latent's noise mask (the part of "
                "the picture that is repainted), so the kept picture would cut the person off; draw the region inside the masked "
                "area, or make the noise mask cover it (e.g. the regions' union: Face-diffuser Regions Union into Set Latent Noise Mask)"
            )


def region_bias(inside: torch.Tensor, positions: Sequence[int], context: int, period: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The additive attention bias of one regioned conditioning: float [n_q, context], 0 everywhere
    except -inf at (query row outside person k's region, marked column of k + j * period) for every j.

    ``inside``: bool [N, n_q] from :func:`grid_inside`; ``period``: the conditioning's own token count
    (``context`` is a multiple of it when ComfyUI repeats it to batch with a longer one)."""
    if context % period:
        raise ValueError(f"a context of {context} tokens is not a repeat of the conditioning's {period}")
    bias = torch.zeros(inside.shape[1], context, dtype=dtype)
    for person, position in enumerate(positions):
        columns = torch.arange(position, context, period)
        outside = torch.nonzero(~inside[person]).flatten()
        bias[outside[:, None], columns[None, :]] = -math.inf
    return bias


def batch_bias(chunks: Sequence[Optional[tuple[Regions, int]]], rows_per_chunk: int, grid: tuple[int, int], context: int, dtype: torch.dtype) -> torch.Tensor:
    """The bias of a batch made of conditioning chunks (ComfyUI batches each conditioning's
    ``rows_per_chunk`` latents one after the other): float [len(chunks) * rows_per_chunk, h*w, context];
    a chunk given as (Regions, its token count) is regioned, None is left open (zeros)."""
    rows = []
    for chunk in chunks:
        if chunk is None:
            bias = torch.zeros(grid[0] * grid[1], context, dtype=dtype)
        else:
            regions, period = chunk
            bias = region_bias(grid_inside(regions.masks, grid), regions.positions, context, period, dtype)
        rows.append(bias[None].expand(rows_per_chunk, -1, -1))
    return torch.cat(rows)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Multi-head attention on projected q [b, n_q, heads*dim], k, v [b, n_k, heads*dim] with an
    additive ``mask`` [b, n_q, n_k]: [b, n_q, heads*dim] (torch's scaled_dot_product_attention)."""
    b, n_q, inner = q.shape
    split = lambda t: t.reshape(b, -1, heads, inner // heads).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=None if mask is None else mask[:, None])
    return out.transpose(1, 2).reshape(b, n_q, inner)


def regional_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, bias: torch.Tensor, attention: Attention = sdpa_attention) -> torch.Tensor:
    """Cross-attention of q [b, n_q, heads*dim] on k, v [b, n_k, heads*dim] with the additive ``bias``
    [b, n_q, n_k] (from :func:`batch_bias`): [b, n_q, heads*dim]. ``attention`` is the kernel (ComfyUI's
    optimized_attention in the nodes)."""
    return attention(q, k, v, heads, mask=bias.to(device=q.device, dtype=q.dtype))
