"""Saliency-adaptive Noise Fusion against the official formulation and a float64 reference."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import Resize

from facediffuser_core.method.snf import fuse_noise, saliency_map


def official_fusion(eps_scene, eps_subject, response_scene, response_subject):
    """The official pipeline's fusion step, op for op (4x64x64 latents only)."""
    pool = torch.nn.AvgPool2d(4, padding=1, stride=1)
    resize = Resize(64)
    guided = torch.cat((eps_scene.unsqueeze(0), eps_subject.unsqueeze(0)), dim=0)
    responses = torch.cat((response_scene.unsqueeze(0), response_subject.unsqueeze(0)), dim=0)
    sal = resize(pool(responses.abs().reshape((-1, 4, 64, 64)))).reshape((2, -1, 4, 64, 64))
    sal = sal.mean(dim=2, keepdim=True).repeat(1, 1, 4, 1, 1)
    n, c, h, w = sal[0].shape
    sal[0] = torch.softmax(sal[0].reshape((n * c, h * w)), dim=1).reshape((n, c, h, w))
    sal[1] = torch.softmax(sal[1].reshape((n * c, h * w)), dim=1).reshape((n, c, h, w))
    choice = torch.argmax(sal, dim=0, keepdim=True)
    return torch.gather(guided, 0, choice)[0], sal


def reference_saliency_f64(response):
    """Independent float64 saliency: explicit zero-padded 4x4 box sums, hand-written bilinear
    resize (half-pixel centres, edge clamp), channel mean, softmax."""
    r = response.double().abs()
    b, c, h, w = r.shape
    padded = F.pad(r, (1, 1, 1, 1))
    box = torch.zeros(b, c, h - 1, w - 1, dtype=torch.float64)
    for dy in range(4):
        for dx in range(4):
            box += padded[:, :, dy : dy + h - 1, dx : dx + w - 1]
    box /= 16.0

    def axis_weights(out_size, in_size):
        scale = in_size / out_size
        src = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0)
        lo = src.floor().long().clamp(max=in_size - 1)
        hi = (lo + 1).clamp(max=in_size - 1)
        frac = src - lo
        m = torch.zeros(out_size, in_size, dtype=torch.float64)
        m[torch.arange(out_size), lo] += 1 - frac
        m[torch.arange(out_size), hi] += frac
        return m

    up = torch.einsum("yi,bcij,xj->bcyx", axis_weights(h, h - 1), box, axis_weights(w, w - 1))
    mean = up.mean(dim=1, keepdim=True)
    return torch.softmax(mean.reshape(b, -1), dim=1).reshape(b, 1, h, w)


def random_inputs(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(4)]


@pytest.mark.parametrize("batch", [1, 3])
def test_matches_official_on_64x64(batch):
    eps_scene, eps_subject, resp_scene, resp_subject = random_inputs((batch, 4, 64, 64), seed=batch)
    expected, official_sal = official_fusion(eps_scene, eps_subject, resp_scene, resp_subject)
    eps, mask = fuse_noise(eps_scene, eps_subject, resp_scene, resp_subject)
    assert (eps - expected).abs().max().item() <= 1e-6
    assert torch.equal(mask.expand(-1, 4, -1, -1), official_sal[1] > official_sal[0])
    assert (saliency_map(resp_scene) - official_sal[0][:, :1]).abs().max().item() <= 1e-6
    assert 0 < mask.float().mean().item() < 1  # both models own part of the image


@pytest.mark.parametrize("shape", [(1, 4, 64, 64), (2, 4, 96, 64), (1, 4, 56, 80), (3, 4, 5, 4), (1, 4, 4, 4)])
def test_saliency_matches_float64_reference(shape):
    response = torch.randn(shape, generator=torch.Generator().manual_seed(7)) * 5
    ours = saliency_map(response)
    ref = reference_saliency_f64(response)
    assert ours.shape == (shape[0], 1, *shape[2:]) and ours.dtype == torch.float32
    assert torch.allclose(ours.double(), ref, rtol=1e-5, atol=1e-9)
    assert torch.allclose(ours.sum(dim=(1, 2, 3)), torch.ones(shape[0]), atol=1e-5)


