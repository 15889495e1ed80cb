"""Reference-image preprocessing against an independent float64 pipeline (explicit zero canvas,
torchvision resize, analytic CLIP normalisation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from paths import FACES
from facediffuser_core.errors import ReferenceImageError
from facediffuser_core.method.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_OBJECT_RESOLUTION,
    ENCODER_RESOLUTION,
    pad_to_square,
    preprocess_references,
    to_rgb,
)

# float32 resampling computes its sample coordinates in float32: on noise images that moves
# values by ~1e-5 (x 1/std after normalisation), far below one 8-bit level (1/255 / std ~ 0.015).
ATOL = 1e-4

MEAN64 = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=torch.float64).view(1, 3, 1, 1)
STD64 = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=torch.float64).view(1, 3, 1, 1)


def random_images(n: int, h: int, w: int, c: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, h, w, c, generator=torch.Generator().manual_seed(seed))


def centred_on_zero_canvas(images: torch.Tensor) -> torch.Tensor:
    """[N,C,H,W] -> [N,C,S,S], S = max(H, W), the image centred (the extra odd pixel after it)."""
    n, c, h, w = images.shape
    side = max(h, w)
    canvas = torch.zeros(n, c, side, side, dtype=images.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[:, :, top : top + h, left : left + w] = images
    return canvas


def reference_preprocess(images: torch.Tensor, object_resolution: int = DEFAULT_OBJECT_RESOLUTION) -> torch.Tensor:
    """[N,H,W,3] in 0..1 -> float64 [N,3,224,224], independently of facediffuser_core."""
    square = centred_on_zero_canvas(images.double().permute(0, 3, 1, 2))
    for size in (object_resolution, ENCODER_RESOLUTION):
        square = TF.resize(square, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return (square - MEAN64) / STD64


def test_constants() -> None:
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    assert (ENCODER_RESOLUTION, DEFAULT_OBJECT_RESOLUTION) == (224, 512)


@pytest.mark.parametrize("shape", [(1, 3, 5, 8), (2, 3, 9, 4), (1, 1, 7, 2), (1, 3, 2, 7), (1, 3, 6, 6)])
def test_pad_to_square_centres_on_zeros(shape: tuple[int, ...]) -> None:
    images = torch.rand(shape) + 0.1  # no zeros of its own
    padded = pad_to_square(images)
    assert torch.equal(padded, centred_on_zero_canvas(images))
    side = max(shape[-2:])
    assert padded.shape == (*shape[:2], side, side)
    assert int((padded != 0).sum()) == images.numel()


@pytest.mark.parametrize(
    ("size", "object_resolution"),
    [((37, 53), DEFAULT_OBJECT_RESOLUTION), ((80, 31), DEFAULT_OBJECT_RESOLUTION), ((300, 300), 256), ((20, 21), 64)],
)
def test_matches_reference_pipeline(size: tuple[int, int], object_resolution: int) -> None:
    images = random_images(2, *size)
    out = preprocess_references(images, object_resolution)
    assert out.shape == (2, 3, 224, 224) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference_preprocess(images, object_resolution), atol=ATOL, rtol=0)


def test_padding_reaches_the_output() -> None:
    """A tall image's left and right bands are padding: they hold exactly normalised black."""
    out = preprocess_references(torch.ones(1, 64, 16, 3), object_resolution=64)  # content in columns 24..39
    black = ((0 - MEAN64) / STD64).float().view(3, 1, 1)
    torch.testing.assert_close(out[0, :, :, :80], black.expand(3, 224, 80), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0, :, :, -80:], black.expand(3, 224, 80), atol=1e-6, rtol=0)


@pytest.mark.parametrize("colour", [(0.5, 0.5, 0.5), (0.2, 0.5, 0.9), (0.0, 1.0, 0.25)])
def test_constant_image_normalises_analytically(colour: tuple[float, float, float]) -> None:
    images = torch.tensor(colour).view(1, 1, 1, 3).expand(2, 40, 40, 3)
    out = preprocess_references(images)
    expected = [(c - m) / s for c, m, s in zip(colour, CLIP_MEAN, CLIP_STD)]
    for channel, value in enumerate(expected):  # channel order is R, G, B
        torch.testing.assert_close(out[:, channel], torch.full((2, 224, 224), value), atol=1e-6, rtol=0)


