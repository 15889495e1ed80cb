"""Face-diffuser Face Detailer: every face of a picture re-rendered by the SDM with its own person's
subject conditioning (the subject stage on a crop)."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import comfy.model_management as mm
import comfy.sample
import comfy.utils
import folder_paths
import latent_preview
import torch
from comfy_api.latest import io

from ..facediffuser_core.errors import FaceNotFoundError, PromptError
from ..facediffuser_core.faces.detailer import (
    DEFAULT_DENOISE,
    DEFAULT_FEATHER,
    DEFAULT_SIZE,
    IF_UNMATCHED,
    MATCH_BY_SUBJECT_ENCODER,
    Placement,
    check_faces_found,
    cosine_to_people,
    detail_pictures,
    detail_preview,
    face_crop,
    person_prompt,
    place_faces,
)
from ..facediffuser_core.faces.detection import DEFAULT_MARGIN, IF_NO_FACE, Face, crop_square, detect_faces, load_detector, to_pil_images
from ..facediffuser_core.faces.identity import embed_faces, face_tensors, reference_embeddings
from ..facediffuser_core.method.preprocess import to_rgb
from ..facediffuser_core.method.prompt import MARKER, parse_prompt
from ..facediffuser_core.method.subjects import References, marker_label, people_references, photos_of
from .common import CATEGORY, errors_named, loaded
from .encode import CLIP_INPUT, IMAGES_INPUT, OBJECT_RESOLUTION_INPUT, PROMPT_INPUT, SUBJECT_ENCODER_INPUT, SUBJECTS_INPUT, chosen_references, comfy_tokenizer, encode_subjects, encode_text
from .encode import NAME as ENCODE_NAME
from .guider import CFG_INPUT, check_sd1
from .loader import SubjectEncoderModel
from .sampler import SAMPLER_INPUT, SCHEDULER_INPUT, SEED_INPUT, STEPS_INPUT
from .scores import FACENET_FOLDER, facenet_model

NAME = "Face-diffuser Face Detailer"

def encoder_embedder(encoder: SubjectEncoderModel, people: Sequence[References], margin: float, object_resolution: int):
    """(face embedder, people's [N_p, D] embeddings) in the subject encoder's image embedding: a face
    is its margin square, embedded as a reference photo is."""
    people_embeds = [torch.cat([encoder.embed_images(batch, object_resolution) for batch in photos_of(person)]) for person in people]

    def embed(picture: torch.Tensor, index: int, faces: Sequence[Face]) -> torch.Tensor:
        pixels = to_rgb(picture, "image")[0]
        crops = torch.cat([face_crop(pixels, crop_square(face.box, margin), object_resolution) for face in faces])
        return encoder.embed_images(crops, object_resolution)

    return embed, people_embeds


def facenet_embedder(path: str, detector, pictures, people: Sequence[References], words: Sequence[str]):
    """(face embedder, people's [N_p, 512] embeddings) in FaceNet's embedding (the paper's identity
    metric); a reference photo without a face is an error naming its marker."""
    facenet = loaded(facenet_model(path))
    people_embeds = []
    for index, person in enumerate(people):
        photos = [photo for batch in photos_of(person) for photo in to_pil_images(batch, f"photos of {marker_label(index, words)}")]
        try:
            people_embeds.append(reference_embeddings(facenet, detector, photos))
        except FaceNotFoundError as error:
            raise FaceNotFoundError(f"{marker_label(index, words)}: {error} (FaceNet matching needs a face in every reference photo)") from None

    def embed(picture: torch.Tensor, index: int, faces: Sequence[Face]) -> torch.Tensor:
        return embed_faces(facenet, face_tensors(detector, pictures[index], faces))

    return embed, people_embeds


class FaceRenderer:
    """The ``render`` of :func:`~facediffuser_core.faces.detailer.detail_pictures`: VAE-encodes a crop and
    samples it with the SDM as KSampler does (the person's subject conditioning against its text
    conditioning; an unmatched face with the prompt's text against an empty prompt), then decodes.
    One progress bar over every face's steps, with previews; Cancel stops between steps."""

    def __init__(self, vae, sdm, people: Sequence[tuple], text_only: Optional[tuple], faces: int, steps: int, cfg: float, sampler_name: str, scheduler: str, denoise: float) -> None:
        """``people``: each person's (negative, positive) CONDITIONING pair; ``text_only``: the pair
        for unmatched faces (None when none is rendered); ``faces``: how many faces will be rendered."""
        self.vae, self.sdm, self.people, self.text_only = vae, sdm, people, text_only
        self.steps, self.cfg, self.sampler_name, self.scheduler, self.denoise = steps, cfg, sampler_name, scheduler, denoise
        self.bar = comfy.utils.ProgressBar(faces * self.steps)
        self.previewer = latent_preview.get_previewer(sdm.load_device, sdm.model.latent_format)
        self.done = 0

    def callback(self, step: int, x0: torch.Tensor, x: torch.Tensor, total_steps: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        preview = self.previewer.decode_latent_to_preview_image("JPEG", x0) if self.previewer else None
        self.bar.update_absolute(self.done * self.steps + step + 1, None, preview)

    def __call__(self, crop: torch.Tensor, placement: Placement) -> torch.Tensor:
        negative, positive = self.people[placement.person] if placement.person is not None else self.text_only
        latent = comfy.sample.fix_empty_latent_channels(self.sdm, self.vae.encode(crop[:, :, :, :3]))
        noise = comfy.sample.prepare_noise(latent, placement.seed)
        samples = comfy.sample.sample(
            self.sdm, noise, self.steps, self.cfg, self.sampler_name, self.scheduler, positive, negative, latent,
            denoise=self.denoise, callback=self.callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=placement.seed,
        )  # fmt: skip
        self.done += 1
        return self.vae.decode(samples.to(mm.intermediate_device())).float().cpu()


def face_detail(
    image: torch.Tensor, vae, sdm, clip, subject_encoder: SubjectEncoderModel, references: References, prompt: str,
    seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, denoise: float, size: int, margin: float,
    feather: float, if_unmatched: str, if_no_face: str, object_resolution: int, facenet_path: Optional[str] = None,
):  # fmt: skip
    """Returns ``(image [N,H,W,3], faces MASK [N,H,W], preview [N,H,W,3], placements)``: the
    outputs, and each picture's :class:`~facediffuser_core.faces.detailer.Placement` of its faces."""
    check_sd1(sdm, "sdm", "the Face-diffuser Loader's sdm")
    parsed = parse_prompt(prompt, comfy_tokenizer(clip))
    if not parsed.words:
        raise PromptError(f"the prompt marks no person; give the prompt of {ENCODE_NAME}, with {MARKER} after each person's class word")
    people = people_references(references, parsed.words)
    pictures = to_pil_images(image, "image")
    detector = load_detector(str(mm.get_torch_device()))
    found = detect_faces(detector, pictures)
    check_faces_found(found, if_no_face)
    if facenet_path is None:
        embed, people_embeds = encoder_embedder(subject_encoder, people, margin, object_resolution)
    else:
        embed, people_embeds = facenet_embedder(facenet_path, detector, pictures, people, parsed.words)
    placements = [
        place_faces(faces, cosine_to_people(embed(picture, index, faces), people_embeds) if faces else torch.zeros(0, len(people)), margin, if_unmatched, seed)
        for index, (picture, faces) in enumerate(zip(image, found))
    ]
    if denoise == 0:  # nothing to change: no VAE round trip
        placements = [[dataclasses.replace(p, rendered=False) for p in placed] for placed in placements]
    rendered = [p for placed in placements for p in placed if p.rendered]
    render = None
    if rendered:
        conditionings = [encode_subjects(clip, subject_encoder, person, person_prompt(word), object_resolution) for person, word in zip(people, parsed.words)]
        text_only = (encode_text(clip, ""), encode_text(clip, parsed.text)) if any(p.person is None for p in rendered) else None
        render = FaceRenderer(vae, sdm, conditionings, text_only, len(rendered), steps, cfg, sampler_name, scheduler, denoise)
    detailed, masks = detail_pictures(image, placements, render, size, feather)
    return detailed, masks, detail_preview(pictures, placements, parsed.words), placements


class FaceDiffuserFaceDetailer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        facenets = folder_paths.get_filename_list(FACENET_FOLDER)
        return io.Schema(
            node_id="FaceDiffuserFaceDetailer",
            display_name=NAME,
            category=CATEGORY,
            description="Repairs small faces knowing who is who: finds every face (MTCNN), gives each to the person it "
            "looks most like (one face per person, by identity, not position), and re-renders it larger with the SDM "
            f"and that person's own subject conditioning (\"a photo of a man {MARKER}\" with their photo, against the text: "
            "the subject stage on a crop), then blends it back with a feathered mask. Pixels outside the faces are unchanged.",
            inputs=[
                io.Image.Input("image", tooltip="The generated picture(s) (a batch is detailed picture by picture)."),
                io.Vae.Input("vae", tooltip="The Face-diffuser Loader's vae."),
                io.Model.Input("sdm", tooltip="The Face-diffuser Loader's sdm (subject-augmented model)."),
                CLIP_INPUT,
                SUBJECT_ENCODER_INPUT,
                IMAGES_INPUT,
                PROMPT_INPUT,
                SEED_INPUT,
                STEPS_INPUT,
                CFG_INPUT,
                SAMPLER_INPUT,
                SCHEDULER_INPUT,
                io.Float.Input("denoise", default=DEFAULT_DENOISE, min=0.0, max=1.0, step=0.01, tooltip="How much of each face is re-rendered: 0 returns the picture unchanged; around 0.4-0.5 keeps pose and lighting and restores identity; 1 draws the face anew."),
                io.Int.Input("size", default=DEFAULT_SIZE, min=64, max=2048, step=8, tooltip="Side in pixels each face's square is re-rendered at (SD1.5 works best at 512), then resized back."),
                io.Float.Input("margin", default=DEFAULT_MARGIN, min=0.0, max=4.0, step=0.05, tooltip="Space around each face box on every side, as a fraction of its longer side: 0.5 re-renders a square twice the face box (head and some hair)."),
                io.Float.Input("feather", default=DEFAULT_FEATHER, min=0.0, max=0.5, step=0.01, tooltip="Width of the blend at the edge of each face's square, as a fraction of its side: 0 pastes a hard square."),
                io.Combo.Input("if_unmatched", options=list(IF_UNMATCHED), default=IF_UNMATCHED[0], tooltip="A face left over when every person has one: 'leave it' as it is, or 'text only': re-render it with the prompt's text (no person)."),
                io.Combo.Input("if_no_face", options=list(IF_NO_FACE), default=IF_NO_FACE[0], tooltip="A picture without a face: 'error' stops with a message naming it; 'pass through' returns it unchanged."),
                OBJECT_RESOLUTION_INPUT,
                io.Combo.Input(
                    "facenet_name",
                    options=[MATCH_BY_SUBJECT_ENCODER, *facenets],
                    default=MATCH_BY_SUBJECT_ENCODER,
                    tooltip=f"How faces are matched to people: by the subject encoder's image embedding (always available), or by FaceNet weights in models/{FACENET_FOLDER} (the paper's identity metric; every reference photo then needs a visible face).",
                ),
                SUBJECTS_INPUT,
            ],
            outputs=[
                io.Image.Output("detailed", display_name="image", tooltip="The picture(s) with each person's face re-rendered."),
                io.Mask.Output("faces", display_name="faces", tooltip="Where each picture was re-rendered: the feathered face squares (0 = unchanged pixels)."),
                io.Image.Output("preview", display_name="preview", tooltip="The pictures with every face boxed, labelled with its person's marker number and word and the similarity; re-rendered faces in green, others in grey."),
            ],
        )

    @classmethod
    def execute(
        cls, image, vae, sdm, clip, subject_encoder, prompt, seed, steps, cfg, sampler_name, scheduler, denoise, size, margin, feather,
        if_unmatched, if_no_face, object_resolution, facenet_name, images=None, subjects=None,
    ) -> io.NodeOutput:  # fmt: skip
        with errors_named(NAME):
            facenet_path = None if facenet_name == MATCH_BY_SUBJECT_ENCODER else folder_paths.get_full_path_or_raise(FACENET_FOLDER, facenet_name)
            detailed, masks, preview, _ = face_detail(
                image, vae, sdm, clip, subject_encoder, chosen_references(images, subjects), prompt, seed, steps, cfg,
                sampler_name, scheduler, denoise, size, margin, feather, if_unmatched, if_no_face, object_resolution, facenet_path,
            )  # fmt: skip
            return io.NodeOutput(detailed, masks, preview)
