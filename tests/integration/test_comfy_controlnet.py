"""Face-diffuser Apply ControlNet inside an imported ComfyUI, with a random SD1.5 ControlNet in the
openpose file's layout fitting the suite's UNets (controlnet_file.py) on the shipped pose image: with every step in one stage
the Sampler equals a stock KSampler with ComfyUI's own Apply ControlNet on that stage's pair (chains
and the scene model's own prompts too); strength 0 and a control that ends at 0 % change nothing,
bit for bit; the control acts in every stage, once per model evaluation for both conditionings
together, and only between its start and end percent."""

from __future__ import annotations

import importlib
import logging

import pytest
import torch

from conftest import empty_conditioning, image_tensor
from paths import ROOT
from test_comfy_guidance_hooks import SIZE, STEPS, TOLERANCE, face_diffuser, ksampler, one_stage, relative_difference

POSE = ROOT / "workflows" / "inputs" / "pose_two_people.png"
STAGES = {"scene": (1.0, 1.0), "fusion": (0.0, 1.0), "subject": (0.0, 0.0)}  # (start_merge, final) putting every step in one stage


@pytest.fixture(scope="module")
def node(comfy):
    return importlib.import_module("facediffuser_pack.nodes.controlnet")


@pytest.fixture(scope="module")
def control_net(comfy, model_files, comfyui_path):
    """The ControlNet as Load ControlNet Model loads it, but kept in fp16 (computed in float32 on a
    CPU all the same, as the suite's servers run the UNets with --fp16-unet): 0.4 GB instead of 0.8."""
    import comfy.controlnet
    from models import ensure_controlnet_file

    return comfy.controlnet.load_controlnet(str(ensure_controlnet_file(model_files, comfyui_path)), model_options={"dtype": torch.float16})


@pytest.fixture(scope="module")
def pose() -> torch.Tensor:
    """The shipped two-person skeleton image at the latent's pixel size, IMAGE [1, H, W, 3]."""
    return image_tensor(POSE, 8 * SIZE)


def controlled(node, conditionings, control_net, pose, strength=1.0, start=0.0, end=1.0, **scene):
    """(text, subject, negative) through the Face-diffuser Apply ControlNet node; with ``scene``, also
    its controlled scene pair."""
    text, subject, negative = conditionings
    outputs = node.FaceDiffuserApplyControlNet.execute(text, subject, negative, control_net, pose, strength, start, end, **scene).args
    return outputs[:3] if not scene else outputs


def stock_controlled(positive, negative, control_net, pose, strength=1.0, start=0.0, end=1.0):
    """ComfyUI's own Apply ControlNet (advanced) on a (positive, negative) pair."""
    import nodes

    return nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control_net, pose, strength, start, end)


@pytest.mark.parametrize("chained", [False, True])
@pytest.mark.parametrize("stage", ["scene", "subject"])
def test_one_stage_equals_ksampler_with_the_same_controlnet(comfy, loaded, conditionings, node, control_net, pose, stage, chained):
    """Scene stage: KSampler(tdm, text, negative); subject stage: KSampler(sdm, subject, text); each
    pair through ComfyUI's node (twice when chained: pose, then the mirrored pose at 0.6, as a
    second control would be)."""
    tdm, sdm = loaded[:2]
    ours = controlled(node, conditionings, control_net, pose)
    if chained:
        ours = controlled(node, ours, control_net, pose.flip(2), 0.6)
    fraction, model, positive, negative = one_stage(stage, tdm, sdm, conditionings)
    stock_positive, stock_negative = stock_controlled(positive, negative, control_net, pose)
    if chained:
        stock_positive, stock_negative = stock_controlled(stock_positive, stock_negative, control_net, pose.flip(2), 0.6)
    result, _ = face_diffuser(comfy, tdm, sdm, ours, fraction, fraction)
    stock = ksampler(model, stock_positive, stock_negative)
    assert relative_difference(result, stock) <= TOLERANCE
    assert relative_difference(stock, ksampler(model, positive, negative)) > 100 * TOLERANCE  # the control changes the image


