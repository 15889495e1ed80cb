"""Face-diffuser Guider: a GUIDER running the three stages, usable with any ComfyUI sampler."""

from __future__ import annotations

import logging
from typing import Optional

import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers
import comfy.supported_models
import torch
from comfy_api.latest import io

from ..facediffuser_core.errors import FaceDiffuserError
from ..facediffuser_core.method.guidance import Guided, cfg, combine_guided, guided_from
from ..facediffuser_core.method.schedule import (
    FINAL_FRACTION,
    OFFICIAL_GUIDANCE,
    START_MERGE_FRACTION,
    Stage,
    bounds_from_fractions,
    stage_at,
    step_index,
    validate_fractions,
)
from .common import CATEGORY, errors_named
from .loader import NO_TDM
from .regional_attention import RegionalCrossAttention, install, regional_patch, regioned_entries

NAME = "Face-diffuser Guider"
TDM_KEY = "facediffuser_tdm"
GUIDANCE_HOOKS = ("sampler_cfg_function", "sampler_pre_cfg_function", "sampler_post_cfg_function", "sampler_calc_cond_batch_function")


def has_guidance_hooks(model_options: dict) -> bool:
    """Whether a model carries any of ComfyUI's CFG hooks (RescaleCFG, CFGNorm, APG, PAG, SAG, ...)."""
    return any(model_options.get(key) for key in GUIDANCE_HOOKS)


def check_sd1(model, role: str, source: str) -> None:
    """A model on the ``role`` input must be plain SD1.x (SD1.5 and its fine-tunes)."""
    config = getattr(model.model, "model_config", None)
    if type(config) is not comfy.supported_models.SD15:
        found = type(config).__name__ if config is not None else type(model.model).__name__
        raise FaceDiffuserError(f"{role}: the model is {found}, not SD1.x; connect {source}")


def check_scene_conditioning(tdm, name: str, conditioning) -> None:
    """A scene conditioning must be encoded for the scene model's cross-attention width."""
    width = tdm.model.model_config.unet_config.get("context_dim")
    for embedding, _ in conditioning:
        if embedding.shape[-1] != width:
            raise FaceDiffuserError(
                f"{name} has {embedding.shape[-1]}-wide embeddings but the scene model takes {width}; "
                "encode it with the scene model's own CLIP (the CLIP output of the loader of the model on tdm)"
            )


def check_model_pair(tdm, sdm) -> None:
    """The two UNets must be distinct SD1.x models sampled on one noise schedule."""
    if tdm is None:
        raise FaceDiffuserError(
            f"tdm has no model: the Face-diffuser Loader's tdm_name is '{NO_TDM}'; connect the scene model (e.g. Load Checkpoint's MODEL) to tdm, or pick the TDM file"
        )
    check_sd1(tdm, "tdm", "the Face-diffuser Loader's tdm or an SD1.5 checkpoint (e.g. Load Checkpoint)")
    check_sd1(sdm, "sdm", "the Face-diffuser Loader's sdm")
    if tdm.model is sdm.model:
        raise FaceDiffuserError(
            "tdm and sdm are the same model; connect the Face-diffuser Loader's tdm and sdm outputs to them"
        )
    tdm_sampling, sdm_sampling = tdm.get_model_object("model_sampling"), sdm.get_model_object("model_sampling")
    # ComfyUI builds a new ModelSampling class per model; what it samples with are its base classes
    tdm_kind, sdm_kind = type(tdm_sampling).__bases__, type(sdm_sampling).__bases__
    same_sigmas = tdm_sampling.sigmas.shape == sdm_sampling.sigmas.shape and torch.allclose(
        tdm_sampling.sigmas.cpu(), sdm_sampling.sigmas.cpu()
    )
    if tdm_kind != sdm_kind or not same_sigmas:
        names = lambda kind: "+".join(base.__name__ for base in kind)  # noqa: E731
        raise FaceDiffuserError(
            f"tdm and sdm use different model sampling (tdm: {names(tdm_kind)}, sdm: {names(sdm_kind)}"
            f"{'' if same_sigmas else ', different sigmas'}); patch both models the same way "
            "(e.g. the same ModelSamplingDiscrete node on both) or neither"
        )
    if type(tdm.get_model_object("latent_format")) is not type(sdm.get_model_object("latent_format")):
        raise FaceDiffuserError("tdm and sdm use different latent formats; both must be SD1.5 models")


