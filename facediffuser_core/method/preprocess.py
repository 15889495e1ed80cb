"""Reference-image preprocessing for the subject encoder.

ComfyUI-layout images ([N,H,W,C] float 0..1) -> zero-pad to a centred square -> resize to
``object_resolution`` -> resize to 224 (both bilinear with antialias) -> CLIP normalisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ReferenceImageError

__all__ = ["CLIP_MEAN", "CLIP_STD", "ENCODER_RESOLUTION", "DEFAULT_OBJECT_RESOLUTION", "FASTCOMPOSER_OBJECT_RESOLUTION", "to_rgb", "pad_to_square", "resize_square", "preprocess_references"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ENCODER_RESOLUTION = 224
DEFAULT_OBJECT_RESOLUTION = 512
FASTCOMPOSER_OBJECT_RESOLUTION = 224  # FastComposer's inference setting
_RANGE_TOLERANCE = 1e-3


def to_rgb(images: torch.Tensor, name: str = "reference images") -> torch.Tensor:
    """[N,H,W,C] or [H,W,C] images with C in 1..4 (gray, gray+alpha, RGB, RGBA) -> float32 [N,3,H,W].

    uint8 input is scaled by 1/255; alpha is dropped, as ComfyUI does for IMAGE inputs. ``name``
    says in error messages which images were wrong.
    """
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or not 1 <= images.shape[-1] <= 4:
        raise ReferenceImageError(
            f"{name} must be [N,H,W,C] with 1 to 4 channels (ComfyUI IMAGE layout), got {tuple(images.shape)}"
        )
    if images.shape[0] == 0:
        raise ReferenceImageError(f"no {name} were given")
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise ReferenceImageError(f"{name} must be at least 1x1 pixels, got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    elif not images.is_floating_point():
        raise ReferenceImageError(f"{name} must be float 0..1 or uint8, got {images.dtype}")
    images = images.float()
    if not torch.isfinite(images).all():
        raise ReferenceImageError(f"{name} contain NaN or infinite values; give images with values in 0..1")
    low, high = float(images.min()), float(images.max())
    if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
        raise ReferenceImageError(
            f"the values of the {name} must lie in 0..1, got {low:.3g}..{high:.3g}; scale 0..255 images by 1/255"
        )
    channels = images.shape[-1]
    color = images[..., :1].expand(*images.shape[:-1], 3) if channels <= 2 else images[..., :3]
    return color.clamp(0.0, 1.0).permute(0, 3, 1, 2).contiguous()


def pad_to_square(images: torch.Tensor) -> torch.Tensor:
    """Zero-pad [N,C,H,W] images to a centred square of side max(H, W)."""
    h, w = images.shape[-2:]
    if h == w:
        return images
    diff = abs(h - w)
    before, after = diff // 2, diff - diff // 2
    padding = (before, after, 0, 0) if h > w else (0, 0, before, after)
    return F.pad(images, padding, mode="constant", value=0.0)


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """[N,C,S,S] -> [N,C,size,size], bilinear with antialias."""
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def preprocess_references(images: torch.Tensor, object_resolution: int = DEFAULT_OBJECT_RESOLUTION) -> torch.Tensor:
    """ComfyUI IMAGE [N,H,W,C] (0..1) -> CLIP-normalised float32 pixel values [N,3,224,224]."""
    if object_resolution < 1:
        raise ReferenceImageError(f"object_resolution must be a positive pixel size, got {object_resolution}")
    pixels = resize_square(resize_square(pad_to_square(to_rgb(images)), object_resolution), ENCODER_RESOLUTION)
    mean = torch.tensor(CLIP_MEAN, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std
