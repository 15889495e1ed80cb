"""Face-diffuser Identity Score and Prompt Consistency: the paper's IP and PC metrics as nodes."""

from __future__ import annotations

import os
from statistics import fmean
from typing import Optional, Union

import comfy.model_management as mm
import comfy.sd1_clip
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..facediffuser_core.faces.consistency import CLIP_URL, clean_prompt, load_clip, prompt_consistency
from ..facediffuser_core.faces.detection import load_detector, pil_to_image, to_pil_images
from ..facediffuser_core.faces.identity import FACENET_URL, FACENET_WEIGHTS, annotate_identity, load_facenet, reference_embeddings, score_identity
from ..facediffuser_core.method.prompt import MARKER
from ..facediffuser_core.weights.model_folders import CLIP_EVAL_FOLDER, FACENET_FOLDER
from .common import CATEGORY, auxiliary_model, cached_by_file, errors_named, loaded, missing_model, progress

IDENTITY_NAME = "Face-diffuser Identity Score"
CONSISTENCY_NAME = "Face-diffuser Prompt Consistency"
CLIP_EVAL_EXTENSIONS = {".safetensors"}
SD1_TOKENIZER = os.path.join(os.path.dirname(os.path.realpath(comfy.sd1_clip.__file__)), "sd1_tokenizer")  # CLIP ViT-L/14's BPE


@cached_by_file
def facenet_model(path: str):
    return auxiliary_model(load_facenet(path), torch.float32)


@cached_by_file
def clip_model(path: str):
    """(patcher, tokenizer); a single file without its Hugging Face folder uses ComfyUI's copy of
    the CLIP ViT-L/14 tokenizer."""
    clip = load_clip(path, SD1_TOKENIZER)
    return auxiliary_model(clip.model), clip.tokenizer


def identity_scores(images: torch.Tensor, references: torch.Tensor, facenet_path: str):
    """Returns ``(scores, summary, annotated [N,H,W,3])`` of generated images against reference photos."""
    facenet = loaded(facenet_model(facenet_path))
    detector = load_detector(str(mm.get_torch_device()))
    reference_embeds = reference_embeddings(facenet, detector, to_pil_images(references, "reference images"))
    generated = to_pil_images(images, "images")
    update = progress(len(generated))
    results, annotated = [], []
    for index, image in enumerate(generated):
        results.append(score_identity(facenet, detector, reference_embeds, image))
        annotated.append(annotate_identity(image, results[-1]))
        update(index + 1, len(generated))
    lines = [f"image {index + 1}: {result.describe()}" for index, result in enumerate(results)]
    lines.append(f"mean IP of {len(results)} image(s): {fmean(r.score for r in results):.4f} ({len(reference_embeds)} reference(s))")
    return [r.score for r in results], "\n".join(lines), pil_to_image(annotated)


def consistency_scores(images: torch.Tensor, prompt: str, clip_path: str):
    """Returns ``(scores, summary)``: the CLIP similarity of each image to the prompt."""
    patcher, tokenizer = clip_model(clip_path)
    scores = prompt_consistency(loaded(patcher), tokenizer, images, prompt).tolist()
    lines = [f"image {index + 1}: PC {score:.4f}" for index, score in enumerate(scores)]
    lines.append(f"mean PC of {len(scores)} image(s): {fmean(scores):.4f} for \"{clean_prompt(prompt)}\"")
    return scores, "\n".join(lines)


class FaceDiffuserIdentityScore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceDiffuserIdentityScore",
            display_name=IDENTITY_NAME,
            category=CATEGORY,
            description="Identity Preservation (IP), as the paper measures it: FaceNet cosine similarity between each "
            "reference face and the faces of each generated image (MTCNN detection). With several references, faces "
            "are matched greedily by similarity and the image scores the lowest match (0 for a missing face).",
            inputs=[
                io.Image.Input("images", tooltip="Generated images (a batch), e.g. from VAE Decode."),
                io.Image.Input("references", tooltip="The reference photos, one per subject (a batch, any order); the largest face of each is used."),
                io.Combo.Input(
                    "facenet_name",
                    options=folder_paths.get_filename_list(FACENET_FOLDER),
                    tooltip=f"FaceNet weights in models/{FACENET_FOLDER}: {FACENET_WEIGHTS} from {FACENET_URL} "
                    "(`python -m facediffuser_core download --facenet` in the pack's folder puts it there).",
                ),
            ],
            outputs=[
                io.Float.Output("scores", display_name="scores", is_output_list=True, tooltip="Per generated image its IP: the lowest of its subjects' face similarities, at least 0."),
                io.String.Output("summary", display_name="summary", tooltip="Per image the similarity of every reference and which face it matched, and the mean IP."),
                io.Image.Output("annotated", display_name="annotated", tooltip="The generated images with each matched face boxed in green with its reference and similarity; unmatched faces in grey."),
            ],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, facenet_name: Optional[str]) -> Union[bool, str]:
        return missing_model(IDENTITY_NAME, FACENET_FOLDER, facenet_name, ["--facenet"]) or True

    @classmethod
    def execute(cls, images: torch.Tensor, references: torch.Tensor, facenet_name: str) -> io.NodeOutput:
        with errors_named(IDENTITY_NAME):
            scores, summary, annotated = identity_scores(images, references, folder_paths.get_full_path_or_raise(FACENET_FOLDER, facenet_name))
        return io.NodeOutput(scores, summary, annotated, ui=ui.PreviewText(summary))


class FaceDiffuserPromptConsistency(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceDiffuserPromptConsistency",
            display_name=CONSISTENCY_NAME,
            category=CATEGORY,
            description="Prompt Consistency (PC), as the paper measures it: the CLIP ViT-L/14 cosine similarity between "
            f"each image and the prompt (its {MARKER} markers removed).",
            inputs=[
                io.Image.Input("images", tooltip="Generated images (a batch)."),
                io.String.Input("prompt", multiline=True, default="", tooltip=f"The prompt the images were generated from; {MARKER} markers are removed, text past CLIP's 77 tokens is cut."),
                io.Combo.Input(
                    "clip_name",
                    options=folder_paths.get_filename_list(CLIP_EVAL_FOLDER),
                    tooltip=f"CLIP ViT-L/14 in models/{CLIP_EVAL_FOLDER}: the whole folder of {CLIP_URL} (pick its model.safetensors), or one .safetensors of a CLIPModel state dict "
                    "(`python -m facediffuser_core download --clip` in the pack's folder puts the folder there).",
                ),
            ],
            outputs=[
                io.Float.Output("scores", display_name="scores", is_output_list=True, tooltip="Per image its PC: the cosine similarity of its CLIP image and text features."),
                io.String.Output("summary", display_name="summary", tooltip="Per image its PC, and the mean."),
            ],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, clip_name: Optional[str]) -> Union[bool, str]:
        return missing_model(CONSISTENCY_NAME, CLIP_EVAL_FOLDER, clip_name, ["--clip"]) or True

    @classmethod
    def execute(cls, images: torch.Tensor, prompt: str, clip_name: str) -> io.NodeOutput:
        with errors_named(CONSISTENCY_NAME):
            scores, summary = consistency_scores(images, prompt, folder_paths.get_full_path_or_raise(CLIP_EVAL_FOLDER, clip_name))
        return io.NodeOutput(scores, summary, ui=ui.PreviewText(summary))