@pytest.mark.parametrize("size", [(64, 96), (80, 56), (96, 64)])  # 512x768, 640x448, 768x512 images
def test_salient_subject_blob_is_owned_by_subject(size):
    h, w = size
    eps_scene = torch.full((2, 4, h, w), 1.0)
    eps_subject = torch.full((2, 4, h, w), -1.0)
    response_scene = 0.1 * torch.ones(2, 4, h, w)
    response_subject = 0.1 * torch.ones(2, 4, h, w)
    # sample 0: blob in the top-left quadrant; sample 1: blob bottom-right
    response_subject[0, :, 4:16, 6:20] = 3.0
    response_subject[1, :, h - 16 : h - 4, w - 20 : w - 6] = 3.0
    eps, mask = fuse_noise(eps_scene, eps_subject, response_scene, response_subject)
    assert mask[0, 0, 8:12, 10:16].all() and mask[1, 0, h - 12 : h - 8, w - 16 : w - 10].all()
    assert not mask[0, 0, h // 2 :, :].any() and not mask[1, 0, : h // 2, :].any()
    assert torch.equal(eps[mask.expand_as(eps)], eps_subject[mask.expand_as(eps)])
    assert torch.equal(eps[~mask.expand_as(eps)], eps_scene[~mask.expand_as(eps)])


def test_salient_scene_region_is_owned_by_scene():
    response_scene = 0.1 * torch.ones(1, 4, 32, 32)
    response_scene[0, :, 10:20, 10:20] = 4.0
    response_subject = 0.2 * torch.ones(1, 4, 32, 32)
    _, mask = fuse_noise(torch.zeros(1, 4, 32, 32), torch.ones(1, 4, 32, 32), response_scene, response_subject)
    assert not mask[0, 0, 12:18, 12:18].any()
    assert mask[0, 0, :4, :4].all()  # elsewhere the subject's flat response is relatively more salient


def test_ties_go_to_scene():
    response = torch.randn(2, 4, 16, 16)
    eps, mask = fuse_noise(torch.zeros(2, 4, 16, 16), torch.ones(2, 4, 16, 16), response, response.clone())
    assert not mask.any() and torch.equal(eps, torch.zeros(2, 4, 16, 16))


def test_saliency_is_invariant_to_response_sign():
    response = torch.randn(1, 4, 20, 24)
    assert torch.equal(saliency_map(response), saliency_map(-response))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    inputs32 = random_inputs((2, 4, 40, 48), seed=3)
    inputs_half = [t.to(dtype) for t in inputs32]
    eps, mask = fuse_noise(*inputs_half)
    assert eps.dtype == dtype and mask.dtype == torch.bool
    sal = saliency_map(inputs_half[2])
    assert sal.dtype == torch.float32 and torch.isfinite(sal).all()
    # the mask computed from half inputs equals the float32 mask of the same (rounded) values
    _, mask_ref = fuse_noise(*[t.float() for t in inputs_half])
    assert torch.equal(mask, mask_ref)


def test_large_responses_do_not_overflow_in_half():
    response = torch.full((1, 4, 16, 16), 60000.0, dtype=torch.float16)
    response[0, :, :4, :4] = 65000.0
    sal = saliency_map(response)
    assert torch.isfinite(sal).all() and abs(sal.sum().item() - 1) < 1e-5


@pytest.mark.parametrize(
    "shapes, message",
    [
        ([(1, 4, 8, 8)] * 3 + [(1, 4, 8, 9)], "one shape"),
        ([(1, 4, 3, 8)] * 4, "at least 4x4"),
        ([(4, 8, 8)] * 4, r"\[B,C,H,W\]"),
    ],
)
def test_bad_shapes_are_rejected(shapes, message):
    with pytest.raises(ValueError, match=message):
        fuse_noise(*[torch.zeros(s) for s in shapes])
