"""Writes a random-weight SD1.5 ControlNet in the layout of ``control_v11p_sd15_openpose`` (ComfyUI's
``control_model.*`` LDM keys, fp16 safetensors, a 3-channel image hint): the SD1.5 encoder's 12
input blocks and middle block at 320/640/1280/1280 channels with their zero convolutions, so its
residuals fit the SD1.5 UNet, but with one cross-attention transformer (the first input block's)
instead of seven: 205 M parameters instead of 361 M. ComfyUI's detection still reads it as SD1.5 (it
needs the transformer for the context width). The layers come from ComfyUI's own ControlNet class
(built on the meta device), so the file is what ComfyUI itself would read from a real one:

    python controlnet_file.py COMFYUI_PATH OUT.safetensors
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

SEED = 11
TRANSFORMER_DEPTH = [1, 0, 0, 0, 0, 0, 0, 0]  # SD1.5's is [1, 1, 1, 1, 1, 1, 0, 0] with 1 in the middle block
TRANSFORMER_DEPTH_MIDDLE = -1  # no middle transformer


def controlnet_state_dict(seed: int = SEED) -> dict[str, torch.Tensor]:
    """Random weights for ComfyUI's ``comfy.cldm.cldm.ControlNet`` in the SD1.5 configuration: each
    matrix or kernel ~ N(0, 1 / fan_in), norm scales 1, biases 0 (zero convolutions are random too,
    as after training, so the control changes the UNet's output)."""
    import comfy.cldm.cldm
    import comfy.ops

    model = comfy.cldm.cldm.ControlNet(
        image_size=32, in_channels=4, model_channels=320, hint_channels=3, num_res_blocks=2, channel_mult=(1, 2, 4, 4),
        use_spatial_transformer=True, transformer_depth=TRANSFORMER_DEPTH, transformer_depth_middle=TRANSFORMER_DEPTH_MIDDLE,
        context_dim=768, num_heads=8, legacy=False, device="meta", operations=comfy.ops.disable_weight_init,
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
    comfyui, out = Path(sys.argv[1]), Path(sys.argv[2])
    sys.path.insert(0, str(comfyui))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    partial = out.with_name(out.name + ".partial")
    save_file(controlnet_state_dict(), str(partial))
    partial.replace(out)


if __name__ == "__main__":
    main()
