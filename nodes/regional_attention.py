"""Installing the core's regional cross-attention in ComfyUI: an ``attn2_replace`` patch on every
cross-attention block of a guider's own model clone, masking only the batch rows whose conditioning
carries :class:`~facediffuser_core.method.regional_attention.Regions` (matched by the cond entries' uuids)."""

from __future__ import annotations

from typing import Iterator, Optional

import comfy.ldm.modules.attention as comfy_attention
import torch

from ..facediffuser_core.errors import FaceDiffuserError
from ..facediffuser_core.method.regional_attention import REGIONS_KEY, batch_bias, check_fits_latent, check_inside_noise_mask, regional_attention

BlockKey = tuple[str, int, int]  # (block name, block id, transformer index), as ComfyUI looks attn2_replace up


def cross_attention_blocks(model_patcher) -> list[BlockKey]:
    """Every transformer block with a cross-attention of the patcher's UNet, walked from the model:
    ("input", id, i), ("middle", 0, i), ("output", id, i), as openaimodel names the blocks
    (16 for SD1.5; 6 for a UNet without a middle block that ComfyUI loads as SD1.5, e.g. SD_XS's layout)."""
    unet = model_patcher.model.diffusion_model
    middle = [] if unet.middle_block is None else [unet.middle_block]  # openaimodel leaves it None when there is none
    groups = [("input", unet.input_blocks), ("middle", middle), ("output", unet.output_blocks)]
    keys = []
    for name, blocks in groups:
        for number, block in enumerate(blocks):
            for module in block.modules():
                for index, transformer in enumerate(getattr(module, "transformer_blocks", ())):
                    if getattr(transformer, "attn2", None) is not None:
                        keys.append((name, number, index))
    return keys


def regioned_entries(conds: dict[str, list[dict]]) -> Iterator[tuple[str, dict]]:
    """(name, entry) of every converted cond entry (ComfyUI's ``convert_cond`` dicts) carrying regions."""
    for name, entries in conds.items():
        for entry in entries:
            if entry.get(REGIONS_KEY) is not None:
                yield name, entry


class RegionalCrossAttention:
    """An ``attn2_replace`` patch: ``patch(q, k, v, extra_options) -> out``, q [b, n_q, heads*dim] and
    k, v [b, n_k, heads*dim] already projected. Batch chunks whose uuid (``extra_options["uuids"]``,
    one per conditioning of the batch) is regioned get the core's bias on the layer's own token grid
    (``activations_shape``); a batch without one runs ComfyUI's attention exactly as the stock layer."""

    def __init__(self, people: dict) -> None:
        self.people = people  # cond uuid -> (Regions, the conditioning's own token count)
        self._bias: dict[tuple, torch.Tensor] = {}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads, precision = extra_options["n_heads"], extra_options.get("attn_precision")
        uuids = extra_options.get("uuids") or ()
        chunks = tuple(self.people.get(uuid) for uuid in uuids)

        def attention(q, k, v, heads, mask=None):
            return comfy_attention.optimized_attention(q, k, v, heads, mask=mask, attn_precision=precision, transformer_options=extra_options)

        if not any(chunks):
            return attention(q, k, v, heads)
        grid = tuple(extra_options["activations_shape"][-2:])
        key = (tuple(uuids), q.shape[0], grid, k.shape[1], q.dtype, q.device)
        bias = self._bias.get(key)
        if bias is None:  # the same at every step of a run: one per grid and batch layout
            if len(self._bias) >= 16:
                self._bias.clear()
            bias = self._bias[key] = batch_bias(chunks, q.shape[0] // len(chunks), grid, k.shape[1], q.dtype).to(q.device)
        return regional_attention(q, k, v, heads, bias, attention)

    def check_latent(self, latent: tuple[int, int]) -> None:
        """Every regioned conditioning's masks fit a latent of (h, w) (see ``check_fits_latent``)."""
        for regions, _ in self.people.values():
            check_fits_latent(regions, latent)

    def check_inside(self, noise_mask: torch.Tensor) -> None:
        """Every person's region lies mostly inside the latent's noise mask (see ``check_inside_noise_mask``)."""
        for regions, _ in self.people.values():
            check_inside_noise_mask(regions, noise_mask)


def regional_patch(conds: dict[str, list[dict]]) -> Optional[RegionalCrossAttention]:
    """The patch for the regioned entries of ``conds`` (converted conds, each with its ``uuid``), or
    None when no entry carries regions (then nothing is installed)."""
    people = {entry["uuid"]: (entry[REGIONS_KEY], entry["cross_attn"].shape[1]) for _, entry in regioned_entries(conds)}
    return RegionalCrossAttention(people) if people else None


def install(patch: RegionalCrossAttention, model_patcher, model: str) -> None:
    """Set ``patch`` as the ``attn2_replace`` of every cross-attention block of ``model_patcher`` (a
    guider's own clone; ``model`` names it in errors). A block that already has another
    ``attn2_replace`` (IPAdapter, attention-couple packs) is an error naming it: both replace the
    same attention and only one can run."""
    existing = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for key in cross_attention_blocks(model_patcher):
        for taken in (key, key[:2]):
            if taken in existing and not isinstance(existing[taken], RegionalCrossAttention):
                raise FaceDiffuserError(
                    f"the {model} already has a cross-attention replacement on block {taken} (from another node, e.g. IPAdapter or an "
                    "attention-couple pack); per-person regions replace the same attention and cannot run with it: remove the masks "
                    "(the people's regions) or that node"
                )
        model_patcher.set_model_attn2_replace(patch, *key)
