"""Prompt Consistency (PC): CLIP similarity between a generated image and its prompt.

As in FastComposer's evaluation (which the Face-diffuser paper reports), with CLIP ViT-L/14: the image
is resized so its shorter side is 224 (bicubic), centre-cropped to 224x224 and CLIP-normalised; the
text is the prompt without its ``<|image|>`` markers, cut to CLIP's 77 tokens; PC is the cosine
similarity of the projected image and text features (not scaled by 100 as CLIPScore is).

The model is a transformers ``CLIPModel`` read from local files only (nothing is downloaded):
a Hugging Face folder (``config.json``, weights, ``vocab.json`` + ``merges.txt``), e.g.
openai/clip-vit-large-patch14 downloaded as it is; or a single ``.safetensors`` file of a CLIPModel
state dict, whose architecture is read from its tensor shapes and whose tokenizer comes from a
separate folder holding CLIP's ``vocab.json`` and ``merges.txt``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizer

from ..errors import CheckpointError
from ..method.preprocess import CLIP_MEAN, CLIP_STD, to_rgb
from ..method.prompt import MARKER
from ..method.subject_encoder import vision_config_from_state_dict
from ..weights.checkpoints import read_state_dict
from ..weights.model_folders import CLIP_TOKENIZER_FILES

__all__ = ["CLIP_URL", "Clip", "load_clip", "clip_config_from_state_dict", "clip_pixels", "clean_prompt", "prompt_consistency"]

CLIP_URL = "https://huggingface.co/openai/clip-vit-large-patch14"
_HEAD_DIM = 64  # every OpenAI CLIP uses 64-wide attention heads
_TEXT = "text_model."


class Clip(NamedTuple):
    model: CLIPModel
    tokenizer: CLIPTokenizer


def _tokenizer(folder: Path) -> CLIPTokenizer:
    missing = [name for name in CLIP_TOKENIZER_FILES if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{folder} has no CLIP tokenizer ({', '.join(missing)} missing); use the folder of {CLIP_URL}")
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def clip_config_from_state_dict(state_dict: dict[str, torch.Tensor]) -> CLIPConfig:
    """The CLIPModel config of a state dict, from its tensor shapes (64-wide heads, quick_gelu)."""
    try:
        tokens = state_dict[_TEXT + "embeddings.token_embedding.weight"]
        positions = state_dict[_TEXT + "embeddings.position_embedding.weight"].shape[0]
        intermediate = state_dict[_TEXT + "encoder.layers.0.mlp.fc1.weight"].shape[0]
        projection = state_dict["text_projection.weight"].shape[0]
    except KeyError as missing:
        raise CheckpointError(f"the file lacks the CLIP text tensor {missing.args[0]}: not a transformers CLIPModel state dict") from None
    layers = 1 + max(int(k[len(_TEXT + "encoder.layers.") :].split(".")[0]) for k in state_dict if k.startswith(_TEXT + "encoder.layers."))
    text = CLIPTextConfig(
        vocab_size=tokens.shape[0],
        hidden_size=tokens.shape[1],
        intermediate_size=intermediate,
        num_attention_heads=tokens.shape[1] // _HEAD_DIM,
        num_hidden_layers=layers,
        max_position_embeddings=positions,
        projection_dim=projection,
        hidden_act="quick_gelu",
    )
    vision = vision_config_from_state_dict(state_dict, prefix="")
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection)


def _load_file(path: Path, tokenizer_folder: Optional[Path]) -> Clip:
    if tokenizer_folder is None:
        if not all((path.parent / name).is_file() for name in CLIP_TOKENIZER_FILES):
            raise CheckpointError(
                f"{path} is a single CLIP weights file: give the folder of a CLIP tokenizer (vocab.json, merges.txt) "
                f"too, or use the whole folder of {CLIP_URL}"
            )
        tokenizer_folder = path.parent
    state = {k: v for k, v in read_state_dict(path).items() if not k.endswith("position_ids")}
    try:
        model = CLIPModel(clip_config_from_state_dict(state))
        model.load_state_dict(state, strict=True)
    except (CheckpointError, RuntimeError) as error:
        detail = str(error).strip().splitlines()[0]
        raise CheckpointError(f"{path} is not a CLIP model with image and text towers ({detail}); use {CLIP_URL}") from None
    return Clip(model.eval(), _tokenizer(Path(tokenizer_folder)))


def _load_folder(folder: Path) -> Clip:
    config = folder / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{folder} is a folder without config.json: not a Hugging Face CLIP model folder; download {CLIP_URL}")
    kind = json.loads(config.read_text()).get("model_type")
    if kind != "clip":
        raise CheckpointError(f"{folder} holds a '{kind}' model, not a CLIP model with image and text towers; use {CLIP_URL}")
    try:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{folder}: the CLIP weights could not be loaded ({str(error).strip().splitlines()[0]})") from None
    return Clip(model.eval(), _tokenizer(folder))


def load_clip(path: Union[str, Path], tokenizer_folder: Union[str, Path, None] = None) -> Clip:
    """A CLIP model on the CPU in float32, from a Hugging Face folder (or a weights file inside one, i.e.
    next to its config.json), or from a single state-dict file plus ``tokenizer_folder``."""
    path = Path(path)
    if path.is_dir():
        return _load_folder(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such CLIP model file or folder; download {CLIP_URL}")
    if (path.parent / "config.json").is_file():
        return _load_folder(path.parent)
    return _load_file(path, None if tokenizer_folder is None else Path(tokenizer_folder))


def clip_pixels(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """IMAGE [N,H,W,C] (0..1) -> CLIP input [N,3,size,size]: shorter side to ``size`` (bicubic,
    antialiased as PIL resizes), centre crop, CLIP normalisation."""
    pixels = to_rgb(images, "images")
    height, width = pixels.shape[-2:]
    if height <= width:
        new_height, new_width = size, int(size * width / height)
    else:
        new_height, new_width = int(size * height / width), size
    resized = F.interpolate(pixels, size=(new_height, new_width), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    crop = resized[..., top : top + size, left : left + size]
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (crop - mean) / std


def clean_prompt(prompt: str) -> str:
    """The prompt without ``<|image|>`` markers, whitespace collapsed."""
    return " ".join(prompt.replace(MARKER, " ").split())


def _projected(features) -> torch.Tensor:
    """``get_*_features`` returns the projected features (transformers 4) or an output holding them
    as ``pooler_output`` (transformers 5)."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


@torch.no_grad()
def prompt_consistency(model: CLIPModel, tokenizer: CLIPTokenizer, images: torch.Tensor, prompts: Union[str, Sequence[str]]) -> torch.Tensor:
    """[N] float32 PC of IMAGE [N,H,W,C]; ``prompts``: one for every image, or one per image."""
    count = images.shape[0] if images.ndim == 4 else 1
    texts = [prompts] * count if isinstance(prompts, str) else list(prompts)
    if len(texts) != count:
        raise ValueError(f"got {len(texts)} prompts for {count} images; give one prompt, or one per image")
    param = next(model.parameters())
    pixels = clip_pixels(images, model.config.vision_config.image_size).to(device=param.device, dtype=param.dtype)
    tokens = tokenizer(
        [clean_prompt(text) for text in texts],
        padding=True,
        truncation=True,
        max_length=model.config.text_config.max_position_embeddings,
        return_tensors="pt",
    ).to(param.device)
    image_features = _projected(model.get_image_features(pixel_values=pixels))
    text_features = _projected(model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]))
    return F.cosine_similarity(image_features.float(), text_features.float(), dim=-1).cpu()
