"""Saliency-adaptive Noise Fusion (SNF).

During the fusion stage both models predict noise; per latent pixel, the model whose
guidance response is more *salient* wins. Saliency follows the official implementation
(``AvgPool2d(4, stride=1, padding=1)`` of ``|response|``, bilinear resize back, channel
mean, softmax over all pixels), generalised from its hard-coded 4x64x64 to any shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["saliency_map", "fuse_noise"]

_KERNEL = 4  # box filter size of the official implementation
_PADDING = 1


def _check_response(name: str, response: torch.Tensor) -> None:
    if response.ndim != 4:
        raise ValueError(f"{name} must be a [B,C,H,W] tensor, got shape {tuple(response.shape)}")
    h, w = response.shape[-2:]
    if h < _KERNEL or w < _KERNEL:
        raise ValueError(f"{name} must be at least {_KERNEL}x{_KERNEL} latent pixels, got {h}x{w}")


def saliency_map(response: torch.Tensor) -> torch.Tensor:
    """Saliency of a guidance response.

    Args:
        response: what guidance added to the negative's eps, [B,C,H,W], any float dtype:
            ``guidance_scale * (eps_cond - eps_uncond)`` for plain CFG.

    Returns:
        float32 [B,1,H,W]; each sample's map is a softmax over its H*W pixels (sums to 1).
    """
    _check_response("response", response)
    b, _, h, w = response.shape
    smoothed = F.avg_pool2d(response.abs().float(), _KERNEL, stride=1, padding=_PADDING, count_include_pad=True)
    smoothed = F.interpolate(smoothed, size=(h, w), mode="bilinear", align_corners=False)
    per_pixel = smoothed.mean(dim=1, keepdim=True)
    return torch.softmax(per_pixel.reshape(b, h * w), dim=1).reshape(b, 1, h, w)


def fuse_noise(
    eps_scene: torch.Tensor,
    eps_subject: torch.Tensor,
    response_scene: torch.Tensor,
    response_subject: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick, per latent pixel, the noise of the model with the more salient guidance response.

    Args:
        eps_scene, eps_subject: guided noise predictions of the TDM and SDM, [B,C,H,W].
        response_scene, response_subject: their guidance responses (eps space), [B,C,H,W].

    Returns:
        ``(eps, subject_mask)``: eps [B,C,H,W] in the dtype of ``eps_scene``; subject_mask bool
        [B,1,H,W], True where the subject saliency is strictly greater (ties go to the scene).
    """
    shapes = {t.shape for t in (eps_scene, eps_subject, response_scene, response_subject)}
    if len(shapes) != 1:
        raise ValueError(
            "fuse_noise needs four tensors of one shape, got "
            f"{[tuple(t.shape) for t in (eps_scene, eps_subject, response_scene, response_subject)]}"
        )
    subject_mask = saliency_map(response_subject) > saliency_map(response_scene)
    eps = torch.where(subject_mask, eps_subject.to(eps_scene.dtype), eps_scene)
    return eps, subject_mask
