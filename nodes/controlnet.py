"""Face-diffuser Apply ControlNet: one ControlNet (pose, depth, ...) on every conditioning the
Face-diffuser Sampler / Guider uses, in one step, through ComfyUI's own ControlNetApplyAdvanced."""

from __future__ import annotations

from typing import Optional

from comfy_api.latest import io

import nodes as comfy_nodes  # ComfyUI's core nodes (ControlNetApplyAdvanced), not this pack's folder

from .common import CATEGORY

NAME = "Face-diffuser Apply ControlNet"
CONDITIONINGS = ("text", "subject", "negative", "scene_positive", "scene_negative")  # the Sampler's / Guider's inputs, in their order


def apply_controlnet(conditionings: dict[str, Optional[list]], control_net, image, strength: float, start_percent: float, end_percent: float, vae=None) -> dict:
    """``conditionings`` (name -> CONDITIONING, None where unconnected) with ``control_net`` on
    ``image`` added to each, by ComfyUI's ControlNetApplyAdvanced in one call: every entry gets the
    same ControlNet object (chained after the one it had, so a second node adds a second control), as
    that node gives its positive and negative, so ComfyUI still batches them together. Strength 0
    returns them unchanged."""
    names = [name for name, conditioning in conditionings.items() if conditioning is not None]
    joined = [entry for name in names for entry in conditionings[name]]
    applied, _ = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(joined, [], control_net, image, strength, start_percent, end_percent, vae=vae)
    result, start = dict(conditionings), 0
    for name in names:
        count = len(conditionings[name])
        result[name] = applied[start : start + count]
        start += count
    return result


class FaceDiffuserApplyControlNet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceDiffuserApplyControlNet",
            display_name=NAME,
            category=CATEGORY,
            description="Applies a ControlNet (e.g. OpenPose for where people stand, depth for the scene) to every conditioning "
            "the Face-diffuser Sampler / Guider uses, so the control acts in all three stages: text and negative (scene stage, "
            "TDM), text and subject (subject stage, SDM), both pairs in the fusion stage, and the scene model's own prompts "
            "where connected. ComfyUI's own Apply ControlNet code does the work; chain two nodes for two controls.",
            inputs=[
                io.Conditioning.Input("text", tooltip="Subject Encode: text (the TDM's positive, the SDM's negative)."),
                io.Conditioning.Input("subject", tooltip="Subject Encode: subject (the SDM's positive)."),
                io.Conditioning.Input("negative", tooltip="The TDM's negative (an empty prompt in the official method)."),
                io.ControlNet.Input("control_net", tooltip="A ControlNet for SD1.5 (Load ControlNet Model), e.g. control_v11p_sd15_openpose."),
                io.Image.Input("image", tooltip="The control image, e.g. an OpenPose skeleton render; resized to the latent's size as ComfyUI's Apply ControlNet does."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01, tooltip="How strongly the control steers the image; 0 leaves every conditioning unchanged."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, tooltip="Where in the sampling (0 = first step, by noise level) the control starts acting."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, tooltip="Where in the sampling the control stops acting (1 = to the end; equal to start_percent = never)."),
                io.Vae.Input("vae", optional=True, tooltip="Optional: the VAE, for ControlNets that take an encoded image (as ComfyUI's Apply ControlNet); SD1.5 OpenPose/depth ControlNets need none."),
                io.Conditioning.Input("scene_positive", optional=True, tooltip="Optional: the scene model's own prompt (the Sampler's scene_positive), controlled too."),
                io.Conditioning.Input("scene_negative", optional=True, tooltip="Optional: the scene model's own negative (the Sampler's scene_negative), controlled too."),
            ],
            # output ids differ from the input ids: ComfyUI 0.3.75 refuses a node whose input and output share one (and the whole pack with it)
            outputs=[
                io.Conditioning.Output("controlled_text", display_name="text", tooltip="text with the control: to the Sampler's / Guider's text."),
                io.Conditioning.Output("controlled_subject", display_name="subject", tooltip="subject with the control: to the Sampler's / Guider's subject."),
                io.Conditioning.Output("controlled_negative", display_name="negative", tooltip="negative with the control: to the Sampler's / Guider's negative."),
                io.Conditioning.Output("controlled_scene_positive", display_name="scene_positive", tooltip="scene_positive with the control (nothing when its input is unconnected)."),
                io.Conditioning.Output("controlled_scene_negative", display_name="scene_negative", tooltip="scene_negative with the control (nothing when its input is unconnected)."),
            ],
        )

    @classmethod
    def execute(
        cls, text, subject, negative, control_net, image, strength: float, start_percent: float, end_percent: float, vae=None, scene_positive=None, scene_negative=None
    ) -> io.NodeOutput:
        given = dict(zip(CONDITIONINGS, (text, subject, negative, scene_positive, scene_negative)))
        applied = apply_controlnet(given, control_net, image, strength, start_percent, end_percent, vae)
        return io.NodeOutput(*(applied[name] for name in CONDITIONINGS))
