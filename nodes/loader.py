"""Face-diffuser Loader: SDM + TDM files -> two MODELs, CLIP, VAE and the subject encoder."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import comfy.model_detection
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import folder_paths
import torch
from comfy_api.latest import io

from ..facediffuser_core.errors import CheckpointError
from ..facediffuser_core.method.subject_encoder import SubjectEncoder
from ..facediffuser_core.method.subjects import References
from ..facediffuser_core.weights.checkpoints import FaceDiffuserCheckpoint, ModelKind, load_checkpoint
from .common import CATEGORY, MODEL_FOLDER, auxiliary_model, errors_named, loaded, missing_model

NAME = "Face-diffuser Loader"
NO_TDM = "none (another scene model)"  # tdm_name when a Load Checkpoint model builds the scene
WEIGHT_DTYPES = {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

SubjectEncoderType = io.Custom("FACEDIFFUSER_SUBJECT_ENCODER")


class SubjectEncoderModel:
    """The SDM's subject encoder (CLIP image tower + postfuse) under ComfyUI model management:
    kept on the offload device and moved to the text-encoder device only while it runs."""

    def __init__(self, encoder: SubjectEncoder, dtype: Optional[torch.dtype] = None) -> None:
        self.patcher = auxiliary_model(encoder, dtype)

    @property
    def encoder(self) -> SubjectEncoder:
        return self.patcher.model.inner

    def augment(
        self, text_cond: torch.Tensor, references: References, positions: Sequence[int], object_resolution: int, words: Sequence[str]
    ) -> torch.Tensor:
        """[1, L, 768] text conditioning -> subject-augmented copy (see :meth:`SubjectEncoder.forward`)."""
        device = self.patcher.load_device
        if isinstance(references, torch.Tensor):
            references = references.to(device)
        else:
            references = [subject.to(device) for subject in references]
        fused = loaded(self.patcher)(text_cond.to(device), references, positions, object_resolution, words)
        return fused.to(device=mm.intermediate_device(), dtype=text_cond.dtype)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor, object_resolution: int) -> torch.Tensor:
        """IMAGE [N,H,W,C] -> [N, D] float32 image embeddings on the CPU (see :meth:`SubjectEncoder.embed_images`)."""
        return loaded(self.patcher).embed_images(images.to(self.patcher.load_device), object_resolution).float().cpu()


def load_unet(checkpoint: FaceDiffuserCheckpoint, dtype: Optional[torch.dtype]) -> comfy.model_patcher.ModelPatcher:
    """diffusers-layout UNet -> ComfyUI MODEL; refuses anything but a complete SD1.5 UNet."""
    unet = dict(checkpoint.unet)
    given = len(unet)
    config = comfy.model_detection.model_config_from_diffusers_unet(unet)
    if not isinstance(config, comfy.supported_models.SD15):
        found = type(config).__name__ if config is not None else "an unrecognised UNet"
        raise CheckpointError(f"{checkpoint.path}: the UNet is {found}, not SD1.5")
    patcher = comfy.sd.load_diffusion_model_state_dict(unet, model_options={} if dtype is None else {"dtype": dtype})
    if unet:  # the loader pops every tensor it used
        raise CheckpointError(f"{checkpoint.path}: the UNet has {len(unet)} unexpected tensors, e.g. unet.{next(iter(unet))}")
    expected = len(patcher.model.diffusion_model.state_dict())
    if given < expected:
        raise CheckpointError(f"{checkpoint.path}: the UNet has {given} tensors where SD1.5 has {expected}; the file is incomplete")
    return patcher


def load_clip(checkpoint: FaceDiffuserCheckpoint):
    """The checkpoint's CLIP text encoder as a ComfyUI CLIP (SD1 tokenizer, embeddings folder).

    Face-diffuser saves a CLIPTextModel, which has no text projection; SD1.5 never uses it (only the
    pooled output passes through it), so an identity stands in rather than uninitialised weights.
    """
    text = dict(checkpoint.text_encoder)
    norm = text["text_model.final_layer_norm.weight"]
    text.setdefault("text_projection.weight", torch.eye(norm.shape[0], dtype=norm.dtype))
    return comfy.sd.load_text_encoder_state_dicts(
        [text],
        embedding_directory=folder_paths.get_folder_paths("embeddings"),
        clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
    )


def load_models(sdm_path: str, tdm_path: Optional[str], weight_dtype: str = "auto"):
    """Load the SDM and TDM files (no TDM when ``tdm_path`` is None: its output is None); returns
    ``(tdm, sdm, clip, vae, subject_encoder)``.

    CLIP and VAE come from the SDM, whose text encoder the official pipeline uses for every prompt.
    The SDM file is checked first (a swapped pair fails before the TDM is read). The files are
    memory-mapped (see :func:`~facediffuser_core.weights.checkpoints.read_state_dict`): checking a file reads
    only its keys and shapes, and each model is built from a fresh mapping holding its own tensors
    alone, which goes when the model is built. So a first run holds the models and, at any time, the
    file tensors of one model at most: the UNets come first, while the least else is loaded.
    """
    dtype = WEIGHT_DTYPES[weight_dtype]

    def sdm() -> FaceDiffuserCheckpoint:
        return load_checkpoint(sdm_path, expect=ModelKind.SDM)

    sdm()
    tdm = None if tdm_path is None else load_unet(load_checkpoint(tdm_path, expect=ModelKind.TDM), dtype)
    sdm_unet = load_unet(sdm(), dtype)
    encoder = SubjectEncoderModel(SubjectEncoder.from_state_dict(sdm().subject_encoder), dtype)
    clip = load_clip(sdm())
    return tdm, sdm_unet, clip, comfy.sd.VAE(sd=dict(sdm().vae)), encoder


class FaceDiffuserLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        files = folder_paths.get_filename_list(MODEL_FOLDER)
        return io.Schema(
            node_id="FaceDiffuserLoader",
            display_name=NAME,
            category=CATEGORY,
            description="Loads the two Face-diffuser models from models/facediffuser: the subject-augmented "
            "model (SDM) and the text-driven model (TDM), official pytorch_model.bin or converted .safetensors. "
            "CLIP and VAE come from the SDM file, so no separate SD1.5 checkpoint is needed.",
            inputs=[
                io.Combo.Input(
                    "sdm_name",
                    options=files,
                    tooltip="The SDM file (e.g. facediffuser_sdm.safetensors or SDM/pytorch_model.bin) in models/facediffuser. No file "
                    "yet: `python -m facediffuser_core download` in the pack's folder fetches and converts the official ones.",
                ),
                io.Combo.Input(
                    "tdm_name",
                    options=[*files, NO_TDM],
                    tooltip=f"The TDM file (e.g. facediffuser_tdm.safetensors or TDM/pytorch_model.bin) in models/facediffuser; "
                    f"'{NO_TDM}' loads none when another SD1.5 model (Load Checkpoint) builds the scene.",
                ),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="auto", tooltip="Dtype of both UNets and the subject encoder. auto lets ComfyUI choose (fp16 on most GPUs, fp32 on CPU)."),
            ],
            outputs=[
                io.Model.Output("tdm", display_name="tdm", tooltip=f"Text-driven model: builds the scene (nothing with tdm_name '{NO_TDM}')."),
                io.Model.Output("sdm", display_name="sdm", tooltip="Subject-augmented model: renders the reference people."),
                io.Clip.Output("clip", display_name="clip", tooltip="The SDM's CLIP text encoder (SD1.5 CLIP-L)."),
                io.Vae.Output("vae", display_name="vae", tooltip="The SDM's VAE."),
                SubjectEncoderType.Output("subject_encoder", display_name="subject_encoder", tooltip="CLIP image encoder + postfuse MLP that fuse each reference face into its word of the prompt."),
            ],
        )

    @classmethod
    def validate_inputs(cls, sdm_name: Optional[str], tdm_name: Optional[str]) -> Union[bool, str]:
        """Instead of ComfyUI's list check, which says only "not in []" for an empty folder."""
        tdm = None if tdm_name == NO_TDM else tdm_name
        return missing_model(NAME, MODEL_FOLDER, sdm_name) or missing_model(NAME, MODEL_FOLDER, tdm) or True

    @classmethod
    def execute(cls, sdm_name: str, tdm_name: str, weight_dtype: str) -> io.NodeOutput:
        with errors_named(NAME):
            sdm_path = folder_paths.get_full_path_or_raise(MODEL_FOLDER, sdm_name)
            tdm_path = None if tdm_name == NO_TDM else folder_paths.get_full_path_or_raise(MODEL_FOLDER, tdm_name)
            return io.NodeOutput(*load_models(sdm_path, tdm_path, weight_dtype))
