"""The SDM's subject encoder: CLIP ViT-L/14 vision tower + projection, and the postfuse MLP.

Built from a transformers config (no download). Its state-dict keys are those of the SDM
checkpoint: ``image_encoder.vision_model.*``, ``image_encoder.visual_projection.*`` and
``postfuse_module.*``, so the checkpoint's tensors load with ``strict=True``.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from ..errors import CheckpointError
from .postfuse import PostfuseModule
from .preprocess import DEFAULT_OBJECT_RESOLUTION, preprocess_references
from .subjects import References, Subject, check_count, check_subjects, combine_embeddings

__all__ = ["VIT_L14", "vision_config", "vision_config_from_state_dict", "SubjectEncoder"]

VIT_L14 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_attention_heads=16,
    num_hidden_layers=24,
    patch_size=14,
    image_size=224,
    projection_dim=768,
    hidden_act="quick_gelu",
)
_HEAD_DIM = 64  # every OpenAI CLIP ViT uses 64-wide attention heads


def vision_config(**overrides) -> CLIPVisionConfig:
    """CLIP ViT-L/14 vision config (the SDM's image encoder), with optional overrides."""
    return CLIPVisionConfig(**{**VIT_L14, **overrides})


def vision_config_from_state_dict(state_dict: Mapping[str, torch.Tensor], prefix: str = "image_encoder.") -> CLIPVisionConfig:
    """Infer the vision config from tensor shapes (64-wide heads, quick_gelu, as OpenAI CLIP)."""
    vm = prefix + "vision_model."
    try:
        patch = state_dict[vm + "embeddings.patch_embedding.weight"]
        positions = state_dict[vm + "embeddings.position_embedding.weight"].shape[0]
        intermediate = state_dict[vm + "encoder.layers.0.mlp.fc1.weight"].shape[0]
        projection = state_dict[prefix + "visual_projection.weight"].shape[0]
    except KeyError as missing:
        raise CheckpointError(f"the image encoder lacks the tensor {missing.args[0]}") from None
    hidden, patch_size = patch.shape[0], patch.shape[-1]
    layers = 1 + max(int(k[len(vm + "encoder.layers.") :].split(".")[0]) for k in state_dict if k.startswith(vm + "encoder.layers."))
    grid = round((positions - 1) ** 0.5)
    if grid * grid + 1 != positions:
        raise CheckpointError(f"the image encoder has {positions} position embeddings, not 1 + a square patch grid")
    if hidden % _HEAD_DIM:
        raise CheckpointError(f"image encoder width {hidden} is not a multiple of {_HEAD_DIM}: not a CLIP ViT")
    return vision_config(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=hidden // _HEAD_DIM,
        num_hidden_layers=layers,
        patch_size=patch_size,
        image_size=grid * patch_size,
        projection_dim=projection,
    )


class SubjectEncoder(nn.Module):
    """Reference photos -> subject embeddings -> subject-augmented text conditioning."""

    def __init__(self, config: Optional[CLIPVisionConfig] = None, text_embed_dim: Optional[int] = None) -> None:
        super().__init__()
        config = config if config is not None else vision_config()
        self.image_encoder = CLIPVisionModelWithProjection(config)
        self.postfuse_module = PostfuseModule(text_embed_dim or config.projection_dim)
        if self.postfuse_module.embed_dim != config.projection_dim:
            raise ValueError(
                f"image embeddings ({config.projection_dim}) and text embeddings "
                f"({self.postfuse_module.embed_dim}) must have one width"
            )

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], config: Optional[CLIPVisionConfig] = None) -> "SubjectEncoder":
        """Build and strictly load from ``image_encoder.*`` + ``postfuse_module.*`` tensors."""
        config = config if config is not None else vision_config_from_state_dict(state_dict)
        encoder = cls(config)
        try:
            encoder.load_state_dict(dict(state_dict), strict=True)
        except RuntimeError as error:
            raise CheckpointError(
                f"the SDM's subject encoder tensors do not fit a CLIP ViT + postfuse module: {error}; "
                "use an unmodified official SDM checkpoint"
            ) from None
        return encoder

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised [N,3,224,224] pixels -> [N, D] projected image embeddings (``image_embeds``)."""
        param = next(self.parameters())
        out = self.image_encoder(pixel_values=pixel_values.to(device=param.device, dtype=param.dtype))
        return out.image_embeds

    def embed_images(self, images: torch.Tensor, object_resolution: int = DEFAULT_OBJECT_RESOLUTION) -> torch.Tensor:
        """IMAGE [N,H,W,C] (0..1) -> [N, D]: each picture embedded as a reference photo is."""
        return self.embed(preprocess_references(images, object_resolution))

    def embed_subjects(self, subjects: Sequence[Subject], object_resolution: int = DEFAULT_OBJECT_RESOLUTION) -> torch.Tensor:
        """S subjects -> [S, D]: every photo embedded (one encoder batch), then each subject's
        embeddings combined (:func:`~facediffuser_core.method.subjects.combine_embeddings`). With one photo
        per subject this is :meth:`embed` of those photos, bit for bit."""
        pixels = torch.cat([preprocess_references(batch, object_resolution) for subject in subjects for batch in subject.photos])
        embeds = self.embed(pixels).split([subject.count for subject in subjects])
        return torch.stack([combine_embeddings(own, subject.combine) for subject, own in zip(subjects, embeds)])

    def forward(
        self,
        text_cond: torch.Tensor,
        references: References,
        positions: Sequence[int],
        object_resolution: int = DEFAULT_OBJECT_RESOLUTION,
        words: Optional[Sequence[str]] = None,
    ) -> torch.Tensor:
        """Subject-augmented conditioning.

        Args:
            text_cond: [B, L, D] text-encoder output of the clean prompt.
            references: ComfyUI IMAGE [S,H,W,C] in 0..1, image i the subject of marker i; or S
                :class:`~facediffuser_core.method.subjects.Subject` (several photos each), in marker order.
            positions: S marked token indices (from :func:`facediffuser_core.method.prompt.parse_prompt`).
            words: the S marked words, to name the markers in error messages.
        """
        if isinstance(references, torch.Tensor):
            if references.ndim == 4:
                check_count(references.shape[0], len(positions), "reference image", words)
            embeds = self.embed(preprocess_references(references, object_resolution))
        else:
            check_subjects(references, len(positions), words)
            embeds = self.embed_subjects(references, object_resolution)
        return self.postfuse_module(text_cond, embeds, positions)
