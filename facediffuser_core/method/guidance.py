"""Noise prediction of one step for each stage (classifier-free guidance + SNF).

With s the guidance scale, TDM the scene model, SDM the subject model, c0 the empty
prompt, ct the text prompt (markers removed) and ca the subject-augmented prompt:

- scene:   ``TDM(c0) + s * (TDM(ct) - TDM(c0))``
- subject: ``SDM(ct) + s * (SDM(ca) - SDM(ct))``  (the text prompt is the SDM's negative)
- fusion:  both, fused per pixel by :func:`facediffuser_core.method.snf.fuse_noise` on the
  responses ``s * (TDM(ct) - TDM(c0))`` and ``s * (SDM(ca) - SDM(ct))``.

Any SD1.x model can stand in for the TDM with its own prompt pair (its own CLIP, LoRA ...): the
scene conditionings then replace ``c0`` and ``ct`` for the scene model only; the SDM keeps ``ct``
as its negative.

A host that guides each model itself (ComfyUI's CFG hooks: RescaleCFG, PAG, ...) hands its
guided eps to :func:`combine_guided` through :func:`guided_from`; a model's response is then
its guided eps minus the eps of its negative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .schedule import Stage
from .snf import fuse_noise

__all__ = ["EpsModel", "Conditionings", "Guided", "GuidedNoise", "cfg", "guided_from", "combine_guided", "combine", "predict_noise"]

EpsModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``model(x [N,C,H,W], t [N], context [N,L,D]) -> eps [N,C,H,W]``."""

Pair = tuple[torch.Tensor, torch.Tensor]  # (eps of the negative, eps of the positive)
Guided = tuple[torch.Tensor, torch.Tensor]  # (guided eps, response = guided eps - eps of the negative)


@dataclass(frozen=True)
class Conditionings:
    """Text embeddings [1 or B, L, D]: empty prompt, text prompt, subject-augmented prompt; and
    optionally the scene model's own negative and positive (None: ``empty`` and ``text``)."""

    empty: torch.Tensor
    text: torch.Tensor
    subject: torch.Tensor
    scene_negative: Optional[torch.Tensor] = None
    scene_positive: Optional[torch.Tensor] = None

    @property
    def scene_pair(self) -> Pair:
        """The scene model's (negative, positive) conditionings."""
        negative = self.empty if self.scene_negative is None else self.scene_negative
        return negative, self.text if self.scene_positive is None else self.scene_positive

    def __post_init__(self) -> None:
        if self.text.shape != self.subject.shape:
            raise ValueError(
                f"text and subject conditionings must have one shape, got {tuple(self.text.shape)} "
                f"and {tuple(self.subject.shape)}"
            )
        if self.empty.ndim != 3 or self.empty.shape[-1] != self.text.shape[-1]:
            raise ValueError(
                f"empty conditioning must be [B,L,{self.text.shape[-1]}], got {tuple(self.empty.shape)}"
            )
        for name in ("scene_negative", "scene_positive"):
            value = getattr(self, name)
            if value is not None and (value.ndim != 3 or value.shape[-1] != self.text.shape[-1]):
                raise ValueError(f"{name} conditioning must be [B,L,{self.text.shape[-1]}], got {tuple(value.shape)}")


@dataclass(frozen=True)
class GuidedNoise:
    """Guided eps [B,C,H,W]; in the fusion stage also the bool [B,1,H,W] subject mask."""

    eps: torch.Tensor
    subject_mask: Optional[torch.Tensor] = None


def cfg(eps_negative: torch.Tensor, eps_positive: torch.Tensor, scale: float) -> Guided:
    """Classifier-free guidance: returns ``(guided eps, response)``, response = scale * (pos - neg)."""
    response = scale * (eps_positive - eps_negative)
    return eps_negative + response, response


def guided_from(eps_negative: torch.Tensor, eps_guided: torch.Tensor) -> Guided:
    """Guidance computed elsewhere (any rule) as ``(guided eps, response)``: the response is what the
    guidance added to the negative's eps."""
    return eps_guided, eps_guided - eps_negative


def combine_guided(stage: Stage, scene: Optional[Guided], subject: Optional[Guided]) -> GuidedNoise:
    """Guided noise of one step from each model's ``(guided eps, response)``: the guided eps of the
    stage's model, or in the fusion stage both fused per pixel by SNF on their responses.
    A stage needs only the guidance of the models it uses."""
    if stage.uses_scene_model and scene is None:
        raise ValueError(f"the {stage.value} stage needs the scene model's predictions")
    if stage.uses_subject_model and subject is None:
        raise ValueError(f"the {stage.value} stage needs the subject model's predictions")
    if stage is Stage.SCENE:
        return GuidedNoise(scene[0])
    if stage is Stage.SUBJECT:
        return GuidedNoise(subject[0])
    eps, mask = fuse_noise(scene[0], subject[0], scene[1], subject[1])
    return GuidedNoise(eps, mask)


def combine(stage: Stage, scene_pair: Optional[Pair], subject_pair: Optional[Pair], scale: float) -> GuidedNoise:
    """Guided noise of one step from the models' (negative, positive) eps pairs, each guided by CFG.

    ``scene_pair`` is TDM's ``(eps(c0), eps(ct))``, ``subject_pair`` SDM's ``(eps(ct), eps(ca))``;
    a stage needs only the pairs of the models it uses.
    """

    def guide(pair: Optional[Pair]) -> Optional[Guided]:
        return None if pair is None else cfg(*pair, scale)

    return combine_guided(stage, guide(scene_pair), guide(subject_pair))


def _to_batch(context: torch.Tensor, batch: int) -> torch.Tensor:
    if context.shape[0] == batch:
        return context
    if context.shape[0] == 1:
        return context.expand(batch, -1, -1)
    raise ValueError(f"a conditioning batch of {context.shape[0]} does not fit a latent batch of {batch}")


def _match_lengths(a: torch.Tensor, b: torch.Tensor) -> Pair:
    """Repeat token sequences to a common length, as ComfyUI does for 77 vs 154 tokens."""
    la, lb = a.shape[1], b.shape[1]
    if la == lb:
        return a, b
    common = math.lcm(la, lb)
    return a.repeat(1, common // la, 1), b.repeat(1, common // lb, 1)


def _paired_call(model: EpsModel, x: torch.Tensor, t: torch.Tensor, negative: torch.Tensor, positive: torch.Tensor) -> Pair:
    batch = x.shape[0]
    negative, positive = _match_lengths(_to_batch(negative, batch), _to_batch(positive, batch))
    context = torch.cat([negative, positive]).to(device=x.device)
    eps = model(torch.cat([x, x]), torch.cat([t, t]), context)
    return eps[:batch], eps[batch:]


def predict_noise(
    stage: Stage,
    x: torch.Tensor,
    t: torch.Tensor | float,
    scene_model: EpsModel,
    subject_model: EpsModel,
    conds: Conditionings,
    scale: float,
) -> GuidedNoise:
    """Guided noise of one step; each model used by ``stage`` is called exactly once (batch 2B)."""
    t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
    scene_pair = _paired_call(scene_model, x, t, *conds.scene_pair) if stage.uses_scene_model else None
    subject_pair = _paired_call(subject_model, x, t, conds.text, conds.subject) if stage.uses_subject_model else None
    return combine(stage, scene_pair, subject_pair, scale)
