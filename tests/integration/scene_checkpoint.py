"""Writes a random single-file SD1.5 checkpoint (the original LDM layout that Load Checkpoint reads)
and a small random LoRA for it, from the TDM test file's weights. Run with ComfyUI on the path (its
own key maps do the renaming, so the file is what ComfyUI itself would read from a real one):

    python scene_checkpoint.py COMFYUI_PATH TDM.safetensors OUT_CHECKPOINT OUT_LORA
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LORA_RANK = 4
LORA_LAYERS = ("attn1.to_q", "attn1.to_v", "attn2.to_k", "attn2.to_out.0")  # in every transformer block
LORA_TEXT_LAYERS = ("self_attn.q_proj", "self_attn.v_proj")  # in every text encoder layer


def split(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}


def checkpoint(tdm: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The TDM's diffusers-layout UNet, VAE and CLIP text encoder under the LDM single-file keys."""
    import comfy.diffusers_convert
    import comfy.model_detection
    import comfy.utils

    unet = split(tdm, "unet.")
    config = comfy.model_detection.model_config_from_diffusers_unet(unet)
    to_ldm = comfy.utils.unet_to_diffusers(config.unet_config)  # diffusers key -> LDM key
    out = {f"model.diffusion_model.{to_ldm[key]}": value for key, value in unet.items()}
    out.update({f"first_stage_model.{key}": value for key, value in comfy.diffusers_convert.convert_vae_state_dict(split(tdm, "vae.")).items()})
    out.update({f"cond_stage_model.transformer.text_model.{key}": value for key, value in split(tdm, "text_encoder.").items()})
    return {key: value.to(torch.float16).contiguous() for key, value in out.items()}


def lora(tdm: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """A rank-4 LoRA in the kohya naming ComfyUI reads (lora_unet_* / lora_te_*), strong enough to
    change a picture visibly."""
    generator = torch.Generator().manual_seed(seed)
    targets = {f"lora_unet_{key[5:-7].replace('.', '_')}": value for key, value in tdm.items() if key.startswith("unet.") and key.endswith(".weight") and any(f".{layer}.weight" in key for layer in LORA_LAYERS)}
    targets.update({f"lora_te_text_model_{key[13:-7].replace('.', '_')}": value for key, value in tdm.items() if key.startswith("text_encoder.") and any(f".{layer}.weight" in key for layer in LORA_TEXT_LAYERS)})
    out = {}
    for name, weight in targets.items():
        rows, columns = weight.shape
        out[f"{name}.lora_down.weight"] = torch.randn(LORA_RANK, columns, generator=generator) / columns**0.5
        out[f"{name}.lora_up.weight"] = torch.randn(rows, LORA_RANK, generator=generator) * 0.5
        out[f"{name}.alpha"] = torch.tensor(float(LORA_RANK))
    return {key: value.to(torch.float16) for key, value in out.items()}


def main(comfyui_path: str, tdm_file: str, checkpoint_file: str, lora_file: str) -> None:
    sys.path.insert(0, comfyui_path)
    import comfy.cli_args

    comfy.cli_args.args.cpu = not torch.cuda.is_available()  # before comfy.model_management looks for a device
    tdm = load_file(tdm_file)
    for path, tensors in ((checkpoint_file, checkpoint(tdm)), (lora_file, lora(tdm))):
        partial = Path(f"{path}.partial")
        save_file(tensors, str(partial))
        partial.replace(path)


if __name__ == "__main__":
    main(*sys.argv[1:])
