"""FastComposer Guider: FastComposer's one model with its delayed subject conditioning, as a GUIDER."""

from __future__ import annotations

import comfy.samplers
import torch
from comfy_api.latest import io

from ..facediffuser_core.method.preprocess import FASTCOMPOSER_OBJECT_RESOLUTION
from ..facediffuser_core.method.schedule import FASTCOMPOSER_START_FRACTION, OFFICIAL_GUIDANCE, Stage
from .common import CATEGORY, errors_named
from .guider import StagedCFGGuider, check_sd1
from .regional_attention import install, regional_patch

NAME = "FastComposer Guider"


class FastComposerCFGGuider(StagedCFGGuider):
    """CFG on one model, always against ``negative`` (the empty prompt): the positive is the text
    prompt while the step index is <= the start step (delayed subject conditioning), the
    subject-augmented prompt afterwards. Each step is ComfyUI's own CFG, hooks and patches included,
    so with every step on one side it is a stock CFG guider on that pair."""

    node = NAME

    def __init__(self, model, cfg: float, start_fraction: float) -> None:
        check_sd1(model, "model", "the Face-diffuser Loader's sdm, loaded from a FastComposer file")
        super().__init__(model, cfg, start_fraction, start_fraction)  # no fusion stage

    def set_conds(self, negative, text, subject) -> None:
        """The conditionings; where they carry people's regions, the model is cloned and the clone gets the regional patch."""
        self.inner_set_conds({"negative": negative, "text": text, "subject": subject})
        self.regions = regional_patch(self.original_conds)
        if self.regions is not None:
            self.model_patcher = self.model_patcher.clone()
            self.model_options = self.model_patcher.model_options
            install(self.regions, self.model_patcher, "model")

    def predict_noise(self, x: torch.Tensor, timestep: torch.Tensor, model_options: dict = {}, seed=None) -> torch.Tensor:
        delayed = self.stage_of(timestep) is Stage.SCENE
        positive = self.conds["text" if delayed else "subject"]
        return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds["negative"], positive, self.cfg, model_options=model_options, seed=seed)


def build_fastcomposer_guider(model, text, subject, negative, cfg: float, start_merge: float) -> FastComposerCFGGuider:
    guider = FastComposerCFGGuider(model, cfg, start_merge)
    guider.set_conds(negative, text, subject)
    return guider


class FastComposerGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastComposerGuider",
            display_name=NAME,
            category=CATEGORY,
            description="A GUIDER for SamplerCustomAdvanced that samples FastComposer's one model (MIT license) with its "
            "delayed subject conditioning: the text prompt for the first steps, then the prompt with the faces fused in, "
            "always against the empty prompt. Load the FastComposer file with the Face-diffuser Loader (as sdm, tdm_name none).",
            inputs=[
                io.Model.Input("model", tooltip="The Face-diffuser Loader's sdm, loaded from a FastComposer file (sdm_name; tdm_name 'none (another scene model)')."),
                io.Conditioning.Input("text", tooltip=f"Subject Encode's text (FastComposer encodes the faces at object_resolution {FASTCOMPOSER_OBJECT_RESOLUTION}): the positive of the first steps."),
                io.Conditioning.Input("subject", tooltip="Subject Encode's subject: the positive after start_merge."),
                io.Conditioning.Input("negative", tooltip="The negative of every step: FastComposer uses an empty prompt (CLIP Text Encode with no text)."),
                io.Float.Input("cfg", default=OFFICIAL_GUIDANCE, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="Guidance scale (FastComposer: 5)."),
                io.Float.Input(
                    "start_merge",
                    default=FASTCOMPOSER_START_FRACTION,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="End of the text-only steps, as a fraction of the steps: 0.20 of 50 steps is FastComposer's step 10. 0 = the faces from the first step.",
                ),
            ],
            outputs=[io.Guider.Output("guider", display_name="guider", tooltip="Connect to SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, model, text, subject, negative, cfg: float, start_merge: float) -> io.NodeOutput:
        with errors_named(NAME):
            return io.NodeOutput(build_fastcomposer_guider(model, text, subject, negative, cfg, start_merge))
