"""Small deterministic eps models with spatially varying, prompt-dependent guidance responses."""

from __future__ import annotations

import torch
from torch import nn


class ToyEpsNet(nn.Module):
    """``eps = tanh(conv1(x) * proj(mean(context)) + conv2(x)) * (1 + t/1000)``; counts its calls."""

    def __init__(self, seed: int, channels: int = 4, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.proj = nn.Linear(width, channels)
        self.calls: list[tuple[int, torch.Tensor]] = []  # (batch size, timesteps) per call

    @torch.no_grad()
    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.shape[0], t.detach().clone()))
        scale = self.proj(context.mean(dim=1))[:, :, None, None]
        return torch.tanh(self.conv1(x) * scale + self.conv2(x)) * (1 + t.float()[:, None, None, None] / 1000)


def toy_conditionings(batch: int = 1, tokens: int = 77, width: int = 16, seed: int = 0):
    """(empty, text, subject) context tensors; subject differs from text at two positions."""
    g = torch.Generator().manual_seed(seed)
    empty = torch.randn(batch, tokens, width, generator=g)
    text = torch.randn(batch, tokens, width, generator=g)
    subject = text.clone()
    subject[:, [2, 5]] += 3 * torch.randn(batch, 2, width, generator=g)
    return empty, text, subject
