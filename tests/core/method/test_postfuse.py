"""The postfuse module: official parameter names and shapes, and fusion against a float64
re-implementation of the official ``fuse_fn``."""

from __future__ import annotations

from typing import Mapping, Sequence

import pytest
import torch
import torch.nn.functional as F

import factories
from facediffuser_core.method.postfuse import MLP, TEXT_EMBED_DIM, PostfuseModule

D = TEXT_EMBED_DIM

def official_shapes(width: int) -> dict[str, tuple[int, ...]]:
    """The official ``postfuse_module.*`` tensors (prefix stripped) and their shapes at text width
    ``width``: FastComposer's PostfuseModule(embed_dim) is mlp1 = MLP(2D -> D, hidden D, no residual),
    mlp2 = MLP(D -> D, hidden D, residual), then a LayerNorm(D); each MLP holds a LayerNorm of its
    input, fc1 and fc2."""
    return {
        "mlp1.layernorm.weight": (2 * width,),
        "mlp1.layernorm.bias": (2 * width,),
        "mlp1.fc1.weight": (width, 2 * width),
        "mlp1.fc1.bias": (width,),
        "mlp1.fc2.weight": (width, width),
        "mlp1.fc2.bias": (width,),
        "mlp2.layernorm.weight": (width,),
        "mlp2.layernorm.bias": (width,),
        "mlp2.fc1.weight": (width, width),
        "mlp2.fc1.bias": (width,),
        "mlp2.fc2.weight": (width, width),
        "mlp2.fc2.bias": (width,),
        "layer_norm.weight": (width,),
        "layer_norm.bias": (width,),
    }


