"""Who goes where: a region (a MASK) per person of the prompt, in ``<|image|>`` marker order.

A layout becomes a MASK batch ``[N, H, W]`` float 0..1 (1 inside person k's region, mask k for the
k-th marker): ``columns`` puts the N people side by side in N equal columns, ``boxes`` gives each
person a box as fractions ``x0,y0,x1,y1`` of the width and height (0,0 is the top left), ``pose``
boxes each skeleton of a pose image (:mod:`.pose`), left to right. A pixel
``(i, j)`` covers ``[j, j+1) x [i, i+1)`` and is inside a box when its centre is. Boxes may overlap
(people can hug). :func:`region_preview` draws the regions, each tinted in its own colour and
labelled with its marker number and word.
"""

from __future__ import annotations

import math
import re
import sys
import zlib
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..errors import RegionError
from .pose import DEFAULT_MARGIN, PoseImage, pose_boxes
from .prompt import MARKER, MAX_SUBJECTS, parse_prompt

__all__ = [
    "LAYOUTS",
    "WHOLE_LAYOUTS",
    "NAMED_REGIONS",
    "COLOURS",
    "Box",
    "word_ids",
    "marked_words",
    "column_box",
    "column_boxes",
    "parse_boxes",
    "format_boxes",
    "named_region",
    "box_masks",
    "layout_masks",
    "picture_size",
    "regions_union",
    "region_preview",
]

