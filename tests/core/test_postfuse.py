"""The postfuse module: official parameter names and shapes, and fusion against a float64
re-implementation of the official ``fuse_fn``."""

from __future__ import annotations

from typing import Mapping, Sequence

import pytest
import torch
import torch.nn.functional as F

import factories
from facediffuser_core.postfuse import MLP, TEXT_EMBED_DIM, PostfuseModule

D = TEXT_EMBED_DIM

# The official postfuse_module.* tensors (prefix stripped) and their shapes at D = 768.
OFFICIAL_SHAPES: dict[str, tuple[int, ...]] = {
    "mlp1.layernorm.weight": (2 * D,),
    "mlp1.layernorm.bias": (2 * D,),
    "mlp1.fc1.weight": (D, 2 * D),
    "mlp1.fc1.bias": (D,),
    "mlp1.fc2.weight": (D, D),
    "mlp1.fc2.bias": (D,),
    "mlp2.layernorm.weight": (D,),
    "mlp2.layernorm.bias": (D,),
    "mlp2.fc1.weight": (D, D),
    "mlp2.fc1.bias": (D,),
    "mlp2.fc2.weight": (D, D),
    "mlp2.fc2.bias": (D,),
    "layer_norm.weight": (D,),
    "layer_norm.bias": (D,),
}


def random_official_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors for every official key; LayerNorm scales near 1 keep outputs O(1)."""
    generator = torch.Generator().manual_seed(seed)
    weights = {k: torch.randn(shape, generator=generator) * 0.05 for k, shape in OFFICIAL_SHAPES.items()}
    for key in ("mlp1.layernorm.weight", "mlp2.layernorm.weight", "layer_norm.weight"):
        weights[key] = 1 + 2 * weights[key]
    return weights


@pytest.fixture(scope="module")
def module() -> PostfuseModule:
    """A D = 768 module with random weights everywhere (LayerNorm affines included)."""
    postfuse = PostfuseModule()
    postfuse.load_state_dict(random_official_weights(), strict=True)
    return postfuse.eval()


@pytest.fixture(scope="module")
def weights64(module: PostfuseModule) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in module.state_dict().items()}


def reference_fuse(weights: Mapping[str, torch.Tensor], text: torch.Tensor, subject: torch.Tensor) -> torch.Tensor:
    """Official ``fuse_fn`` in float64: mlp1(cat(text, subject)) + text -> mlp2 -> layer_norm."""
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
    assert shapes == OFFICIAL_SHAPES


def test_official_weights_load_strictly(module: PostfuseModule) -> None:
    for key, value in random_official_weights().items():
        assert torch.equal(module.state_dict()[key], value), key


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_strict_load_rejects_other_keys(change: str) -> None:
    weights = random_official_weights()
    if change == "missing":
        del weights["mlp2.fc1.bias"]
    else:
        weights["mlp3.fc1.bias"] = torch.zeros(D)
    with pytest.raises(RuntimeError, match="mlp2.fc1.bias" if change == "missing" else "mlp3.fc1.bias"):
        PostfuseModule().load_state_dict(weights, strict=True)


def test_factory_checkpoint_postfuse_loads() -> None:
    """The tiny official-layout SDM's postfuse_module.* tensors load into a module of its width."""
    prefix = "postfuse_module."
    weights = {k[len(prefix) :]: v for k, v in factories.official_state_dict("SDM").items() if k.startswith(prefix)}
    PostfuseModule(factories.TINY_WIDTH).load_state_dict(weights, strict=True)


def test_residual_mlp_needs_equal_widths() -> None:
    with pytest.raises(ValueError, match="in_dim == out_dim"):
        MLP(8, 4, 8, use_residual=True)


def test_fuse_matches_official(module: PostfuseModule, weights64: dict[str, torch.Tensor]) -> None:
    generator = torch.Generator().manual_seed(1)
    text, subject = torch.randn(2, 5, D, generator=generator), torch.randn(2, 5, D, generator=generator)
    with torch.no_grad():
        fused = module.fuse(text, subject)
    expected = reference_fuse(weights64, text, subject)
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
    module: PostfuseModule, weights64: dict[str, torch.Tensor], batch: int, positions: Sequence[int], dtype: torch.dtype
) -> None:
    text, subjects = inputs(batch, 12, len(positions), dtype)
    original = text.clone()
    with torch.no_grad():
        out = module(text, subjects, positions)
    assert out.dtype == dtype and out.shape == text.shape
    assert out.data_ptr() != text.data_ptr() and torch.equal(text, original)
    for subject, position in enumerate(positions):  # subject i goes to marker i, in every batch row
        expected = reference_fuse(weights64, text[:, position], subjects[subject].expand(batch, D))
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
