"""Face-diffuser Subject Encode: prompt with <|image|> markers + reference photos -> text and subject conditionings."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from comfy_api.latest import io

from ..facediffuser_core.errors import PromptError, ReferenceImageError
from ..facediffuser_core.method.preprocess import DEFAULT_OBJECT_RESOLUTION
from ..facediffuser_core.method.prompt import MARKER, MAX_SUBJECTS, parse_prompt
from ..facediffuser_core.method.regional_attention import REGIONS_KEY, people_regions
from ..facediffuser_core.method.subjects import References, Subject
from .common import CATEGORY, errors_named
from .loader import SubjectEncoderModel, SubjectEncoderType
from .subject import NAME as SUBJECT_NAME
from .subject import SubjectsType

NAME = "Face-diffuser Subject Encode"


def _sd1_chunks(clip, text: str) -> list:
    tokens = clip.tokenize(text)
    if list(tokens) != ["l"]:
        raise PromptError(f"the CLIP input must be an SD1.5 CLIP (the Face-diffuser Loader's), got one with encoders {list(tokens)}")
    return tokens["l"]


def comfy_tokenizer(clip) -> Callable[[str], list[int]]:
    """``tokenize(text) -> ids`` through ComfyUI's own SD1 tokenizer (weights syntax and embeddings
    included), without BOS, EOS and padding; an embedding vector counts as one token (-1)."""
    _sd1_chunks(clip, "")  # refuse other CLIP types before touching the SD1 tokenizer
    start = clip.tokenizer.clip_l.start_token
    end = clip.tokenizer.clip_l.end_token

    def tokenize(text: str) -> list[int]:
        ids: list[int] = []
        for chunk in _sd1_chunks(clip, text):
            for token, *_ in chunk[1:]:
                if isinstance(token, int) and token in (start, end):
                    break
                ids.append(token if isinstance(token, int) else -1)
        return ids

    return tokenize


def encode_text(clip, text: str):
    """The CONDITIONING of plain ``text``, as CLIP Text Encode gives it."""
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def encode_subjects(clip, subject_encoder: SubjectEncoderModel, references: References, prompt: str, object_resolution: int, masks: Optional[torch.Tensor] = None):
    """Returns ``(text, subject)``: the CONDITIONING of the clean prompt, and the same with the
    reference photos (an IMAGE, one per marker, or one Subject per marker) fused in at the marked words.
    Where the people have regions (``masks`` [N,H,W], one per marker, or each Subject's mask), both
    carry them as :class:`Regions` under ``REGIONS_KEY``; without regions both are exactly as before."""
    parsed = parse_prompt(prompt, comfy_tokenizer(clip))
    subject_masks = [] if isinstance(references, torch.Tensor) else [person.mask for person in references]
    regions = people_regions(masks, subject_masks, parsed.positions, parsed.words)
    tokens = {"l": _sd1_chunks(clip, parsed.text)}
    first_chunk = tokens["l"][0]
    for position, word in zip(parsed.positions, parsed.words):
        token = first_chunk[position][0]
        if not isinstance(token, int) or token != parsed.token_ids[position - 1]:
            raise PromptError(
                f"the marked word '{word}' does not land on token {position} of the first 75-token chunk "
                "(the tokenizer moved it to the next chunk, or it is an embedding); mark a plain word earlier in the prompt"
            )
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    subject = subject_encoder.augment(cond, references, parsed.positions, object_resolution, parsed.words)
    extra = {} if regions is None else {REGIONS_KEY: regions}
    return [[cond, {"pooled_output": pooled, **extra}]], [[subject, {"pooled_output": pooled, **extra}]]


def chosen_references(images: Optional[torch.Tensor], subjects: Optional[tuple[Subject, ...]]) -> References:
    """The one of ``images`` and ``subjects`` that is connected."""
    choices = f"images (one photo per {MARKER} marker) or subjects (chained {SUBJECT_NAME} nodes, one or more photos per marker)"
    if images is None and subjects is None:
        raise ReferenceImageError(f"connect {choices}")
    if images is not None and subjects is not None:
        raise ReferenceImageError(f"connect either {choices}, not both")
    return images if images is not None else subjects


# The people and their prompt, as Subject Encode and Face Detailer take them
CLIP_INPUT = io.Clip.Input("clip", tooltip="The CLIP from the Face-diffuser Loader.")
SUBJECT_ENCODER_INPUT = SubjectEncoderType.Input("subject_encoder", tooltip="The subject encoder from the Face-diffuser Loader.")
IMAGES_INPUT = io.Image.Input(
    "images",
    optional=True,
    tooltip=f"Reference face photos, one per {MARKER} marker, in marker order, as one IMAGE batch (photos of one size). "
    f"Crops centred on the face work best. Leave empty when subjects is connected (one {SUBJECT_NAME} node per person, "
    "chained: no batching, any sizes).",
)
PROMPT_INPUT = io.String.Input(
    "prompt",
    multiline=True,
    dynamic_prompts=True,
    default=f"a photo of a man {MARKER} walking in a park, autumn",
    tooltip=f"The prompt; put {MARKER} right after each subject's class word (man, woman, person ...), at most {MAX_SUBJECTS} subjects, within the first 75 tokens.",
)
OBJECT_RESOLUTION_INPUT = io.Int.Input(
    "object_resolution",
    default=DEFAULT_OBJECT_RESOLUTION,
    min=64,
    max=2048,
    step=8,
    tooltip="Size the padded-square reference is resized to before the 224 px encoder resize (the official default is 512; match it to your photos' face size).",
)
MASKS_INPUT = io.Mask.Input(
    "masks",
    optional=True,
    tooltip=f"Optional: a region per person, a MASK batch with one mask per {MARKER} marker in marker order (e.g. from the "
    "Face-diffuser Regions node, or painted), at the image's size. Each person's identity acts only inside its mask "
    "(overlaps are allowed). Leave empty for no regions. With subjects, give the regions here or as each Subject node's mask, not both.",
)
SUBJECTS_INPUT = SubjectsType.Input(
    "subjects",
    optional=True,
    tooltip=f"Instead of images: the people as chained {SUBJECT_NAME} nodes, one per {MARKER} marker in marker order, "
    "each with one or more photos of any size.",
)


class FaceDiffuserSubjectEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceDiffuserSubjectEncode",
            display_name=NAME,
            category=CATEGORY,
            description=f"Encodes a prompt that marks each person with {MARKER} after its class word "
            f"(\"a man {MARKER} and a woman {MARKER} at a cafe\"). The people's photos come either as images "
            f"(image i of the batch is the subject of the i-th marker) or as subjects (one {SUBJECT_NAME} node per "
            "marker, chained in marker order, each with one or more photos). Outputs the text conditioning "
            "(markers removed) and the subject conditioning (each person's face fused into its word).",
            inputs=[
                CLIP_INPUT,
                SUBJECT_ENCODER_INPUT,
                IMAGES_INPUT,
                PROMPT_INPUT,
                OBJECT_RESOLUTION_INPUT,
                SUBJECTS_INPUT,
                MASKS_INPUT,
            ],
            outputs=[
                io.Conditioning.Output("text", display_name="text", tooltip="The prompt with the markers removed: positive for the TDM and negative for the SDM."),
                io.Conditioning.Output("subject", display_name="subject", tooltip="The subject-augmented prompt: positive for the SDM."),
            ],
        )

    @classmethod
    def execute(
        cls,
        clip,
        subject_encoder: SubjectEncoderModel,
        prompt: str,
        object_resolution: int,
        images: Optional[torch.Tensor] = None,
        subjects: Optional[tuple[Subject, ...]] = None,
        masks: Optional[torch.Tensor] = None,
    ) -> io.NodeOutput:
        with errors_named(NAME):
            text, subject = encode_subjects(clip, subject_encoder, chosen_references(images, subjects), prompt, object_resolution, masks)
        return io.NodeOutput(text, subject)
