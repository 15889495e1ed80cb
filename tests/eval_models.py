"""Evaluation models built by the tests themselves (nothing is downloaded):

- the real CLIP BPE tokenizer files, from the vocabulary open-clip-torch ships;
- a tiny random CLIPModel (real architecture, small widths) saved as a Hugging Face folder;
- a random FaceNet InceptionResnetV1 whose BatchNorm statistics are calibrated on the test faces, so
  that random weights still give different faces clearly different embeddings (plain random weights
  map every face to nearly the same vector, which would hide matching mistakes).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from paths import FACES

HF_SPECIAL = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # open_clip -> Hugging Face names
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=1, num_hidden_layers=2, projection_dim=32, hidden_act="quick_gelu")
TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_attention_heads=1, num_hidden_layers=2, patch_size=32, image_size=224, projection_dim=32, hidden_act="quick_gelu")
FACENET_CLASSES = 8631  # VGGFace2, as in 20180402-114759-vggface2.pt


def write_clip_tokenizer(folder: Path) -> Path:
    """vocab.json + merges.txt of CLIP's BPE in the Hugging Face layout (special tokens named as in
    openai/clip-vit-large-patch14), from open_clip's tables."""
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer()
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {HF_SPECIAL.get(token, token): index for token, index in tokenizer.encoder.items()}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    ranked = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in ranked), encoding="utf-8")
    return folder


def tiny_clip_config() -> CLIPConfig:
    return CLIPConfig(text_config=CLIPTextConfig(**TINY_TEXT).to_dict(), vision_config=CLIPVisionConfig(**TINY_VISION).to_dict(), projection_dim=32)


def tiny_clip(seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    return CLIPModel(tiny_clip_config()).eval()


def write_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A Hugging Face CLIP folder (config.json, model.safetensors, tokenizer files)."""
    tiny_clip(seed).save_pretrained(str(folder))
    return write_clip_tokenizer(folder)


def face_photos() -> list[Image.Image]:
    """The shared test photos and scikit-image's astronaut, RGB."""
    import skimage.data

    return [Image.open(path).convert("RGB") for path in sorted(FACES.glob("*.jpeg"))] + [Image.fromarray(skimage.data.astronaut())]


def facenet_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random InceptionResnetV1 weights with a VGGFace2-sized classifier, BatchNorm statistics
    measured on the test faces (MTCNN's 160 px crops, also mirrored and flipped)."""
    from facenet_pytorch import MTCNN, InceptionResnetV1

    detector = MTCNN(image_size=160, margin=0, keep_all=True)
    crops = torch.cat([detector(photo)[:1] for photo in face_photos()])
    torch.manual_seed(seed)
    model = InceptionResnetV1(classify=True, num_classes=FACENET_CLASSES)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        model(torch.cat([crops, crops.flip(-1), crops.flip(-2)]))
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def write_facenet(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(facenet_state_dict(seed), path)
    return path
