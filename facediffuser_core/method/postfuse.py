"""The postfuse MLP that fuses a subject's image embedding into its class word's text embedding.

Architecture and parameter names follow the official ``postfuse_module.*`` weights, so they
load with ``strict=True``: ``mlp1`` (2D -> D, no residual), ``mlp2`` (D -> D, residual),
``layer_norm``; each MLP is LayerNorm -> Linear -> GELU -> Linear (+ input if residual).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["MLP", "PostfuseModule", "TEXT_EMBED_DIM"]

TEXT_EMBED_DIM = 768  # SD1.5's CLIP-L text width


class MLP(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, use_residual: bool = True) -> None:
        super().__init__()
        if use_residual and in_dim != out_dim:
            raise ValueError(f"a residual MLP needs in_dim == out_dim, got {in_dim} and {out_dim}")
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.use_residual = use_residual
        self.act_fn = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(self.act_fn(self.fc1(self.layernorm(x))))
        return y + x if self.use_residual else y


class PostfuseModule(nn.Module):
    """Fuses D-dim subject embeddings into D-dim text embeddings at marked token positions."""

    def __init__(self, embed_dim: int = TEXT_EMBED_DIM) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.mlp1 = MLP(embed_dim * 2, embed_dim, embed_dim, use_residual=False)
        self.mlp2 = MLP(embed_dim, embed_dim, embed_dim, use_residual=True)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def fuse(self, text_embeds: torch.Tensor, subject_embeds: torch.Tensor) -> torch.Tensor:
        """[..., D] text and subject embeddings -> [..., D] fused embeddings."""
        fused = self.mlp1(torch.cat([text_embeds, subject_embeds], dim=-1)) + text_embeds
        return self.layer_norm(self.mlp2(fused))

    def forward(self, text_cond: torch.Tensor, subject_embeds: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        """Write fused embeddings at ``positions`` (subjects in marker order) into a copy of ``text_cond``.

        Args:
            text_cond: [B, L, D] text-encoder output of the clean prompt.
            subject_embeds: [S, D] one embedding per subject.
            positions: S token indices into L (BOS is 0).

        Returns:
            a new [B, L, D] tensor in ``text_cond``'s dtype; other positions are unchanged.
        """
        if text_cond.ndim != 3 or text_cond.shape[-1] != self.embed_dim:
            raise ValueError(f"text_cond must be [B, L, {self.embed_dim}], got {tuple(text_cond.shape)}")
        if subject_embeds.ndim != 2 or subject_embeds.shape[-1] != self.embed_dim:
            raise ValueError(f"subject_embeds must be [S, {self.embed_dim}], got {tuple(subject_embeds.shape)}")
        if len(positions) != subject_embeds.shape[0]:
            raise ValueError(f"{len(positions)} marked positions for {subject_embeds.shape[0]} subject embeddings")
        length = text_cond.shape[1]
        if any(not 0 <= p < length for p in positions):
            raise ValueError(f"marked positions {list(positions)} fall outside a sequence of {length} tokens")
        if len(set(positions)) != len(positions):
            raise ValueError(f"marked positions {list(positions)} repeat a token; each subject needs its own token")
        param = next(self.parameters())
        index = torch.as_tensor(list(positions), dtype=torch.long, device=text_cond.device)
        selected = text_cond.index_select(1, index).to(device=param.device, dtype=param.dtype)  # [B, S, D]
        subjects = subject_embeds.to(device=param.device, dtype=param.dtype).unsqueeze(0).expand_as(selected)
        fused = self.fuse(selected, subjects).to(device=text_cond.device, dtype=text_cond.dtype)
        out = text_cond.clone()
        out[:, index] = fused
        return out