def test_object_resolution_224_is_a_single_resize() -> None:
    """As the official encoder skips its 224 resize when the object image is already 224."""
    images = random_images(1, 50, 70)
    square = centred_on_zero_canvas(images.permute(0, 3, 1, 2))
    once = TF.resize(square, [224, 224], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    expected = (once.double() - MEAN64) / STD64
    torch.testing.assert_close(preprocess_references(images, 224).double(), expected, atol=ATOL, rtol=0)


def test_grayscale_repeats_the_channel() -> None:
    gray = random_images(2, 30, 20, c=1)
    expected = preprocess_references(gray.expand(-1, -1, -1, 3))
    assert torch.equal(preprocess_references(gray), expected)
    gray_alpha = torch.cat([gray, torch.rand(2, 30, 20, 1)], dim=-1)
    assert torch.equal(preprocess_references(gray_alpha), expected)


def test_rgba_drops_alpha() -> None:
    rgba = random_images(2, 25, 33, c=4)
    assert torch.equal(preprocess_references(rgba), preprocess_references(rgba[..., :3].contiguous()))


def test_uint8_is_scaled() -> None:
    pixels = torch.randint(0, 256, (1, 30, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(to_rgb(pixels), (pixels.float() / 255.0).permute(0, 3, 1, 2))
    assert torch.equal(preprocess_references(pixels), preprocess_references(pixels.float() / 255.0))


def test_float64_and_single_image_layouts() -> None:
    image = random_images(1, 30, 40)
    expected = preprocess_references(image)
    assert torch.equal(preprocess_references(image.double()), expected)
    assert torch.equal(preprocess_references(image[0]), expected)  # [H,W,C]


def test_tiny_overshoot_is_clamped() -> None:
    image = random_images(1, 16, 16)
    image[0, 0, 0] = torch.tensor([1.0005, -0.0005, 1.0])
    clamped = image.clamp(0, 1)
    assert torch.equal(preprocess_references(image), preprocess_references(clamped))


def test_batch_items_are_independent() -> None:
    images = random_images(3, 40, 60)
    batch = preprocess_references(images)
    for i in range(3):
        torch.testing.assert_close(batch[i : i + 1], preprocess_references(images[i : i + 1]), atol=1e-6, rtol=0)


def load_face(name: str) -> torch.Tensor:
    with Image.open(FACES / name) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).unsqueeze(0)


@pytest.mark.parametrize("name", ["man1.jpeg", "man2.jpeg"])
def test_real_photos(name: str) -> None:
    photo = load_face(name)
    assert photo.shape[1] != photo.shape[2], "the test photos are not square, so padding is exercised"
    out = preprocess_references(photo)
    assert out.shape == (1, 3, 224, 224) and out.dtype == torch.float32
    low, high = (0 - MEAN64) / STD64, (1 - MEAN64) / STD64
    assert bool((out.double() >= low - 1e-5).all() and (out.double() <= high + 1e-5).all())
    torch.testing.assert_close(out.double(), reference_preprocess(photo), atol=ATOL, rtol=0)


BAD_INPUTS = [
    pytest.param(torch.rand(8, 8), r"must be \[N,H,W,C\] with 1 to 4 channels .* got \(8, 8\)", id="2d"),
    pytest.param(torch.rand(1, 1, 8, 8, 3), r"must be \[N,H,W,C\]", id="5d"),
    pytest.param(torch.rand(1, 8, 8, 5), r"1 to 4 channels .* got \(1, 8, 8, 5\)", id="5-channels"),
    pytest.param(torch.rand(1, 3, 16, 16), r"\(ComfyUI IMAGE layout\), got \(1, 3, 16, 16\)", id="channels-first"),
    pytest.param(torch.rand(0, 8, 8, 3), r"no reference images were given", id="empty-batch"),
    pytest.param(torch.rand(1, 0, 8, 3), r"at least 1x1 pixels, got \(1, 0, 8, 3\)", id="empty-image"),
    pytest.param(torch.full((1, 8, 8, 3), 1.5), r"must lie in 0..1, got 1.5..1.5; scale 0..255", id="above-1"),
    pytest.param(torch.full((1, 8, 8, 3), 255.0), r"must lie in 0..1, got 255..255", id="0-255-float"),
    pytest.param(torch.full((1, 8, 8, 3), -0.2), r"must lie in 0..1, got -0.2..-0.2", id="negative"),
    pytest.param(torch.full((1, 8, 8, 3), float("nan")), r"NaN or infinite values", id="nan"),
    pytest.param(torch.full((1, 8, 8, 3), float("inf")), r"NaN or infinite values", id="inf"),
    pytest.param(torch.ones(1, 8, 8, 3, dtype=torch.int32), r"float 0..1 or uint8, got torch.int32", id="int32"),
]


@pytest.mark.parametrize(("images", "message"), BAD_INPUTS)
def test_bad_images(images: torch.Tensor, message: str) -> None:
    with pytest.raises(ReferenceImageError, match=message):
        preprocess_references(images)


@pytest.mark.parametrize("resolution", [0, -4])
def test_bad_object_resolution(resolution: int) -> None:
    with pytest.raises(ReferenceImageError, match=f"object_resolution must be a positive pixel size, got {resolution}"):
        preprocess_references(random_images(1, 8, 8), resolution)
