"""Prompt Consistency: CLIP loading (Hugging Face folder, single file + tokenizer folder), the image
preprocessing against transformers' CLIPImageProcessor, and the score against features computed by
hand with a tiny random CLIP and the real CLIP tokenizer."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig

import eval_models
from facediffuser_core.faces.consistency import clean_prompt, clip_config_from_state_dict, clip_pixels, load_clip, prompt_consistency
from facediffuser_core.errors import CheckpointError
from facediffuser_core.faces.detection import pil_to_image

PROMPT = "a photo of a man <|image|> reading a book in a cozy cafe"
VIT_L14_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768)
VIT_L14_VISION = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24, patch_size=14, image_size=224, projection_dim=768)


@pytest.fixture(scope="module")
def clip(tiny_clip_folder):
    return load_clip(tiny_clip_folder)


@pytest.fixture(scope="module")
def images(face_photos) -> torch.Tensor:
    """Two 'generated' images of one size: the astronaut and man2 resized to it."""
    return pil_to_image([face_photos[2].resize((320, 240)), face_photos[1].resize((320, 240))])


@torch.no_grad()
def by_hand(model: CLIPModel, tokenizer: CLIPTokenizer, pixels: torch.Tensor, texts: list[str]) -> np.ndarray:
    """Cosine of visual_projection(vision pooler) and text_projection(text pooler), in float64."""
    image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output).double().numpy()
    ids = [tokenizer(text)["input_ids"] for text in texts]  # unpadded: the EOS is the last token
    text = np.concatenate([model.text_projection(model.text_model(input_ids=torch.tensor([i])).pooler_output).double().numpy() for i in ids])
    return np.array([a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(image, text)])


@pytest.mark.parametrize("size", [(320, 240), (240, 320), (333, 301), (64, 64)], ids=["wide", "tall", "odd", "upscaled"])
def test_pixels_match_the_clip_image_processor(size, face_photos):
    photo = face_photos[0].resize(size, Image.Resampling.LANCZOS)
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})  # CLIP ViT-L/14's
    expected = processor(images=photo, return_tensors="pt")["pixel_values"]
    ours = clip_pixels(pil_to_image([photo]))
    assert ours.shape == expected.shape == (1, 3, 224, 224)
    # the processor resizes 8-bit images with PIL, rounding to 8 bits between its horizontal and vertical
    # passes; ours resizes in float: on average well under one 8-bit step (0.015 here), at most ten
    assert (ours - expected).abs().mean() < 0.005 and (ours - expected).abs().max() < 0.15


def test_score_matches_the_features_by_hand(clip, images):
    scores = prompt_consistency(clip.model, clip.tokenizer, images, PROMPT)
    expected = by_hand(clip.model, clip.tokenizer, clip_pixels(images), [clean_prompt(PROMPT)] * 2)
    assert scores.dtype == torch.float32 and scores.shape == (2,)
    assert np.allclose(scores.numpy(), expected, atol=1e-5)
    assert scores[0] != scores[1]


def test_one_prompt_per_image_and_padding(clip, images):
    prompts = ["a man", "an astronaut <|image|> in a white spacesuit standing next to a flag and a space shuttle model"]
    scores = prompt_consistency(clip.model, clip.tokenizer, images, prompts)  # padded to the longer prompt
    expected = by_hand(clip.model, clip.tokenizer, clip_pixels(images), [clean_prompt(p) for p in prompts])
    assert np.allclose(scores.numpy(), expected, atol=1e-5)
    with pytest.raises(ValueError, match="got 3 prompts for 2 images"):
        prompt_consistency(clip.model, clip.tokenizer, images, ["a", "b", "c"])


def test_markers_are_removed(clip, images):
    with_markers = prompt_consistency(clip.model, clip.tokenizer, images, "a man <|image|> and a man <|image|> playing chess")
    without = prompt_consistency(clip.model, clip.tokenizer, images, "a man and a man playing chess")
    assert torch.equal(with_markers, without)
    assert clean_prompt("a man <|image|>, smiling  <|image|>") == "a man , smiling"


def test_long_prompts_are_cut_to_77_tokens(clip, images):
    long = "a man <|image|> " + "very " * 120 + "happy"
    scores = prompt_consistency(clip.model, clip.tokenizer, images, long)
    ids = clip.tokenizer(clean_prompt(long), truncation=True, max_length=77)["input_ids"]
    assert len(ids) == 77
    pixels = clip_pixels(images)
    model = clip.model
    with torch.no_grad():  # projected pooled features by hand (get_*_features differ across transformers versions)
        text = model.text_projection(model.text_model(input_ids=torch.tensor([ids])).pooler_output)
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        expected = torch.nn.functional.cosine_similarity(image, text)
    assert torch.allclose(scores, expected, atol=1e-5)


def test_single_file_with_a_tokenizer_folder_scores_like_the_folder(clip, tiny_clip_folder, images, tmp_path):
    state = dict(clip.model.state_dict())
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # as old transformers saved it
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "clip.safetensors"))
    tokenizer_folder = eval_models.write_clip_tokenizer(tmp_path / "tokenizer")
    single = load_clip(tmp_path / "clip.safetensors", tokenizer_folder)
    assert torch.equal(
        prompt_consistency(single.model, single.tokenizer, images, PROMPT), prompt_consistency(clip.model, clip.tokenizer, images, PROMPT)
    )
    with pytest.raises(CheckpointError, match=r"single CLIP weights file: give the folder of a CLIP tokenizer"):
        load_clip(tmp_path / "clip.safetensors")
    with pytest.raises(CheckpointError, match=r"has no CLIP tokenizer \(vocab.json, merges.txt missing\)"):
        load_clip(tmp_path / "clip.safetensors", tmp_path)


def test_a_weights_file_inside_its_folder_loads_the_folder(clip, tiny_clip_folder, images):
    inside = load_clip(tiny_clip_folder / "model.safetensors")
    assert torch.equal(prompt_consistency(inside.model, inside.tokenizer, images, PROMPT), prompt_consistency(clip.model, clip.tokenizer, images, PROMPT))


def test_config_from_the_shapes_of_a_vit_l14_state_dict():
    config = CLIPConfig(text_config=CLIPTextConfig(**VIT_L14_TEXT).to_dict(), vision_config=CLIPVisionConfig(**VIT_L14_VISION).to_dict(), projection_dim=768)
    with torch.device("meta"):  # shapes only: no 1.7 GB of weights
        state = CLIPModel(config).state_dict()
    inferred = clip_config_from_state_dict(state)
    assert {k: getattr(inferred.text_config, k) for k in VIT_L14_TEXT} == VIT_L14_TEXT
    assert {k: getattr(inferred.vision_config, k) for k in VIT_L14_VISION} == VIT_L14_VISION
    assert inferred.projection_dim == 768 and inferred.text_config.max_position_embeddings == 77
    assert inferred.text_config.vocab_size == 49408 and inferred.text_config.hidden_act == "quick_gelu"


def test_clip_loading_errors(tiny_clip_folder, tmp_path):
    with pytest.raises(CheckpointError, match=r"no such CLIP model file or folder; download https://huggingface.co/openai/clip-vit-large-patch14"):
        load_clip(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="is a folder without config.json"):
        load_clip(tmp_path)
    vision_only = tmp_path / "vision"
    shutil.copytree(tiny_clip_folder, vision_only)
    config = json.loads((vision_only / "config.json").read_text())
    (vision_only / "config.json").write_text(json.dumps({**config, "model_type": "clip_vision_model"}))
    with pytest.raises(CheckpointError, match="holds a 'clip_vision_model' model, not a CLIP model with image and text towers"):
        load_clip(vision_only)
    save_file({"vision_model.embeddings.patch_embedding.weight": torch.zeros(64, 3, 32, 32)}, str(tmp_path / "vision.safetensors"))
    with pytest.raises(CheckpointError, match=r"is not a CLIP model with image and text towers \(the file lacks the CLIP text tensor"):
        load_clip(tmp_path / "vision.safetensors", eval_models.write_clip_tokenizer(tmp_path / "tok"))
