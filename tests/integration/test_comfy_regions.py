"""A region per person inside an imported ComfyUI, on the suite's random-weight UNets (sd15_xs: 6
cross-attention layers at three levels, no middle block; the layers are read from the model):
the patch on every cross-attention block, only for the regioned conditionings, on each layer's own
token grid; identity confined to its region; no effect without regions; the errors."""

from __future__ import annotations

import logging
import math
import re

import pytest
import torch

from conftest import empty_conditioning, image_tensor
from facediffuser_core.method.regional_attention import REGIONS_KEY
from paths import FACES

TWO = "a man <|image|> and a woman <|image|> at a cafe"
POSITIONS = [2, 5]  # BOS, a, man, and, a, woman
FILLER = ", ".join(["golden light"] * 40)  # ~80 more tokens: a second 75-token chunk


@pytest.fixture(scope="module")
def faces() -> list[torch.Tensor]:
    return [image_tensor(FACES / name, 224) for name in ("man1.jpeg", "man2.jpeg")]


def columns(people: int, height: int, width: int) -> torch.Tensor:
    """MASK [people, height, width]: person i owns the i-th of ``people`` equal columns."""
    masks = torch.zeros(people, height, width)
    for i in range(people):
        masks[i, :, i * width // people : (i + 1) * width // people] = 1
    return masks


def encode(comfy, loaded, photos: torch.Tensor, prompt: str = TWO, masks=None):
    """Subject Encode's (text, subject) through the node."""
    _, _, clip, _, encoder = loaded
    return comfy.encode.FaceDiffuserSubjectEncode.execute(clip, encoder, prompt, 512, images=photos, masks=masks).result


def sample(comfy, guider, height: int, width: int, steps: int = 1, seed: int = 3) -> torch.Tensor:
    """An empty latent [1, 4, height, width] sampled with ``guider`` (ddim, ddim_uniform), as SamplerCustomAdvanced does."""
    latent = torch.zeros(1, 4, height, width)
    sigmas = comfy.samplers.KSampler(guider.model_patcher, steps, "cpu", "ddim", "ddim_uniform", 1.0).sigmas
    noise = comfy.sample.prepare_noise(latent, seed)
    return guider.sample(noise, latent, comfy.samplers.sampler_object("ddim"), sigmas, seed=seed, disable_pbar=True)


class Calls(list):
    """Recorded patch calls, and ``per_forward``: (model, patch calls) per UNet forward."""

    def __init__(self) -> None:
        super().__init__()
        self.per_forward: list[tuple[str, int]] = []


@pytest.fixture
def calls(comfy, loaded, monkeypatch):
    """Every call of the regional patch (block key, uuids, grid, query rows, context, output), and per
    UNet forward the number of patch calls it made (``calls.per_forward``: (model, count))."""
    tdm, sdm, *_ = loaded
    records = Calls()
    patch_class = comfy.regional_attention.RegionalCrossAttention
    original = patch_class.__call__

    def recording(self, q, k, v, extra_options):
        out = original(self, q, k, v, extra_options)
        block = (*extra_options["block"], extra_options.get("block_index", 0))
        grid = tuple(extra_options["activations_shape"][-2:])
        records.append(dict(block=block, uuids=list(extra_options["uuids"]), grid=grid, rows=q.shape[1], context=k.shape[1], out=out.detach().clone(), patch=self))
        return out

    monkeypatch.setattr(patch_class, "__call__", recording)
    for name, patcher in (("tdm", tdm), ("sdm", sdm)):
        unet = patcher.model.diffusion_model

        def counted(*args, _forward=unet.forward, _name=name, **kwargs):
            before = len(records)
            out = _forward(*args, **kwargs)
            records.per_forward.append((_name, len(records) - before))
            return out

        monkeypatch.setattr(unet, "forward", counted)
    return records


def cross_attention_layers(model_patcher) -> dict[tuple[str, int, int], tuple[str, int]]:
    """(block name, block id, transformer index) -> (module name, down level) of every cross-attention
    layer of the UNet, read from its module names and its Downsample / Upsample layers (not from the
    code under test): SD1.5 has 16 at levels 0-3, the suite's sd15_xs UNet 6 at levels 1-2."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

    unet = model_patcher.model.diffusion_model
    middle = [] if unet.middle_block is None else [unet.middle_block]
    layers, level = {}, 0
    for group, blocks in (("input", unet.input_blocks), ("middle", middle), ("output", unet.output_blocks)):
        for number, block in enumerate(blocks):
            if group == "input" and any(isinstance(module, Downsample) for module in block.modules()):
                level += 1  # a block of its own: the blocks after it are one level down
            for name, _ in block.named_modules():
                found = re.fullmatch(r"\d+\.transformer_blocks\.(\d+)\.attn2", name)
                if found:
                    prefix = {"input": "input_blocks", "middle": "middle_block", "output": "output_blocks"}[group]
                    layers[group, number, int(found[1])] = (f"{prefix}.{number}.{name}" if group != "middle" else f"{prefix}.{name}", level)
            if group == "output" and any(isinstance(module, Upsample) for module in block.modules()):
                level -= 1  # at the block's end: the blocks after it are one level up
    return layers


def chunk_of(call: dict, conditioning: list[dict]) -> torch.Tensor:
    """The rows of ``call``'s output that belong to ``conditioning`` (a converted cond list of one entry)."""
    index = call["uuids"].index(conditioning[0]["uuid"])
    return call["out"].chunk(len(call["uuids"]))[index]


def test_a_persons_photo_acts_only_inside_its_region(comfy, loaded, faces, calls):
    """First cross-attention layer (input 1: its input does not depend on the conditioning), one
    subject-stage evaluation: swapping A's photo leaves the rows outside A's region (the right half)
    bit-identical and changes every row inside; without regions it changes the right half too."""
    tdm, sdm, clip, *_ = loaded
    negative = empty_conditioning(clip)
    left_is_a = columns(2, 64, 64)
    first = min(key for key in cross_attention_layers(sdm) if key[0] == "input")  # the first cross-attention layer
    name, level = cross_attention_layers(sdm)[first]
    side = 8 // 2**level  # its token grid at an 8x8 latent
    outside = torch.ones(side, side, dtype=torch.bool)
    outside[:, : side // 2] = False
    outside = outside.flatten()
    results = {}
    for masks in (left_is_a, None):
        for a in (0, 1):
            text, subject = encode(comfy, loaded, torch.cat([faces[a], faces[1]]), masks=masks)
            guider = comfy.guider.build_guider(tdm, sdm, text, subject, negative, 5.0, 0.0, 0.0)
            calls.clear()
            with torch.no_grad():
                if masks is None:  # no patch: record the layer's output with a hook instead
                    layer = sdm.model.diffusion_model.get_submodule(name)
                    seen = []
                    handle = layer.to_out.register_forward_hook(lambda module, args, out: seen.append(out.detach().clone()))
                    try:
                        sample(comfy, guider, 8, 8)
                    finally:
                        handle.remove()
                    assert not calls
                    results[masks is None, a] = seen[0]  # both chunks; the text chunk does not depend on the photo
                else:
                    sample(comfy, guider, 8, 8)
                    call = calls[0]
                    assert call["block"] == first and call["grid"] == (side, side)
                    results[False, a] = chunk_of(call, guider.original_conds["subject"])[0]
    regioned = results[False, 0] - results[False, 1]
    assert torch.equal(results[False, 0][outside], results[False, 1][outside])
    assert regioned[~outside].abs().amax(dim=-1).min() > 0
    unregioned = (results[True, 0] - results[True, 1]).abs().amax(dim=-1)
    assert (unregioned.amax(dim=0)[outside] > 0).all()  # the control: without regions A's photo reaches the right half


def test_patch_runs_once_per_block_per_regioned_evaluation(comfy, loaded, faces, calls, caplog):
    """Four steps over all three stages: every UNet forward (TDM and SDM) runs the patch exactly once
    on each of the UNet's cross-attention blocks (16 in SD1.5, 6 in the suite's UNets); without masks
    nothing is installed and it never runs; a scene model with its own prompt is unregioned, said
    once in the log."""
    tdm, sdm, clip, *_ = loaded
    negative = empty_conditioning(clip)
    blocks = comfy.regional_attention.cross_attention_blocks(sdm)
    layers = len(cross_attention_layers(sdm))
    assert sorted(blocks) == sorted(cross_attention_layers(sdm)) and len(set(blocks)) == layers

    text, subject = encode(comfy, loaded, torch.cat(faces), masks=columns(2, 64, 64))
    guider = comfy.guider.build_guider(tdm, sdm, text, subject, negative, 5.0, 0.3, 0.6)
    for options in (guider.model_patcher.model_options, guider.tdm.model_options):
        assert set(options["transformer_options"]["patches_replace"]["attn2"]) == set(blocks)
    assert "patches_replace" not in tdm.model_options["transformer_options"] and "patches_replace" not in sdm.model_options["transformer_options"]
    with torch.no_grad():
        sample(comfy, guider, 8, 8, steps=4)
    assert {name for name, _ in calls.per_forward} == {"tdm", "sdm"}
    assert all(count == layers for _, count in calls.per_forward), calls.per_forward
    assert sorted(call["block"] for call in calls) == sorted(blocks * len(calls.per_forward))
    regioned = {guider.original_conds[name][0]["uuid"] for name in ("text", "subject")}
    assert all(regioned & set(call["uuids"]) for call in calls)

    calls.clear()
    calls.per_forward.clear()
    text, subject = encode(comfy, loaded, torch.cat(faces))
    plain = comfy.guider.build_guider(tdm, sdm, text, subject, negative, 5.0, 0.3, 0.6)
    assert "patches_replace" not in plain.model_patcher.model_options["transformer_options"] and plain.tdm is tdm
    with torch.no_grad():
        sample(comfy, plain, 8, 8, steps=4)
    assert calls.per_forward and not calls

    calls.per_forward.clear()
    text, subject = encode(comfy, loaded, torch.cat(faces), masks=columns(2, 64, 64))
    with caplog.at_level(logging.INFO):
        scene = comfy.guider.build_guider(tdm, sdm, text, subject, negative, 5.0, 0.3, 0.6, scene_positive=empty_conditioning(clip))
        with torch.no_grad():
            sample(comfy, scene, 8, 8, steps=4)
    assert sum("scene_positive) has no marked people" in record.getMessage() for record in caplog.records) == 1
    counts = {name: {count for model, count in calls.per_forward if model == name} for name in ("tdm", "sdm")}
    assert counts == {"tdm": {0}, "sdm": {layers}}


@pytest.mark.parametrize("height, width", [(64, 64), (64, 96), (9, 13)])
def test_each_layer_masks_its_own_token_grid(comfy, loaded, faces, calls, height, width):
    """FastComposer mode on one model: each layer's grid is its activations' (ceil-halved at each
    down level, exact for odd latents), the query rows are its cells, and the bias is built for it."""
    _, sdm, clip, *_ = loaded
    text, subject = encode(comfy, loaded, torch.cat(faces), masks=columns(2, 8 * height, 8 * width))
    # cfg 1: ComfyUI skips the negative, one latent per evaluation (half the activations: at 64x96 that is GBs)
    guider = comfy.fastcomposer.build_fastcomposer_guider(sdm, text, subject, empty_conditioning(clip), 1.0, 0.0)
    assert "patches_replace" not in sdm.model_options["transformer_options"]  # the user's MODEL is untouched
    with torch.no_grad():
        sample(comfy, guider, height, width)
    levels = [(height, width)]
    for _ in range(3):
        levels.append((math.ceil(levels[-1][0] / 2), math.ceil(levels[-1][1] / 2)))
    layers = cross_attention_layers(sdm)
    assert len(calls) == len(layers) and len({level for _, level in layers.values()}) > 1  # layers at more than one grid
    for call in calls:
        assert call["grid"] == levels[layers[call["block"]][1]], call["block"]
        assert call["rows"] == call["grid"][0] * call["grid"][1]
    assert {key[2] for key in calls[0]["patch"]._bias} == {levels[level] for _, level in layers.values()}


def test_no_masks_or_full_masks_change_nothing(comfy, loaded, faces):
    """All-ones masks (on Subject Encode or on every Subject node) give exactly the conditionings and
    the samples of no masks, in the three-stage sampler and in FastComposer mode."""
    tdm, sdm, clip, *_ = loaded
    negative = empty_conditioning(clip)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    plain = encode(comfy, loaded, torch.cat(faces))
    full = encode(comfy, loaded, torch.cat(faces), masks=torch.ones(2, 64, 64))
    subjects = None
    for face in faces:
        (subjects,) = comfy.subject.FaceDiffuserSubject.execute(face, "average", previous_subjects=subjects, mask=torch.ones(1, 64, 64)).result
    _, _, _, _, encoder = loaded
    chained = comfy.encode.FaceDiffuserSubjectEncode.execute(clip, encoder, TWO, 512, subjects=subjects).result
    for conditionings in (full, chained):
        for ours, reference in zip(conditionings, plain):
            assert REGIONS_KEY not in ours[0][1] and torch.equal(ours[0][0], reference[0][0])
    with torch.no_grad():
        reference = comfy.sampler.FaceDiffuserSampler.execute(tdm, sdm, *plain, negative, latent, 5, 3, 5.0, "ddim", "ddim_uniform", 0.3, 0.6, 1.0).result[0]
        ours = comfy.sampler.FaceDiffuserSampler.execute(tdm, sdm, *full, negative, latent, 5, 3, 5.0, "ddim", "ddim_uniform", 0.3, 0.6, 1.0).result[0]
        assert torch.equal(ours["samples"], reference["samples"])
        fast = [sample(comfy, comfy.fastcomposer.build_fastcomposer_guider(sdm, *pair, negative, 5.0, 0.5), 8, 8, steps=2) for pair in (plain, full)]
    assert torch.equal(fast[0], fast[1])


@pytest.mark.parametrize("long_positive", [False, True])
def test_four_people_long_prompts_and_a_long_negative(comfy, loaded, faces, calls, long_positive):
    """Four people; a 154-token negative. A 77-token positive is repeated to 154 when batched with it,
    so each person's column is masked at both repeats; a 154-token positive (two chunks) is not
    repeated, so only the person's own column is (its second chunk holds other words)."""
    tdm, sdm, clip, *_ = loaded
    prompt = "a man <|image|>, a woman <|image|>, a boy <|image|> and a girl <|image|> at a cafe" + (f", {FILLER}" if long_positive else "")
    positions = [2, 5, 8, 11]  # BOS a man , a woman , a boy and a girl
    photos = torch.cat([faces[0], faces[1], faces[0], faces[1]])
    text, subject = encode(comfy, loaded, photos, prompt, masks=columns(4, 64, 64))
    assert text[0][0].shape[1] == (154 if long_positive else 77)
    (negative,) = comfy.nodes.CLIPTextEncode().encode(clip, f"blurry, {FILLER}")
    assert negative[0][0].shape[1] == 154
    guider = comfy.guider.build_guider(tdm, sdm, text, subject, negative, 5.0, 0.3, 0.6)
    with torch.no_grad():
        out = sample(comfy, guider, 8, 8, steps=4)
    assert torch.isfinite(out).all()
    period = 154 if long_positive else 77
    assert {call["context"] for call in calls} == ({154} if long_positive else {77, 154})  # the subject stage batches text and subject alone
    patch = calls[0]["patch"]
    regioned = {guider.original_conds[name][0]["uuid"] for name in ("text", "subject")}
    for key, bias in patch._bias.items():
        uuids, grid, context = key[0], key[2], key[3]
        for index, uuid in enumerate(uuids):
            chunk = bias.chunk(len(uuids))[index][0]  # [h*w, context]
            masked = torch.isinf(chunk).any(dim=0).nonzero().flatten().tolist()
            expected = sorted(p + j * period for p in positions for j in range(context // period)) if uuid in regioned else []
            assert masked == expected, (grid, context)
            assert not torch.isinf(chunk[:, 0]).any()  # BOS open
            if uuid in regioned and grid[1] % 4 == 0:  # whole cells per person: masked exactly outside its column
                cell_column = torch.arange(grid[1]).repeat(grid[0])
                for person, position in enumerate(positions):
                    assert torch.equal(torch.isinf(chunk[:, position]), cell_column // (grid[1] // 4) != person)


def raises_whole(message: str, run) -> None:
    """``run()`` raises a ValueError whose message is exactly ``message``: the node, the marker, what
    is wrong and the fix (which input, what it needs)."""
    with pytest.raises(ValueError) as raised:
        run()
    assert str(raised.value) == message


def test_region_errors_name_the_node_marker_and_fix(comfy, loaded, faces):
    tdm, sdm, clip, _, encoder = loaded
    negative = empty_conditioning(clip)
    photos = torch.cat(faces)
    raises_whole(
        "Face-diffuser Subject Encode: masks has 3 mask(s) but the prompt marks 2 person(s) with <|image|> (marker 1 ('man'), marker 2 ('woman')); "
        "give exactly one mask per marker, in marker order (e.g. the Face-diffuser Regions node with that many people)",
        lambda: encode(comfy, loaded, photos, masks=torch.ones(3, 64, 64)),
    )
    raises_whole(
        "Face-diffuser Subject: mask of marker 1 is a batch of 2 masks; a Subject node takes one person's region: connect a single mask "
        "(e.g. pick one with an image/mask batch picker), or give all masks to Subject Encode's masks",
        lambda: comfy.subject.FaceDiffuserSubject.execute(faces[0], "average", mask=torch.ones(2, 64, 64)),
    )

    def chained(masks):
        subjects = None
        for face, mask in zip(faces, masks):
            (subjects,) = comfy.subject.FaceDiffuserSubject.execute(face, "average", previous_subjects=subjects, mask=mask).result
        return comfy.encode.FaceDiffuserSubjectEncode.execute(clip, encoder, TWO, 512, subjects=subjects).result

    raises_whole(
        "Face-diffuser Subject Encode: some people have a region and some do not: marker 2 ('woman') has no mask; "
        "connect a mask to every Face-diffuser Subject node, or to none",
        lambda: chained([torch.ones(1, 64, 64), None]),
    )
    raises_whole(
        "Face-diffuser Subject Encode: marker 2 ('woman'): its mask is 96x64 but marker 1 ('man')'s is 64x64; give every person's mask the size of the image",
        lambda: chained([torch.zeros(1, 64, 64), torch.zeros(1, 64, 96)]),
    )
    two_masks = columns(2, 64, 64)
    raises_whole(
        "Face-diffuser Subject Encode: masks is connected and Subject nodes have a mask too; give each person's region in one place: "
        "either masks (one per marker) or each Subject node's mask",
        lambda: comfy.encode.FaceDiffuserSubjectEncode.execute(
            clip, encoder, TWO, 512, masks=two_masks, subjects=comfy.subject.add_subject(comfy.subject.add_subject(None, "average", {"images": faces[0]}, two_masks[:1]), "average", {"images": faces[1]}, two_masks[1:])
        ),
    )  # fmt: skip
    text, subject = chained([two_masks[:1], two_masks[1:]])  # the Subject nodes' masks work as masks does
    assert text[0][1][REGIONS_KEY].positions == tuple(POSITIONS)

    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    wide = encode(comfy, loaded, photos, masks=columns(2, 64, 96))
    raises_whole(
        "Face-diffuser Sampler: the masks are 96x64 but the latent is 8x8 (64x64 px): their aspect ratios differ; "
        "make the masks at the image's size (e.g. the Face-diffuser Regions node with the latent's width and height)",
        lambda: comfy.sampler.FaceDiffuserSampler.execute(tdm, sdm, *wide, negative, latent, 5, 2, 5.0, "ddim", "ddim_uniform", 0.3, 0.6, 1.0),
    )
    tiny = torch.zeros(2, 64, 64)
    tiny[0, :, :32] = 1
    tiny[1, 10:13, 40:43] = 1
    small = encode(comfy, loaded, photos, masks=tiny)
    (guider,) = comfy.guider.FaceDiffuserGuider.execute(tdm, sdm, *small, negative, 5.0, 0.3, 0.6).result
    raises_whole(
        "Face-diffuser Guider: marker 2 ('woman'): its region is empty at the latent's 8x8 resolution "
        "(less than half of every 8x8 pixel cell is inside); make the region larger",
        lambda: sample(comfy, guider, 8, 8),
    )

    taken = sdm.clone()
    _, first, _ = min(key for key in cross_attention_layers(sdm) if key[0] == "input")  # a block the regions patch
    taken.set_model_attn2_replace(lambda q, k, v, extra_options: q, "input", first)
    regioned = encode(comfy, loaded, photos, masks=columns(2, 64, 64))
    conflict = (
        f"already has a cross-attention replacement on block ('input', {first}) (from another node, e.g. IPAdapter or an attention-couple pack); "
        "per-person regions replace the same attention and cannot run with it: remove the masks (the people's regions) or that node"
    )
    raises_whole(f"Face-diffuser Guider: the sdm {conflict}", lambda: comfy.guider.FaceDiffuserGuider.execute(tdm, taken, *regioned, negative, 5.0, 0.3, 0.6))
    raises_whole(f"FastComposer Guider: the model {conflict}", lambda: comfy.fastcomposer.FastComposerGuider.execute(taken, *regioned, negative, 5.0, 0.2))


def test_regions_compose_with_other_packs_attention_patches(comfy, loaded, faces, calls):
    """Patches that change cross-attention's inputs or output (``attn2_patch``, ``attn2_output_patch``,
    as style and guidance packs install them) run together with the regions, in every block the regions
    patch; only another ``attn2_replace`` is a conflict (the previous test)."""
    tdm, sdm, clip, *_ = loaded
    seen = {"attn2_patch": 0, "attn2_output_patch": 0}

    def inputs_patch(n, context, value, extra_options):
        seen["attn2_patch"] += 1
        return n, context, value

    def output_patch(n, extra_options):
        seen["attn2_output_patch"] += 1
        return n

    patched = sdm.clone()
    patched.set_model_attn2_patch(inputs_patch)
    patched.set_model_attn2_output_patch(output_patch)
    text, subject = encode(comfy, loaded, torch.cat(faces), masks=columns(2, 64, 64))
    guider = comfy.guider.build_guider(tdm, patched, text, subject, empty_conditioning(clip), 5.0, 0.0, 0.0)  # the subject stage: the SDM only
    with torch.no_grad():
        sample(comfy, guider, 8, 8)
    layers = len(cross_attention_layers(sdm))
    assert len(calls) == layers and seen == {"attn2_patch": layers, "attn2_output_patch": layers}  # one UNet evaluation (the pair batched), every block