class StagedCFGGuider(comfy.samplers.CFGGuider):
    """A CFG guider whose model evaluations know their stage: the step index of the evaluation's
    sigma in this run's schedule, against bounds at fractions of its steps (so every sampler and
    scheduler works)."""

    node = NAME  # the node named in errors raised while sampling
    regions: Optional[RegionalCrossAttention] = None  # the people's regions, when a conditioning carries them

    def __init__(self, model, cfg: float, start_fraction: float, final_fraction: float) -> None:
        validate_fractions(start_fraction, final_fraction)
        super().__init__(model)
        self.set_cfg(cfg)
        self.start_fraction, self.final_fraction = start_fraction, final_fraction

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, *args, **kwargs):
        if self.regions is not None:
            with errors_named(self.node):
                self.regions.check_latent(tuple(noise.shape[-2:]))
                denoise_mask = args[0] if args else kwargs.get("denoise_mask")
                if denoise_mask is not None and denoise_mask.ndim == noise.ndim:  # only there is the picture repainted
                    self.regions.check_inside(denoise_mask)
        self.schedule = sigmas.detach().to("cpu", torch.float64)  # looked up at every model evaluation
        self.bounds = bounds_from_fractions(len(sigmas) - 1, self.start_fraction, self.final_fraction)
        try:
            return super().inner_sample(noise, latent_image, device, sampler, sigmas, *args, **kwargs)
        finally:
            del self.schedule, self.bounds

    def stage_of(self, timestep: torch.Tensor) -> Stage:
        """The stage of a model evaluation at ``timestep`` (its sigmas [B])."""
        return stage_at(step_index(float(timestep[0]), self.schedule), self.bounds)


