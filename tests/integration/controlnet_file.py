"""Writes a random-weight SD1.5 ControlNet in the layout of ``control_v11p_sd15_openpose`` (ComfyUI's
``control_model.*`` LDM keys, fp16 safetensors, a 3-channel image hint) whose residuals fit a given
UNet (the TDM file's, as ComfyUI detects it): that UNet's encoder, input block by input block (levels,
resnets per level, widths) with a zero convolution each, and a middle block's resnet and zero
convolution (ComfyUI's ControlNet always has one; a UNet without a middle block adds that residual
before its first output block, where the widths match too), but with one cross-attention transformer
(the first one the UNet's encoder has) instead of all of them. For SD1.5's UNet: 12 input blocks,
205 M parameters instead of 361 M; for the suite's ``sd15_xs`` UNet (factories.py): 6 input blocks at
320/640/1280, 86 M. ComfyUI's detection still reads it as SD1.5 (it needs the transformer for the
context width). The layers come from ComfyUI's own ControlNet class (built on the meta device), so
the file is what ComfyUI itself would read from a real one:

    python controlnet_file.py COMFYUI_PATH TDM.safetensors OUT.safetensors
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SEED = 11
TRANSFORMER_DEPTH_MIDDLE = -1  # a middle block without a transformer


def unet_config(unet: dict[str, torch.Tensor]) -> dict:
    """ComfyUI's config of a diffusers-layout UNet (which must be one it loads as SD1.5)."""
    import comfy.model_detection
    import comfy.supported_models

    config = comfy.model_detection.model_config_from_diffusers_unet(unet)
    if not isinstance(config, comfy.supported_models.SD15):
        raise SystemExit(f"the UNet is {type(config).__name__ if config else 'not recognised'}, not SD1.5")
    return config.unet_config


def one_transformer(depth: list[int]) -> list[int]:
    """The UNet's transformers per encoder resnet, all but the first one removed: SD1.5's
    [1, 1, 1, 1, 1, 1, 0, 0] -> [1, 0, 0, 0, 0, 0, 0, 0]; sd15_xs's [0, 1, 1] -> [0, 1, 0]."""
    first = next(index for index, count in enumerate(depth) if count)
    return [1 if index == first else 0 for index in range(len(depth))]


def controlnet_state_dict(unet: dict[str, torch.Tensor], seed: int = SEED) -> dict[str, torch.Tensor]:
    """Random weights for ComfyUI's ``comfy.cldm.cldm.ControlNet`` fitting ``unet`` (diffusers keys):
    each matrix or kernel ~ N(0, 1 / fan_in), norm scales 1, biases 0 (zero convolutions are random
    too, as after training, so the control changes the UNet's output)."""
    import comfy.cldm.cldm
    import comfy.ops

    config = unet_config(unet)
    model = comfy.cldm.cldm.ControlNet(
        image_size=32, in_channels=4, model_channels=config["model_channels"], hint_channels=3,
        num_res_blocks=config["num_res_blocks"], channel_mult=tuple(config["channel_mult"]),
        use_spatial_transformer=True, transformer_depth=one_transformer(list(config["transformer_depth"])),
        transformer_depth_middle=TRANSFORMER_DEPTH_MIDDLE,
        context_dim=config["context_dim"], num_heads=8, legacy=False, device="meta", operations=comfy.ops.disable_weight_init,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for key, meta in model.state_dict().items():
        if meta.ndim > 1:
            value = torch.randn(meta.shape, generator=generator) / meta[0].numel() ** 0.5
        else:
            value = torch.ones(meta.shape) if key.endswith("weight") else torch.zeros(meta.shape)
        weights[f"control_model.{key}"] = value.to(torch.float16)
    return weights


def main() -> None:
    comfyui, tdm, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    sys.path.insert(0, str(comfyui))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    unet = {key[len("unet.") :]: value for key, value in load_file(str(tdm), device="cpu").items() if key.startswith("unet.")}
    partial = out.with_name(out.name + ".partial")
    save_file(controlnet_state_dict(unet), str(partial))
    partial.replace(out)


if __name__ == "__main__":
    main()