def random_official_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors for every official key at D = 768; LayerNorm scales near 1 keep outputs O(1)."""
    generator = torch.Generator().manual_seed(seed)
    weights = {k: torch.randn(shape, generator=generator) * 0.05 for k, shape in official_shapes(D).items()}
    for key in ("mlp1.layernorm.weight", "mlp2.layernorm.weight", "layer_norm.weight"):
        weights[key] = 1 + 2 * weights[key]
    return weights


def loaded(weights: Mapping[str, torch.Tensor], width: int = D) -> PostfuseModule:
    postfuse = PostfuseModule(width)
    postfuse.load_state_dict(dict(weights), strict=True)
    return postfuse.eval()


@pytest.fixture(scope="module")
def official() -> dict[str, torch.Tensor]:
    """Official-layout weights, random everywhere (LayerNorm affines included)."""
    return random_official_weights()


@pytest.fixture(scope="module")
def module(official: dict[str, torch.Tensor]) -> PostfuseModule:
    return loaded(official)


def reference_fuse(weights: Mapping[str, torch.Tensor], text: torch.Tensor, subject: torch.Tensor) -> torch.Tensor:
    """Official ``fuse_fn`` in float64 from the official tensors by name:
    mlp1(cat(text, subject)) + text -> mlp2 (with its residual) -> layer_norm."""
    w = {k: v.double() for k, v in weights.items()}

    def layer_norm(prefix: str, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], w[prefix + ".weight"], w[prefix + ".bias"], eps=1e-5)

    def mlp(prefix: str, x: torch.Tensor, residual: bool) -> torch.Tensor:
        hidden = F.gelu(F.linear(layer_norm(prefix + ".layernorm", x), w[prefix + ".fc1.weight"], w[prefix + ".fc1.bias"]))
        out = F.linear(hidden, w[prefix + ".fc2.weight"], w[prefix + ".fc2.bias"])
        return out + x if residual else out

    text, subject = text.double(), subject.double()
    fused = mlp("mlp1", torch.cat([text, subject], dim=-1), residual=False) + text
    return layer_norm("layer_norm", mlp("mlp2", fused, residual=True))


def test_parameter_names_and_shapes() -> None:
    shapes = {k: tuple(v.shape) for k, v in PostfuseModule().state_dict().items()}
    assert shapes == official_shapes(D)


def test_known_weights_give_the_closed_form_fusion(official: dict[str, torch.Tensor]) -> None:
    """With both MLPs' fc2 weights zero, each MLP outputs its fc2 bias, so the official fusion is
    g * normalize(text + b1 + b2) + h (mlp1's bias b1, mlp2's bias b2, the final LayerNorm's g, h),
    whatever the subject: this pins which tensor plays which role and both residuals."""
    generator = torch.Generator().manual_seed(3)
    weights = dict(official)
    b1, b2, g, h = (torch.randn(D, generator=generator) for _ in range(4))
    weights.update({"mlp1.fc2.weight": torch.zeros(D, D), "mlp1.fc2.bias": b1, "mlp2.fc2.weight": torch.zeros(D, D), "mlp2.fc2.bias": b2})
    weights.update({"layer_norm.weight": g, "layer_norm.bias": h})
    text, subjects = torch.randn(4, D, generator=generator), torch.randn(2, 4, D, generator=generator)
    x = text.double() + b1.double() + b2.double()
    normalized = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    expected = g.double() * normalized + h.double()
    postfuse = loaded(weights)
    with torch.no_grad():
        for subject in subjects:
            torch.testing.assert_close(postfuse.fuse(text, subject).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change", ["missing", "unexpected", "misshaped"])
def test_strict_load_rejects_other_keys(change: str) -> None:
    weights = random_official_weights()
    if change == "missing":
        del weights["mlp2.fc1.bias"]
    elif change == "unexpected":
        weights["mlp3.fc1.bias"] = torch.zeros(D)
    else:
        weights["mlp1.fc1.weight"] = torch.zeros(D, D)  # a D -> D first layer: the subject half is missing
    message = {"missing": "Missing key.*mlp2.fc1.bias", "unexpected": "Unexpected key.*mlp3.fc1.bias", "misshaped": r"size mismatch for mlp1.fc1.weight"}
    with pytest.raises(RuntimeError, match=message[change]):
        PostfuseModule().load_state_dict(weights, strict=True)


def test_the_tiny_sdm_postfuse_is_official_and_fuses_as_the_reference() -> None:
    """The postfuse_module.* tensors of the tiny official-layout SDM the other tests load have the
    official names and shapes at its width, and fuse as the float64 reference does."""
    prefix, width = "postfuse_module.", factories.TINY_WIDTH
    weights = {k[len(prefix) :]: v for k, v in factories.official_state_dict("SDM").items() if k.startswith(prefix)}
    assert {k: tuple(v.shape) for k, v in weights.items()} == official_shapes(width)
    generator = torch.Generator().manual_seed(2)
    text, subject = torch.randn(3, width, generator=generator), torch.randn(3, width, generator=generator)
    with torch.no_grad():
        fused = loaded(weights, width).fuse(text, subject)
    torch.testing.assert_close(fused.double(), reference_fuse(weights, text, subject), atol=1e-5, rtol=1e-5)


def test_residual_mlp_needs_equal_widths() -> None:
    with pytest.raises(ValueError, match="in_dim == out_dim"):
        MLP(8, 4, 8, use_residual=True)


def test_fuse_matches_official(module: PostfuseModule, official: dict[str, torch.Tensor]) -> None:
    generator = torch.Generator().manual_seed(1)
    text, subject = torch.randn(2, 5, D, generator=generator), torch.randn(2, 5, D, generator=generator)
    with torch.no_grad():
        fused = module.fuse(text, subject)
    expected = reference_fuse(official, text, subject)
    torch.testing.assert_close(fused.double(), expected, atol=1e-5, rtol=1e-5)


def inputs(batch: int, length: int, subjects: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch * 100 + subjects)
    return (
        torch.randn(batch, length, D, generator=generator).to(dtype),
        torch.randn(subjects, D, generator=generator),
    )


TOLERANCES = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # output rounding


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize(("batch", "positions"), [(1, [2]), (3, [7, 2]), (2, [1, 4, 9, 3])])
def test_forward_writes_fused_embeddings_at_marked_positions(
    module: PostfuseModule, official: dict[str, torch.Tensor], batch: int, positions: Sequence[int], dtype: torch.dtype
) -> None:
    text, subjects = inputs(batch, 12, len(positions), dtype)
    original = text.clone()
    with torch.no_grad():
        out = module(text, subjects, positions)
    assert out.dtype == dtype and out.shape == text.shape
    assert out.data_ptr() != text.data_ptr() and torch.equal(text, original)
    for subject, position in enumerate(positions):  # subject i goes to marker i, in every batch row
        expected = reference_fuse(official, text[:, position], subjects[subject].expand(batch, D))
        tol = TOLERANCES[dtype]
        torch.testing.assert_close(out[:, position].double(), expected, atol=tol, rtol=tol)
    untouched = [i for i in range(text.shape[1]) if i not in positions]
    assert torch.equal(out[:, untouched], text[:, untouched])


def test_subject_order_follows_marker_order(module: PostfuseModule) -> None:
    text, subjects = inputs(2, 10, 2)
    with torch.no_grad():
        forward = module(text, subjects, [3, 6])
        swapped = module(text, subjects.flip(0), [6, 3])
        crossed = module(text, subjects.flip(0), [3, 6])
    assert torch.equal(forward, swapped)
    assert not torch.allclose(forward[:, 3], crossed[:, 3], atol=1e-3)


def test_no_subjects_returns_a_copy(module: PostfuseModule) -> None:
    text, subjects = inputs(2, 6, 0)
    out = module(text, subjects, [])
    assert torch.equal(out, text) and out.data_ptr() != text.data_ptr()


ERRORS = [
    pytest.param((2, 6, D + 1), (1, D), [1], r"text_cond must be \[B, L, 768\], got \(2, 6, 769\)", id="text-width"),
    pytest.param((6, D), (1, D), [1], r"text_cond must be \[B, L, 768\]", id="text-2d"),
    pytest.param((2, 6, D), (1, 1, D), [1], r"subject_embeds must be \[S, 768\], got \(1, 1, 768\)", id="subject-3d"),
    pytest.param((2, 6, D), (1, 32), [1], r"subject_embeds must be \[S, 768\]", id="subject-width"),
    pytest.param((2, 6, D), (2, D), [1], r"1 marked positions for 2 subject embeddings", id="count"),
    pytest.param((2, 6, D), (1, D), [6], r"\[6\] fall outside a sequence of 6 tokens", id="past-end"),
    pytest.param((2, 6, D), (1, D), [-1], r"\[-1\] fall outside", id="negative"),
    pytest.param((2, 6, D), (2, D), [3, 3], r"\[3, 3\] repeat a token", id="duplicate"),
]


@pytest.mark.parametrize(("text_shape", "subject_shape", "positions", "message"), ERRORS)
def test_forward_errors(module: PostfuseModule, text_shape, subject_shape, positions, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        module(torch.zeros(text_shape), torch.zeros(subject_shape), positions)