class FaceDiffuserCFGGuider(StagedCFGGuider):
    """Scene stage: TDM with CFG; fusion stage: both models fused by SNF; subject stage: SDM with the
    text prompt as negative. The scene model (the TDM, or any SD1.x model) may have its own prompt
    pair. The SDM is the primary model; the TDM is registered as an additional model so ComfyUI
    loads both in one model-management call. Stages follow the step index of each
    evaluation in the sigma schedule, so every sampler and scheduler works. Each model is guided with
    its own options: by ComfyUI's CFG chain when it carries guidance hooks, by the official eps-space
    CFG otherwise; the fusion stage compares the responses after the hooks."""

    def __init__(self, tdm, sdm, cfg: float, start_fraction: float, final_fraction: float) -> None:
        check_model_pair(tdm, sdm)
        primary = sdm.clone()
        primary.set_additional_models(TDM_KEY, [tdm])
        super().__init__(primary, cfg, start_fraction, final_fraction)
        self.last_subject_mask: Optional[torch.Tensor] = None  # bool [B,1,h,w] of the latest fusion step

    def set_conds(self, negative, text, subject, scene_positive=None, scene_negative=None) -> None:
        """The SDM's pair is (text, subject); the scene model's (negative, text), or its own
        ``scene_negative`` / ``scene_positive`` where given."""
        conds = {"negative": negative, "text": text, "subject": subject}
        own = {"scene_negative": scene_negative, "scene_positive": scene_positive}
        conds.update({name: value for name, value in own.items() if value is not None})
        self.scene_pair = ("scene_negative" if scene_negative is not None else "negative", "scene_positive" if scene_positive is not None else "text")
        self.inner_set_conds(conds)
        self.regions = regional_patch(self.original_conds)
        if self.regions is None:
            return
        install(self.regions, self.model_patcher, "sdm")
        if any(regioned_entries({name: self.original_conds[name] for name in self.scene_pair})):
            scene = self.tdm.clone()
            install(self.regions, scene, "scene model (tdm)")
            self.model_patcher.set_additional_models(TDM_KEY, [scene])
        else:
            logging.info("%s: the scene model's own prompt (scene_positive) has no marked people: the scene model runs without regions", self.node)

    @property
    def tdm(self):
        return self.model_patcher.get_additional_models_with_key(TDM_KEY)[0]

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, *args, **kwargs):
        tdm = self.tdm
        options = comfy.model_patcher.create_model_options_clone(tdm.model_options)
        transformer_options = options.setdefault("transformer_options", {})
        for name, registry in (("wrappers", tdm.wrappers), ("callbacks", tdm.callbacks)):
            comfy.patcher_extension.merge_nested_dicts(transformer_options.setdefault(name, {}), registry, copy_dict1=False)
        transformer_options["sample_sigmas"] = sigmas
        self.tdm_model_options = options
        self.last_subject_mask = None
        tdm.pre_run()
        try:
            return super().inner_sample(noise, latent_image, device, sampler, sigmas, *args, **kwargs)
        finally:
            tdm.cleanup()
            del self.tdm_model_options

    def predict_noise(self, x: torch.Tensor, timestep: torch.Tensor, model_options: dict = {}, seed=None) -> torch.Tensor:
        stage = self.stage_of(timestep)
        # each model with its own (negative, positive) pair and its own options (hooks, patches)
        scene = (self.tdm.model, *self.scene_pair, self.tdm_model_options)
        subject = (self.inner_model, "text", "subject", model_options)
        if stage is not Stage.FUSION:
            model, negative, positive, options = scene if stage is Stage.SCENE else subject
            if has_guidance_hooks(options):  # what a KSampler on this model computes, step for step
                return comfy.samplers.sampling_function(model, x, timestep, self.conds[negative], self.conds[positive], self.cfg, options, seed)
        guided = combine_guided(
            stage,
            self.guidance(*scene, x, timestep, seed) if stage.uses_scene_model else None,
            self.guidance(*subject, x, timestep, seed) if stage.uses_subject_model else None,
        )
        if guided.subject_mask is not None:
            self.last_subject_mask = guided.subject_mask
        return x - guided.eps * sigma_like(timestep, x)

    def guidance(self, model, negative: str, positive: str, options: dict, x: torch.Tensor, timestep: torch.Tensor, seed) -> Guided:
        """One model's (guided eps, response). Without CFG hooks: the core's CFG on the two eps
        predictions; with hooks: ComfyUI's sampling_function, the response being its result minus
        the negative's prediction (both after the hooks, the negative as the post-CFG hooks see it)."""
        sigma = sigma_like(timestep, x)

        def eps(denoised: torch.Tensor) -> torch.Tensor:  # ComfyUI models return x0
            return (x - denoised) / sigma

        if not has_guidance_hooks(options):  # [cond, uncond] order, as CFGGuider passes them
            positive_x0, negative_x0 = comfy.samplers.calc_cond_batch(model, [self.conds[positive], self.conds[negative]], x, timestep, options)
            return cfg(eps(negative_x0), eps(positive_x0), self.cfg)
        negatives = []

        def record_negative(args: dict) -> torch.Tensor:
            negatives.append(args["uncond_denoised"])
            return args["denoised"]

        options = {
            **options,
            "sampler_post_cfg_function": [*options.get("sampler_post_cfg_function", []), record_negative],
            "disable_cfg1_optimization": True,  # SNF needs the negative's prediction even at cfg 1
        }
        guided = comfy.samplers.sampling_function(model, x, timestep, self.conds[negative], self.conds[positive], self.cfg, options, seed)
        return guided_from(eps(negatives[-1]), eps(guided))


