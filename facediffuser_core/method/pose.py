"""Each person's region from an OpenPose render (coloured skeletons on black, as ComfyUI's pose
preprocessors and pose editors draw them): one box per skeleton, left to right.

A skeleton is a connected group of non-background pixels after a small dilation (which joins a
face's or a hand's separate dots to the body); groups much smaller than the largest (specks, stray
dots) are ignored. Each skeleton's box is the extent of its own pixels, widened by a margin, as
fractions of the pose image's width and height (a :data:`~.regions.Box`, so the regions fit a
picture of any size with the pose's aspect ratio; :func:`~.regions.layout_masks` makes the MASKs).
The boxes go in marker order: the leftmost skeleton is the first ``<|image|>`` marker's person.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from ..errors import FaceDiffuserError

__all__ = ["BACKGROUND", "DILATION", "MIN_FRACTION", "DEFAULT_MARGIN", "PoseImage", "PoseError", "pose_array", "SkeletonBox", "skeleton_boxes", "pose_boxes", "pose_backdrop"]

BACKGROUND = 0.1  # a pixel is part of a skeleton where a channel exceeds this (0..1)
DILATION = 0.01  # dilation radius, a fraction of the image's longer side (at least 1 pixel)
MIN_FRACTION = 0.02  # a group with fewer pixels than this fraction of the largest group's is a speck
PoseImage = Union[torch.Tensor, np.ndarray]  # an IMAGE [H,W,3] or [1,H,W,3] in 0..1
DEFAULT_MARGIN = 0.1  # added on each side of a skeleton's box, a fraction of the box's width / height


class PoseError(FaceDiffuserError):
    """A pose image that cannot give the regions: wrong shape, or not one skeleton per person."""


@dataclass(frozen=True)
class SkeletonBox:
    """A skeleton's pixel extent: columns ``left..right-1``, rows ``top..bottom-1``."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def centre_x(self) -> float:
        return (self.left + self.right) / 2

    def widened(self, margin: float, width: int, height: int) -> "SkeletonBox":
        """The box with ``margin`` of its width (height) added on the left and right (top and bottom), inside the image."""
        dx, dy = round(margin * (self.right - self.left)), round(margin * (self.bottom - self.top))
        return SkeletonBox(max(0, self.left - dx), max(0, self.top - dy), min(width, self.right + dx), min(height, self.bottom + dy))


def pose_array(pose: PoseImage) -> np.ndarray:
    """A ComfyUI IMAGE [H,W,C] or [1,H,W,C] (0..1) -> float32 array [H,W,C] (its first 3 channels); such an array
    comes back as it is, so a caller that needs the pose twice converts it once."""
    array = pose.detach().cpu().float().numpy() if isinstance(pose, torch.Tensor) else np.asarray(pose, dtype=np.float32)
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise PoseError(f"the pose input is a batch of {array.shape[0]} images; give one pose image (all people in one picture)")
        array = array[0]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise PoseError(
            f"the pose image must be an IMAGE [H,W,3] (or [1,H,W,3]), got shape {list(array.shape)}; connect a picture "
            "(e.g. Load Image of an OpenPose render: coloured skeletons on black), not a mask or a latent"
        )
    return array[..., :3]


def skeleton_boxes(pose: PoseImage, dilation: float = DILATION) -> list[SkeletonBox]:
    """The boxes of the skeletons in ``pose`` (an IMAGE [H,W,3] or [1,H,W,3], 0..1), left to right
    by their centres."""
    image = pose_array(pose)
    height, width = image.shape[:2]
    foreground = (image > BACKGROUND).any(axis=-1)
    radius = max(1, round(dilation * max(height, width)))
    disk = np.hypot(*np.mgrid[-radius : radius + 1, -radius : radius + 1]) <= radius
    groups, count = ndimage.label(ndimage.binary_dilation(foreground, structure=disk))
    if count == 0:
        return []
    labels = np.where(foreground, groups, 0)  # each group's own pixels, without the dilation
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    boxes = []
    for index, found in enumerate(ndimage.find_objects(labels, max_label=count)):
        if found is not None and sizes[index] >= MIN_FRACTION * sizes.max():
            rows, columns = found
            boxes.append(SkeletonBox(columns.start, rows.start, columns.stop, rows.stop))
    return sorted(boxes, key=lambda box: box.centre_x)


def pose_boxes(pose: PoseImage, people: int, margin: float = DEFAULT_MARGIN) -> list[tuple[float, float, float, float]]:
    """One box per person in marker order (skeletons left to right), each the skeleton's box widened
    by ``margin``, as fractions of the pose image's width and height. A number of skeletons other
    than ``people`` is an error naming both."""
    image = pose_array(pose)
    height, width = image.shape[:2]
    boxes = skeleton_boxes(image)
    if len(boxes) != people:
        raise PoseError(
            f"the pose image has {len(boxes)} skeleton(s) for {people} people (one per <|image|> marker); "
            "draw one skeleton per person, left to right in marker order, or give the regions another way"
        )
    widened = (box.widened(margin, width, height) for box in boxes)
    return [(box.left / width, box.top / height, box.right / width, box.bottom / height) for box in widened]


def pose_backdrop(pose: PoseImage, width: int, height: int) -> np.ndarray:
    """The pose image resized to ``width`` x ``height`` (bilinear): float array [height, width, 3] in 0..1,
    to draw the regions over."""
    image = Image.fromarray(np.round(np.clip(pose_array(pose), 0, 1) * 255).astype(np.uint8), "RGB")
    return np.asarray(image.resize((width, height), Image.BILINEAR), dtype=np.float32) / 255.0
