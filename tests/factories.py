"""Random-weight models in the official Face-diffuser layout, built by the tests themselves.

``tiny`` models have the real architectures at small widths (fast on a CPU);
``sd15`` models have SD1.5's real shapes (for running inside a real ComfyUI);
``sd15_xs`` models are ``sd15`` ones with the smallest UNet ComfyUI still loads as SD1.5
(:func:`unet`; the real-ComfyUI suite's models, tests/integration/models.py); ``sd15_xs_mid`` adds a
middle block to that UNet (for ComfyUI's nodes that patch it, tests/integration/test_comfy_guidance_hooks.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from facediffuser_core.method.subject_encoder import SubjectEncoder, vision_config

Size = Literal["tiny", "sd15_xs", "sd15_xs_mid", "sd15"]

TINY_WIDTH = 64  # text width == cross-attention width == image projection width


def unet(size: Size = "tiny", seed: int = 0) -> UNet2DConditionModel:
    """``sd15``: SD1.5's UNet (860 M parameters). ``sd15_xs``: the smallest UNet ComfyUI still loads as
    SD1.5 (316 M parameters, 2.2 times faster per evaluation on a CPU): ComfyUI's diffusers-layout
    detection (``model_detection.unet_config_from_diffusers_unet``) compares only the width (320), the
    context width (768), the input channels and the number of transformers per down-block resnet, and
    lists this layout as ``SD_XS`` (three levels of one resnet each, transformers in the lower two,
    no middle block), which ``model_config_from_unet_config`` then loads as the SD15 model (SD1.5's
    text encoder, VAE, latent format and schedule). 8 heads in every transformer, as SD1.5 has
    (diffusers' ``attention_head_dim`` is the number of heads here): the SD15 model's config
    (``num_heads`` 8, ``num_head_channels`` -1) replaces SD_XS's 64-channel heads, so ComfyUI runs
    every transformer with 8 heads and computes what diffusers computes (within 1.5e-6); with 5/10/20
    heads the outputs would differ by 0.04. No middle block.

    ``sd15_xs_mid``: ``sd15_xs`` with SD1.5's middle block (resnet, one transformer, resnet at 1280
    channels; 413 M parameters), for ComfyUI's guidance nodes that patch the middle block
    (PerturbedAttentionGuidance, SelfAttentionGuidance). ComfyUI's diffusers-layout detection matches
    a fixed list of layouts and would drop this middle block (its SD_XS entry has none), so ComfyUI
    loads it in its own (LDM) layout, whose detection reads the blocks as they are: an SD15 model with
    a middle block (tests/integration/test_comfy_guidance_hooks.py converts the keys with
    ``comfy.utils.unet_to_diffusers``)."""
    torch.manual_seed(seed)
    if size == "sd15":
        return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    if size in ("sd15_xs", "sd15_xs_mid"):
        return UNet2DConditionModel(
            sample_size=64,
            cross_attention_dim=768,
            block_out_channels=(320, 640, 1280),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn" if size == "sd15_xs_mid" else None,
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=8,
        )
    return UNet2DConditionModel(
        sample_size=8,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_WIDTH,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def text_config(size: Size = "tiny") -> CLIPTextConfig:
    if size != "tiny":  # the SD1.5 sizes
        return CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768)
    return CLIPTextConfig(hidden_size=TINY_WIDTH, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2, projection_dim=TINY_WIDTH)


class TextEncoder(nn.Module):
    """A CLIP text model whose state dict has the ``text_model.*`` layout ComfyUI reads: that of
    transformers 4's CLIPTextModel (transformers 5 dropped the ``text_model`` level)."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        model = CLIPTextModel(config)
        self.text_model = getattr(model, "text_model", model)


def text_encoder(size: Size = "tiny", seed: int = 0) -> TextEncoder:
    torch.manual_seed(seed)
    return TextEncoder(text_config(size))


def vae(size: Size = "tiny", seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    if size != "tiny":  # the SD1.5 sizes
        return AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
            sample_size=512,
        )
    return AutoencoderKL(
        block_out_channels=(32,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    )


def subject_encoder(size: Size = "tiny", seed: int = 0) -> SubjectEncoder:
    torch.manual_seed(seed)
    if size != "tiny":  # the SD1.5 sizes
        return SubjectEncoder(vision_config())
    config = vision_config(
        hidden_size=64, intermediate_size=128, num_attention_heads=1, num_hidden_layers=2, patch_size=32, projection_dim=TINY_WIDTH
    )
    return SubjectEncoder(config)


def official_state_dict(kind: Literal["SDM", "TDM"], size: Size = "tiny", seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with the official keys and dtype mix: float32 UNet and VAE, bfloat16 encoders,
    int64 ``position_ids`` buffers as old transformers saved them. Each part is seeded on its own, so
    ``sd15`` and ``sd15_xs`` files of one seed have the same text encoder, VAE and subject encoder."""
    sd: dict[str, torch.Tensor] = {}
    sd.update({"unet." + k: v for k, v in unet(size, seed).state_dict().items()})
    text = text_encoder(size, seed + 1)
    sd.update({"text_encoder." + k.removeprefix("text_model."): v.to(torch.bfloat16) for k, v in text.state_dict().items()})
    sd["text_encoder.embeddings.position_ids"] = torch.arange(text_config(size).max_position_embeddings).unsqueeze(0)
    sd.update({"vae." + k: v for k, v in vae(size, seed + 2).state_dict().items()})
    if kind == "SDM":
        encoder = subject_encoder(size, seed + 3)
        sd.update({k: v.to(torch.bfloat16) if k.startswith("image_encoder.") else v for k, v in encoder.state_dict().items()})
        patches = encoder.image_encoder.config.image_size // encoder.image_encoder.config.patch_size
        sd["image_encoder.vision_model.embeddings.position_ids"] = torch.arange(patches**2 + 1).unsqueeze(0)
    return {k: v.contiguous() for k, v in sd.items()}


def write_official(folder: Path, kind: Literal["SDM", "TDM"], size: Size = "tiny", seed: int = 0) -> Path:
    """Save ``folder/<kind>/pytorch_model.bin`` as the official release lays it out; returns the file."""
    path = Path(folder) / kind / "pytorch_model.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(official_state_dict(kind, size, seed), path)
    return path