LAYOUTS = ("columns", "boxes", "pose")  # pose: the Regions node's, from a pose image (:mod:`.pose`)
WHOLE_LAYOUTS = ("columns",)  # the layouts that need nothing per person: the commands' --layout
Box = tuple[float, float, float, float]
"""``(x0, y0, x1, y1)``: a box as fractions of the picture's width and height, 0 <= x0 < x1 <= 1."""
NAMED_REGIONS: dict[str, Box] = {"left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0), "centre": (0.25, 0.0, 0.75, 1.0), "center": (0.25, 0.0, 0.75, 1.0)}
COLOURS = ((230, 60, 60), (50, 120, 240), (60, 190, 80), (240, 180, 30))  # one per marker, MAX_SUBJECTS of them
BACKGROUND = (40, 40, 40)
TINT = 0.55  # how much of a region's colour covers the canvas inside it
_BOX_EXAMPLE = "0,0,0.5,1; 0.5,0,1,1"
LATENT_SCALE = 8  # pixels per latent cell of an SD1.5 VAE (the Empty Latent Image's width / 8)


def word_ids(text: str) -> list[int]:
    """A stand-in tokenizer (one id per word) for checking a prompt's markers without CLIP."""
    return [zlib.crc32(word.encode()) for word in text.split()]


def marked_words(prompt: str) -> tuple[str, ...]:
    """The marked word of each ``<|image|>`` marker of ``prompt``, in marker order (the pack's prompt
    parser with one token per word: CLIP's token limit is not checked here)."""
    return parse_prompt(prompt, word_ids, max_subjects=MAX_SUBJECTS, max_position=sys.maxsize).words


def column_box(index: int, columns: int) -> Box:
    """The ``index``-th (0-based) of ``columns`` equal side-by-side columns."""
    return (index / columns, 0.0, (index + 1) / columns, 1.0)


def column_boxes(people: int) -> list[Box]:
    """``people`` side by side, one column each, left to right in marker order."""
    return [column_box(index, people) for index in range(people)]


def _check_box(box: Sequence[float], number: int) -> Box:
    x0, y0, x1, y1 = box
    if not all(math.isfinite(value) and 0.0 <= value <= 1.0 for value in box):
        raise RegionError(f"box {number} ({_format_box(box)}) reaches outside 0..1; give fractions of the width and height between 0 and 1")
    if x0 >= x1 or y0 >= y1:
        raise RegionError(f"box {number} ({_format_box(box)}) is empty: x0 must be below x1 and y0 below y1 (x0,y0 is the top-left corner)")
    return (float(x0), float(y0), float(x1), float(y1))


def parse_boxes(text: str) -> list[Box]:
    """``"x0,y0,x1,y1; x0,y0,x1,y1"`` (boxes separated by ``;`` or new lines) -> one box per person,
    checked: four numbers each, within 0..1, not empty."""
    boxes = []
    for number, part in enumerate((part.strip() for part in re.split(r"[;\n]", text) if part.strip()), start=1):
        values = [value.strip() for value in part.split(",")]
        try:
            numbers = [float(value) for value in values]
        except ValueError:
            numbers = []
        if len(numbers) != 4:
            raise RegionError(f"box {number} '{part}' is not four numbers x0,y0,x1,y1; write one box per person as fractions, e.g. '{_BOX_EXAMPLE}'")
        boxes.append(_check_box(numbers, number))
    if not boxes:
        raise RegionError(f"boxes is empty; give one box per person as fractions x0,y0,x1,y1 separated by ';', e.g. '{_BOX_EXAMPLE}'")
    return boxes


def _format_box(box: Sequence[float]) -> str:
    return ",".join(f"{value:.10g}" for value in box)


def format_boxes(boxes: Sequence[Box]) -> str:
    """The ``boxes`` text :func:`parse_boxes` reads back."""
    return "; ".join(_format_box(box) for box in boxes)


def named_region(spec: str) -> Optional[Box]:
    """A region given by name: ``left``, ``right``, ``centre`` (``center``), or ``n/N`` for the n-th of N
    columns (1-based, e.g. ``2/3``); None for anything else (a mask image's path)."""
    name = spec.strip().lower()
    if name in NAMED_REGIONS:
        return NAMED_REGIONS[name]
    match = re.fullmatch(r"(\d+)\s*/\s*(\d+)", name)
    if match is None:
        return None
    index, columns = int(match.group(1)), int(match.group(2))
    if not 1 <= index <= columns:
        raise RegionError(f"region '{spec}' asks for column {index} of {columns}; n/N takes 1 <= n <= N, e.g. 2/3 for the middle of three")
    return column_box(index - 1, columns)


def _edges(low: float, high: float, size: int) -> slice:
    """The pixels whose centres lie in ``[low, high)`` of a side of ``size`` pixels."""
    return slice(max(0, math.ceil(low * size - 0.5)), max(0, math.ceil(high * size - 0.5)))


def box_masks(boxes: Sequence[Box], width: int, height: int) -> torch.Tensor:
    """MASK ``[N, height, width]`` float32, 1 inside box k of mask k, 0 elsewhere; a box that covers
    no pixel's centre at this size is a :class:`RegionError`."""
    masks = torch.zeros(len(boxes), height, width)
    for index, (x0, y0, x1, y1) in enumerate(boxes):
        masks[index, _edges(y0, y1, height), _edges(x0, x1, width)] = 1.0
        if not masks[index].any():
            raise RegionError(f"box {index + 1} ({_format_box((x0, y0, x1, y1))}) covers no pixel of a {width}x{height} picture; make it larger")
    return masks


def layout_masks(width: int, height: int, people: int, layout: str, boxes: str = "", pose: Optional[PoseImage] = None, margin: float = DEFAULT_MARGIN) -> torch.Tensor:
    """MASK ``[people, height, width]`` in marker order: ``columns``, ``boxes`` (one box per person,
    see :func:`parse_boxes`) or ``pose`` (each skeleton of the IMAGE ``pose``, left to right, boxed with
    ``margin``: :func:`~.pose.pose_boxes`); each layout ignores the other layouts' inputs."""
    if not 1 <= people <= MAX_SUBJECTS:
        raise RegionError(f"people is {people}; give 1 to {MAX_SUBJECTS}, one per {MARKER} marker")
    if layout == "columns":
        return box_masks(column_boxes(people), width, height)
    if layout == "pose":
        if pose is None:
            raise RegionError("layout pose needs a pose image: connect an OpenPose render (coloured skeletons on black) to pose")
        return box_masks(pose_boxes(pose, people, margin), width, height)
    if layout != "boxes":
        raise RegionError(f"unknown layout '{layout}'; use one of {', '.join(LAYOUTS)}")
    parsed = parse_boxes(boxes)
    if len(parsed) != people:
        raise RegionError(f"boxes gives {len(parsed)} box(es) but people is {people}; give one box per person, in marker order, separated by ';'")
    return box_masks(parsed, width, height)


def picture_size(picture: object) -> tuple[int, int]:
    """``(width, height)`` in pixels of the picture that ``picture`` stands for: a LATENT (a dict whose
    ``samples`` is ``[B, C, h, w]``: ``(w * 8, h * 8)``, the size its VAE decodes to) or an IMAGE
    (``[B, H, W, C]``: ``(W, H)``), so that regions made at that size match the picture by construction."""
    if isinstance(picture, dict):
        samples = picture.get("samples")
        if isinstance(samples, torch.Tensor) and samples.ndim >= 4:
            height, width = samples.shape[-2:]
            return int(width) * LATENT_SCALE, int(height) * LATENT_SCALE
    elif isinstance(picture, torch.Tensor) and picture.ndim == 4:
        _, height, width, _ = picture.shape
        return int(width), int(height)
    described = f"a dict with keys {sorted(picture)}" if isinstance(picture, dict) else f"a {type(picture).__name__}" + (f" of shape {list(picture.shape)}" if isinstance(picture, torch.Tensor) else "")
    raise RegionError(f"size_from got {described}; connect a LATENT (e.g. the Empty Latent Image) or an IMAGE (e.g. a Load Image), or leave it unconnected and set width and height")


def regions_union(masks: torch.Tensor) -> torch.Tensor:
    """MASK ``[1, H, W]``: where any region of ``masks`` ``[N, H, W]`` (or one mask ``[H, W]``) is, the
    largest of their values at each pixel; e.g. the noise mask that repaints only where people go."""
    batch = masks[None] if masks.ndim == 2 else masks
    if batch.ndim != 3 or batch.shape[0] == 0:
        raise RegionError(f"masks must be a MASK batch [N,H,W] with at least one mask, got shape {list(masks.shape)}; connect the Face-diffuser Regions node's masks")
    return batch.amax(dim=0, keepdim=True).float()


def region_preview(masks: torch.Tensor, words: Sequence[str] = (), backdrop: Optional[np.ndarray] = None) -> torch.Tensor:
    """IMAGE ``[1, H, W, 3]`` float 0..1 of MASK ``masks`` ``[N, H, W]``: on a dark canvas (or on
    ``backdrop``, [H, W, 3] in 0..1, e.g. the pose the regions come from) each region tinted in its
    marker's colour (overlaps mixed), labelled ``#k word`` (``words``: the marked words, optional) at
    the top left of its extent."""
    count, height, width = masks.shape
    weights = masks.detach().float().clamp(0, 1).cpu().numpy()
    colours = np.array([COLOURS[index % len(COLOURS)] for index in range(count)], dtype=np.float64).reshape(count, 3)
    covered = weights.sum(axis=0)[..., None]  # [H,W,1]
    mixed = np.einsum("nhw,nc->hwc", weights, colours) / np.maximum(covered, 1e-12)
    alpha = TINT * np.clip(covered, 0, 1)
    base = np.array(BACKGROUND, dtype=np.float64) if backdrop is None else np.asarray(backdrop, dtype=np.float64) * 255.0
    canvas = base * (1 - alpha) + mixed * alpha
    picture = Image.fromarray(np.round(canvas).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(picture)
    text_size = max(10, round(min(width, height) / 16))
    font = ImageFont.load_default(size=text_size)
    for index in range(count):
        rows, columns = np.nonzero(weights[index] >= 0.5)
        if rows.size == 0:
            continue
        word = words[index] if index < len(words) else ""
        label = f"#{index + 1} {word}".rstrip()
        margin = max(2, text_size // 4)
        draw.text((int(columns.min()) + margin, int(rows.min()) + margin), label, fill=COLOURS[index % len(COLOURS)], font=font, stroke_width=max(1, text_size // 10), stroke_fill=(255, 255, 255))
    return torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)[None]
