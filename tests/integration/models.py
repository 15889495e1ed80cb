"""Random-weight SDM / TDM files for the real-ComfyUI suite, generated once and cached outside the repo
(``$FACEDIFFUSER_TEST_CACHE`` or ``~/.cache/facediffuser-tests``): SD1.5's text encoder, VAE and
subject encoder with the smallest UNet ComfyUI still loads as SD1.5 (``factories.unet("sd15_xs")``,
2.2 times faster per evaluation than SD1.5's), or, with ``full_size=True``, SD1.5's own UNet (the
benchmarks' figures are SD1.5's; the suite itself uses no full-size UNet: the few UNets with a middle
block it needs, test_comfy_guidance_hooks.py builds in memory)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import factories
from facediffuser_core.weights.convert import convert_checkpoint

CACHE_VERSION = "sd15xs-v2"  # the suite's models (sd15_xs UNets); bump when the generated files change
FULL_SIZE_VERSION = "sd15-v1"  # the full-size (sd15) set: its files are unchanged since v1
SDM_FILE = "facediffuser_sdm.safetensors"  # the names the README tells users to create
TDM_FILE = "facediffuser_tdm.safetensors"
SCENE_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"  # the names the scene-checkpoint workflow ships with
SCENE_LORA = "sd15_style_lora.safetensors"
FASTCOMPOSER_FILE = "fastcomposer.safetensors"  # the name the README and the FastComposer workflow use
FACENET = "facenet-random.pt"  # the score models as the suite's server lists them (models/facenet, models/clip_eval)
CLIP = "tiny-clip/model.safetensors"
CONTROLNET = "control_v11p_sd15_openpose_fp16.safetensors"  # the name download --controlnet openpose gives the file


@dataclass(frozen=True)
class ModelFiles:
    root: Path
    sdm_official: Path  # SDM/pytorch_model.bin, official layout and dtype mix
    tdm_official: Path
    sdm: Path  # converted fp16 safetensors
    tdm: Path
    sdxl_shaped: Path  # official layout but a 2048-wide (SDXL) cross-attention UNet


def cache_root(full_size: bool = False) -> Path:
    base = Path(os.environ.get("FACEDIFFUSER_TEST_CACHE", Path.home() / ".cache" / "facediffuser-tests"))
    return base / (FULL_SIZE_VERSION if full_size else CACHE_VERSION)


def _sdxl_shaped(path: Path) -> None:
    sd = factories.official_state_dict("SDM", "tiny")
    torch.manual_seed(0)
    unet = factories.UNet2DConditionModel(
        sample_size=8,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=2048,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    sd = {k: v for k, v in sd.items() if not k.startswith("unet.")}
    sd.update({"unet." + k: v for k, v in unet.state_dict().items()})
    from safetensors.torch import save_file

    save_file(sd, str(path))


def ensure_model_files(full_size: bool = False) -> ModelFiles:
    """Create the files if missing (minutes, once); a ``complete`` marker guards half-written caches.
    The UNets are ``sd15_xs`` (or ``sd15`` with ``full_size``), the rest SD1.5 in both: the same
    text encoder, VAE and subject encoder weights."""
    root = cache_root(full_size)
    files = ModelFiles(root, root / "SDM" / "pytorch_model.bin", root / "TDM" / "pytorch_model.bin", root / SDM_FILE, root / TDM_FILE, root / "sdxl_shaped.safetensors")
    marker = root / "complete"
    if marker.exists():
        return files
    root.mkdir(parents=True, exist_ok=True)
    for seed, kind in enumerate(("SDM", "TDM")):
        official = factories.write_official(root, kind, "sd15" if full_size else "sd15_xs", seed=10 * seed)
        convert_checkpoint(official, files.sdm if kind == "SDM" else files.tdm, dtype="fp16", progress=False)
    _sdxl_shaped(files.sdxl_shaped)
    marker.write_text("ok\n")
    return files


def ensure_fastcomposer_file(files: ModelFiles) -> Path:
    """The SDM test weights converted as FastComposer's model (the same layout; the kind recorded in
    its metadata), as the README tells users to convert the official file (a minute, once)."""
    from facediffuser_core.weights.checkpoints import ModelKind

    path = files.root / FASTCOMPOSER_FILE
    if not path.exists():
        convert_checkpoint(files.sdm, path, dtype=None, progress=False, kind=ModelKind.FASTCOMPOSER)
    return path


def ensure_scene_files(files: ModelFiles, comfyui_path: Path) -> tuple[Path, Path]:
    """A single-file SD1.5 checkpoint and a LoRA for it (scene_checkpoint.py, with ComfyUI's key
    maps; seconds, once): (checkpoint, lora)."""
    checkpoint, lora = files.root / SCENE_CHECKPOINT, files.root / SCENE_LORA
    if not (checkpoint.exists() and lora.exists()):
        script = Path(__file__).with_name("scene_checkpoint.py")
        subprocess.run([sys.executable, str(script), str(comfyui_path), str(files.tdm), str(checkpoint), str(lora)], check=True)
    return checkpoint, lora


def ensure_controlnet_file(files: ModelFiles, comfyui_path: Path) -> Path:
    """A random SD1.5 ControlNet in the openpose file's layout whose residuals fit the files' UNets
    (controlnet_file.py, with ComfyUI's own ControlNet class; seconds, once)."""
    path = files.root / CONTROLNET
    if not path.exists():
        script = Path(__file__).with_name("controlnet_file.py")
        subprocess.run([sys.executable, str(script), str(comfyui_path), str(files.tdm), str(path)], check=True)
    return path


if __name__ == "__main__":
    print(ensure_model_files("--full-size" in sys.argv[1:]))
