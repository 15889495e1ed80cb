"""Face-diffuser Sampler: the all-in-one, KSampler-like node."""

from __future__ import annotations

from typing import Optional

import comfy.model_management as mm
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
import torch.nn.functional as F
from comfy_api.latest import io

from ..facediffuser_core.method.schedule import OFFICIAL_STEPS
from .common import CATEGORY, errors_named
from .guider import CFG_INPUT, MODEL_INPUTS, SCENE_INPUTS, STAGE_INPUTS, build_guider

NAME = "Face-diffuser Sampler"
LATENT_SCALE = 8  # SD1.5 VAE downscale factor


def subject_mask_image(mask: Optional[torch.Tensor], latent: torch.Tensor) -> torch.Tensor:
    """bool [B,1,h,w] latent mask -> float MASK [B, 8h, 8w] (zeros when no fusion step ran)."""
    b, _, h, w = latent.shape
    if mask is None:
        return torch.zeros(b, h * LATENT_SCALE, w * LATENT_SCALE)
    return F.interpolate(mask.float().cpu(), size=(h * LATENT_SCALE, w * LATENT_SCALE), mode="nearest")[:, 0]


SEED_INPUT = io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True, tooltip="Seed of the initial noise.")
STEPS_INPUT = io.Int.Input("steps", default=OFFICIAL_STEPS, min=1, max=1000, tooltip="Sampling steps (official: 50).")
SAMPLER_INPUT = io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="ddim", tooltip="Sampler; ddim matches the official method.")
SCHEDULER_INPUT = io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="ddim_uniform", tooltip="Scheduler; ddim_uniform gives the official timesteps.")


class FaceDiffuserSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceDiffuserSampler",
            display_name=NAME,
            category=CATEGORY,
            description="Samples with Face-diffuser (TDM scene stage, saliency-adaptive fusion, SDM subject stage) "
            "in one node, like KSampler. Also outputs where the subject model owned the image in the last fusion step. "
            "The scene model may be any SD1.5 model with its own prompts (scene_positive, scene_negative).",
            inputs=[
                *MODEL_INPUTS,
                io.Latent.Input("latent_image", tooltip="Empty Latent Image for text-to-image, or an encoded image with denoise < 1."),
                SEED_INPUT,
                STEPS_INPUT,
                CFG_INPUT,
                SAMPLER_INPUT,
                SCHEDULER_INPUT,
                *STAGE_INPUTS,
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="Amount of noise to add and remove; stages are fractions of the steps actually run."),
                *SCENE_INPUTS,
            ],
            outputs=[
                io.Latent.Output("latent", display_name="LATENT", tooltip="The sampled latent."),
                io.Mask.Output("subject_mask", display_name="subject_mask", tooltip="Where the subject model (SDM) owned the image in the last fusion step (1) vs the scene model (0); all 0 if no fusion step ran."),
            ],
        )

    @classmethod
    def execute(
        cls, tdm, sdm, text, subject, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, start_merge, final, denoise, scene_positive=None, scene_negative=None
    ) -> io.NodeOutput:
        with errors_named(NAME):
            guider = build_guider(tdm, sdm, text, subject, negative, cfg, start_merge, final, scene_positive, scene_negative, node=NAME)
        latent = comfy.sample.fix_empty_latent_channels(guider.model_patcher, latent_image["samples"])
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        sigmas = comfy.samplers.KSampler(guider.model_patcher, steps, guider.model_patcher.load_device, sampler_name, scheduler, denoise).sigmas
        callback = latent_preview.prepare_callback(guider.model_patcher, sigmas.shape[-1] - 1)
        samples = guider.sample(
            noise,
            latent,
            comfy.samplers.sampler_object(sampler_name),
            sigmas,
            denoise_mask=latent_image.get("noise_mask"),
            callback=callback,
            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
            seed=seed,
        )
        out = latent_image.copy()
        out["samples"] = samples.to(mm.intermediate_device())
        return io.NodeOutput(out, subject_mask_image(guider.last_subject_mask, latent))