def test_the_scene_models_own_prompts_are_controlled_too(comfy, loaded, conditionings, node, control_net, pose):
    tdm, sdm, clip = loaded[:3]
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a garden at dusk"), return_pooled=True)
    scene_positive = [[cond, {"pooled_output": pooled}]]
    scene_negative = empty_conditioning(clip)
    text, subject, negative, positive_out, negative_out = controlled(
        node, conditionings, control_net, pose, scene_positive=scene_positive, scene_negative=scene_negative
    )
    latent = {"samples": torch.zeros(1, 4, SIZE, SIZE)}
    ours = comfy.sampler.FaceDiffuserSampler.execute(
        tdm, sdm, text, subject, negative, latent, 3, STEPS, 5.0, "euler", "normal", 1.0, 1.0, 1.0, positive_out, negative_out
    ).result[0]["samples"]  # fmt: skip
    stock = ksampler(tdm, *stock_controlled(scene_positive, scene_negative, control_net, pose))
    assert relative_difference(ours, stock) <= TOLERANCE
    assert relative_difference(stock, ksampler(tdm, scene_positive, scene_negative)) > 100 * TOLERANCE


@pytest.fixture(scope="module")
def uncontrolled(comfy, loaded, conditionings):
    """(latent, subject mask) of the Face-diffuser Sampler without a ControlNet, 4 steps over every
    stage (0 / 1 / 2-3), sampled once for the module."""
    return face_diffuser(comfy, *loaded[:2], conditionings, 0.3, 0.6, steps=4)


@pytest.mark.parametrize("settings", [{"strength": 0.0}, {"end": 0.0}], ids=["strength 0", "ends at 0 percent"])
def test_a_control_that_never_acts_changes_nothing_bit_for_bit(comfy, loaded, conditionings, node, control_net, pose, uncontrolled, settings):
    tdm, sdm = loaded[:2]
    ours = controlled(node, conditionings, control_net, pose, **settings)
    if settings.get("strength") == 0.0:
        assert [[id(entry) for entry in c] for c in ours] == [[id(entry) for entry in c] for c in conditionings]  # the very same entries
    with_control, with_mask = face_diffuser(comfy, tdm, sdm, ours, 0.3, 0.6, steps=4)
    without, without_mask = uncontrolled
    assert torch.equal(with_control, without) and torch.equal(with_mask, without_mask)


@pytest.fixture
def control_calls(comfy, monkeypatch):
    """(sigma, batch size, whether a control came back) of every ControlNet evaluation."""
    import comfy.controlnet

    calls = []
    original = comfy.controlnet.ControlNet.get_control

    def recording(self, x_noisy, t, cond, batched_number, transformer_options):
        control = original(self, x_noisy, t, cond, batched_number, transformer_options)
        calls.append((float(t[0]), x_noisy.shape[0], control is not None))
        return control

    monkeypatch.setattr(comfy.controlnet.ControlNet, "get_control", recording)
    return calls


@pytest.mark.parametrize("stage", STAGES)
def test_the_control_acts_in_every_stage_once_per_model_evaluation(comfy, loaded, conditionings, node, control_net, pose, control_calls, stage, caplog):
    """The control changes the result in every stage, runs once per model evaluation (both
    conditionings in one batch), and every residual fits the UNet (ComfyUI's UNet skips, with a
    warning, a control residual whose shape does not fit its block)."""
    tdm, sdm = loaded[:2]
    start_merge, final = STAGES[stage]
    ours = controlled(node, conditionings, control_net, pose)
    with caplog.at_level(logging.WARNING):
        with_control, _ = face_diffuser(comfy, tdm, sdm, ours, start_merge, final)
    assert not [record.getMessage() for record in caplog.records if "control could not be applied" in record.getMessage()]
    calls = list(control_calls)
    without, _ = face_diffuser(comfy, tdm, sdm, conditionings, start_merge, final)
    assert relative_difference(with_control, without) > 1e-3
    models = 2 if stage == "fusion" else 1  # euler: one evaluation per step and model
    assert len(calls) == STEPS * models
    assert all(batch == 2 and acted for _, batch, acted in calls)  # both conditionings of a model in one batch


def test_start_and_end_percent_are_respected(comfy, loaded, conditionings, node, control_net, pose, control_calls):
    tdm, sdm = loaded[:2]
    steps = 6
    ours = controlled(node, conditionings, control_net, pose, start=0.4, end=0.8)
    face_diffuser(comfy, tdm, sdm, ours, 0.3, 0.6, steps=steps)
    sampling = tdm.get_model_object("model_sampling")
    first, last = sampling.percent_to_sigma(0.4), sampling.percent_to_sigma(0.8)
    assert len({sigma for sigma, _, _ in control_calls}) == steps
    for sigma, _, acted in control_calls:
        assert acted == (last <= sigma <= first), (sigma, first, last)
    assert any(acted for *_, acted in control_calls) and not all(acted for *_, acted in control_calls)