def sigma_like(timestep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The sigmas [B] of a model evaluation shaped to broadcast over x [B,C,H,W]."""
    return timestep.reshape(-1, *([1] * (x.ndim - 1)))


MODEL_INPUTS = [
    io.Model.Input("tdm", tooltip="Scene model: the Face-diffuser Loader's tdm (text-driven model), or any SD1.5 model (Load Checkpoint, with LoRAs) given its own prompts in scene_positive / scene_negative."),
    io.Model.Input("sdm", tooltip="Subject-augmented model (Face-diffuser Loader: sdm)."),
    io.Conditioning.Input("text", tooltip="Subject Encode: text. Positive for the TDM, negative for the SDM."),
    io.Conditioning.Input("subject", tooltip="Subject Encode: subject. Positive for the SDM."),
    io.Conditioning.Input("negative", tooltip="The TDM's negative: the official method uses an empty prompt (CLIP Text Encode with no text). Not used while scene_negative is connected."),
]
SCENE_INPUTS = [
    io.Conditioning.Input(
        "scene_positive",
        optional=True,
        tooltip="Optional: the scene model's own prompt, encoded with its own CLIP (e.g. Load Checkpoint + LoRA into CLIP Text Encode). Replaces text for the scene model only; the SDM keeps text and subject.",
    ),
    io.Conditioning.Input(
        "scene_negative",
        optional=True,
        tooltip="Optional: the scene model's own negative, encoded with its own CLIP. Replaces negative for the scene model only.",
    ),
]
CFG_INPUT = io.Float.Input("cfg", default=OFFICIAL_GUIDANCE, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="Guidance scale of both models (official: 5).")
STAGE_INPUTS = [
    io.Float.Input(
        "start_merge",
        default=START_MERGE_FRACTION,
        min=0.0,
        max=1.0,
        step=0.01,
        tooltip="End of the scene stage (TDM alone), as a fraction of the steps: 0.30 of 50 steps is the official step 15. 0 = no scene stage.",
    ),
    io.Float.Input(
        "final",
        default=FINAL_FRACTION,
        min=0.0,
        max=1.0,
        step=0.01,
        tooltip="End of the fusion stage (both models, saliency-adaptive noise fusion), as a fraction of the steps: 0.60 of 50 is the official step 30. Equal to start_merge = no fusion; 1 = no subject-only stage.",
    ),
]


def build_guider(
    tdm, sdm, text, subject, negative, cfg: float, start_merge: float, final: float, scene_positive=None, scene_negative=None, node: str = NAME
) -> FaceDiffuserCFGGuider:
    """The guider of the node ``node`` (named in the errors it raises while sampling)."""
    guider = FaceDiffuserCFGGuider(tdm, sdm, cfg, start_merge, final)
    guider.node = node
    for name, conditioning in (("scene_positive", scene_positive), ("scene_negative", scene_negative)):
        if conditioning is not None:
            check_scene_conditioning(tdm, name, conditioning)
    guider.set_conds(negative, text, subject, scene_positive, scene_negative)
    return guider


class FaceDiffuserGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceDiffuserGuider",
            display_name=NAME,
            category=CATEGORY,
            description="A GUIDER for SamplerCustomAdvanced that runs Face-diffuser's three stages: the TDM builds "
            "the scene, then both models are fused per pixel by saliency, then the SDM refines the people. "
            "Works with every sampler and scheduler; stage boundaries are fractions of the steps. "
            "The scene model may be any SD1.5 model with its own prompts (scene_positive, scene_negative).",
            inputs=[*MODEL_INPUTS, CFG_INPUT, *STAGE_INPUTS, *SCENE_INPUTS],
            outputs=[io.Guider.Output("guider", display_name="guider", tooltip="Connect to SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, tdm, sdm, text, subject, negative, cfg: float, start_merge: float, final: float, scene_positive=None, scene_negative=None) -> io.NodeOutput:
        with errors_named(NAME):
            return io.NodeOutput(build_guider(tdm, sdm, text, subject, negative, cfg, start_merge, final, scene_positive, scene_negative))
