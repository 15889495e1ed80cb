"""The subject encoder: strict loading of the SDM's image_encoder.* + postfuse_module.* tensors,
config recovery, and the official image embedding (visual_projection(post_layernorm(CLS)))."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPVisionModelWithProjection

import factories
from paths import FACES
from facediffuser_core.weights.checkpoints import split_checkpoint
from facediffuser_core.errors import CheckpointError, ReferenceImageError
from facediffuser_core.method.preprocess import preprocess_references
from facediffuser_core.method.subject_encoder import VIT_L14, SubjectEncoder, vision_config, vision_config_from_state_dict

VISION, PROJECTION, POSTFUSE = "image_encoder.vision_model.", "image_encoder.visual_projection.", "postfuse_module."
TINY_CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=1, num_hidden_layers=2, patch_size=32, image_size=224, projection_dim=64
)


@pytest.fixture(scope="module")
def official() -> dict[str, torch.Tensor]:
    """A tiny SDM with the official keys (bfloat16 image encoder, position_ids buffers)."""
    return factories.official_state_dict("SDM")


@pytest.fixture(scope="module")
def subject_tensors(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    subject = split_checkpoint(official).subject_encoder
    assert subject is not None
    return subject


@pytest.fixture(scope="module")
def encoder(subject_tensors: dict[str, torch.Tensor]) -> SubjectEncoder:
    return SubjectEncoder.from_state_dict(subject_tensors).eval()


def config_numbers(config) -> dict[str, object]:
    return {key: getattr(config, key) for key in (*TINY_CONFIG, "hidden_act")}


def test_subject_tensors_are_the_official_subset(official: dict[str, torch.Tensor], subject_tensors: dict[str, torch.Tensor]) -> None:
    expected = {k for k in official if k.startswith((VISION, PROJECTION, POSTFUSE)) and not k.endswith("position_ids")}
    assert set(subject_tensors) == expected
    assert any(k.endswith("position_ids") for k in official), "the factory should include the legacy buffer"


def test_from_state_dict_loads_every_tensor(encoder: SubjectEncoder, subject_tensors: dict[str, torch.Tensor]) -> None:
    loaded = encoder.state_dict()
    assert set(loaded) == set(subject_tensors)
    for key, value in subject_tensors.items():
        assert torch.equal(loaded[key], value.to(loaded[key].dtype)), key


def test_tiny_config_is_recovered(subject_tensors: dict[str, torch.Tensor]) -> None:
    assert config_numbers(vision_config_from_state_dict(subject_tensors)) == {**TINY_CONFIG, "hidden_act": "quick_gelu"}


VIT_L14_NUMBERS = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_attention_heads=16,
    num_hidden_layers=24,
    patch_size=14,
    image_size=224,
    projection_dim=768,
    hidden_act="quick_gelu",
)


def test_default_config_is_vit_l14() -> None:
    assert VIT_L14 == VIT_L14_NUMBERS
    assert config_numbers(vision_config()) == VIT_L14_NUMBERS
    assert vision_config(num_hidden_layers=3).num_hidden_layers == 3


def test_vit_l14_shapes_and_config_recovery() -> None:
    with torch.device("meta"):  # ViT-L/14's real shapes without allocating its weights
        tensors = SubjectEncoder().state_dict()
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    assert shapes[VISION + "embeddings.patch_embedding.weight"] == (1024, 3, 14, 14)
    assert shapes[VISION + "embeddings.position_embedding.weight"] == (257, 1024)
    assert shapes[VISION + "encoder.layers.23.mlp.fc1.weight"] == (4096, 1024)
    assert shapes[PROJECTION + "weight"] == (768, 1024)
    assert shapes[POSTFUSE + "mlp1.fc1.weight"] == (768, 1536)
    assert not any(k.startswith(VISION + "encoder.layers.24.") for k in shapes)
    assert config_numbers(vision_config_from_state_dict(tensors)) == VIT_L14_NUMBERS


def with_tensor(tensors: dict[str, torch.Tensor], key: str, value: torch.Tensor | None) -> dict[str, torch.Tensor]:
    changed = dict(tensors)
    if value is None:
        del changed[key]
    else:
        changed[key] = value
    return changed


CONFIG_ERRORS = [
    pytest.param(VISION + "embeddings.patch_embedding.weight", None, r"lacks the tensor .*patch_embedding", id="no-patch"),
    pytest.param(PROJECTION + "weight", None, r"lacks the tensor image_encoder.visual_projection.weight", id="no-projection"),
    pytest.param(
        VISION + "embeddings.patch_embedding.weight", torch.zeros(96, 3, 32, 32), r"width 96 is not a multiple of 64", id="width"
    ),
    pytest.param(
        VISION + "embeddings.position_embedding.weight", torch.zeros(48, 64), r"48 position embeddings, not 1 \+ a square", id="grid"
    ),
]


@pytest.mark.parametrize(("key", "value", "message"), CONFIG_ERRORS)
def test_config_errors(subject_tensors: dict[str, torch.Tensor], key: str, value, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        SubjectEncoder.from_state_dict(with_tensor(subject_tensors, key, value))


LOAD_ERRORS = [
    pytest.param(POSTFUSE + "layer_norm.bias", None, r"Missing key.*postfuse_module.layer_norm.bias", id="missing"),
    pytest.param(POSTFUSE + "extra.weight", torch.zeros(1), r"Unexpected key.*postfuse_module.extra.weight", id="unexpected"),
    pytest.param(VISION + "embeddings.position_ids", torch.arange(50)[None], r"Unexpected key.*position_ids", id="legacy-buffer"),
    pytest.param(POSTFUSE + "layer_norm.bias", torch.zeros(32), r"size mismatch for postfuse_module.layer_norm.bias", id="shape"),
]


@pytest.mark.parametrize(("key", "value", "message"), LOAD_ERRORS)
def test_strict_load_errors(subject_tensors: dict[str, torch.Tensor], key: str, value, message: str) -> None:
    with pytest.raises(CheckpointError, match=f"(?s)do not fit a CLIP ViT \\+ postfuse module: .*{message}.*official SDM"):
        SubjectEncoder.from_state_dict(with_tensor(subject_tensors, key, value))


def test_postfuse_width_must_match_projection() -> None:
    with pytest.raises(ValueError, match=r"image embeddings \(64\) and text embeddings \(32\) must have one width"):
        SubjectEncoder(vision_config(**TINY_CONFIG), text_embed_dim=32)


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return preprocess_references(torch.rand(3, 40, 56, 3, generator=torch.Generator().manual_seed(0)))


def test_embed_is_the_official_image_embedding(encoder: SubjectEncoder, pixels: torch.Tensor) -> None:
    config = encoder.image_encoder.config
    reference = CLIPVisionModelWithProjection(config).double().eval()
    image_tensors = {k[len("image_encoder.") :]: v for k, v in encoder.state_dict().items() if k.startswith("image_encoder.")}
    reference.load_state_dict(image_tensors, strict=True)
    with torch.no_grad():
        embeds = encoder.embed(pixels)
        image_embeds = reference(pixel_values=pixels.double()).image_embeds
        vision = reference.vision_model(pixel_values=pixels.double())
        official = reference.visual_projection(vision[1])  # FastComposer: visual_projection(vision_model(x)[1])
        norm = reference.vision_model.post_layernorm
        cls = F.layer_norm(vision.last_hidden_state[:, 0], norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        by_hand = cls @ reference.visual_projection.weight.T
    assert embeds.shape == (3, config.projection_dim) and embeds.dtype == torch.float32
    torch.testing.assert_close(vision.pooler_output, cls, atol=1e-12, rtol=0)
    torch.testing.assert_close(official, by_hand, atol=1e-12, rtol=0)
    torch.testing.assert_close(image_embeds, by_hand, atol=1e-12, rtol=0)
    torch.testing.assert_close(embeds.double(), by_hand, atol=1e-4, rtol=1e-4)  # float32 vs float64


def test_embed_casts_pixels_to_the_weights_dtype(encoder: SubjectEncoder, pixels: torch.Tensor) -> None:
    with torch.no_grad():
        assert torch.equal(encoder.embed(pixels.double()), encoder.embed(pixels))


@pytest.fixture(scope="module")
def text_cond() -> torch.Tensor:
    return torch.randn(2, 77, factories.TINY_WIDTH, generator=torch.Generator().manual_seed(1))


def test_forward_fuses_each_image_at_its_marker(encoder: SubjectEncoder, text_cond: torch.Tensor) -> None:
    images = torch.rand(2, 40, 30, 3, generator=torch.Generator().manual_seed(2))
    positions = (5, 2)
    with torch.no_grad():
        out = encoder(text_cond, images, positions)
        expected = encoder.postfuse_module(text_cond, encoder.embed(preprocess_references(images)), positions)
    assert torch.equal(out, expected)
    changed = (out != text_cond).any(dim=-1)  # [B, L]
    assert changed[:, list(positions)].all()
    assert changed.sum() == len(positions) * text_cond.shape[0]


def test_forward_object_resolution_is_used(encoder: SubjectEncoder, text_cond: torch.Tensor) -> None:
    images = torch.rand(1, 40, 30, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = encoder(text_cond, images, [3], object_resolution=64)
        expected = encoder.postfuse_module(text_cond, encoder.embed(preprocess_references(images, 64)), [3])
    assert torch.equal(out, expected)


def test_forward_with_a_real_photo(encoder: SubjectEncoder, text_cond: torch.Tensor) -> None:
    with Image.open(FACES / "man1.jpeg") as image:
        photo = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).unsqueeze(0)
    with torch.no_grad():
        out = encoder(text_cond, photo, [2])
    assert out.shape == text_cond.shape and torch.isfinite(out).all()
    assert torch.equal(out[:, 3:], text_cond[:, 3:]) and torch.equal(out[:, :2], text_cond[:, :2])
    assert not torch.equal(out[:, 2], text_cond[:, 2])


ONE_IMAGE_PER_MARKER = [
    pytest.param(1, [2, 4], r"^marker 2 \('woman'\) has no photo: the prompt marks 2 subject\(s\) with <\|image\|> but 1 reference image\(s\) .* one reference image per marker", id="too-few"),
    pytest.param(2, [4], r"^2 reference image\(s\) were given but the prompt marks only 1 subject\(s\) with <\|image\|> \(marker 1 \('man'\)\): reference image 2 has no marker", id="too-many"),
]


@pytest.mark.parametrize(("count", "positions", "message"), ONE_IMAGE_PER_MARKER)
def test_one_image_per_marker(encoder: SubjectEncoder, text_cond: torch.Tensor, count: int, positions: list[int], message: str) -> None:
    with pytest.raises(ReferenceImageError, match=message):
        encoder(text_cond, torch.rand(count, 32, 32, 3), positions, words=("man", "woman")[: len(positions)])
