"""Face detailer: each face of a picture re-rendered with its own person's subject conditioning.

Faces come from the pack's MTCNN (:mod:`.faces`). Each face goes to one person (one ``<|image|>``
marker) by identity, not position: the cosine similarity of its embedding to that person's reference
photos, one face per person, best total similarity (Hungarian assignment). A face's working square is
:func:`~facediffuser_core.faces.detection.crop_square` of its box with ``margin``; its pixels (black past the
picture's edge) are resized to ``size``, re-rendered by a ``render`` callable (the SDM sampling, in
the ComfyUI node), resized back and blended in with a mask that is 1 in the middle of the square and
falls linearly to 0 over its outer ``feather`` fraction. Pixels outside every rendered square keep
their input values bit for bit.

Pictures are ComfyUI IMAGE tensors [N,H,W,C] float 0..1 (alpha dropped); masks are [H,W] float 0..1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence

import torch
from PIL import Image

from ..errors import FaceDiffuserError, FaceNotFoundError
from ..method.preprocess import resize_square, to_rgb
from ..method.prompt import MARKER
from .detection import CHOSEN, IF_NO_FACE, MIN_FACE_SIZE, CropSquare, Face, IfNoFace, crop_square, cut_square, draw_boxes, pil_to_image
from .identity import UNUSED, cosine_matrix

__all__ = [
    "IF_UNMATCHED",
    "DEFAULT_DENOISE",
    "DEFAULT_FEATHER",
    "DEFAULT_SIZE",
    "MATCH_BY_SUBJECT_ENCODER",
    "Placement",
    "Render",
    "person_prompt",
    "cosine_to_people",
    "assign_people",
    "place_faces",
    "feather_mask",
    "face_crop",
    "paste_face",
    "detail_picture",
    "detail_pictures",
    "check_faces_found",
    "detail_preview",
]

IF_UNMATCHED = ("leave it", "text only")
IfUnmatched = Literal["leave it", "text only"]
DEFAULT_DENOISE = 0.45
DEFAULT_FEATHER = 0.15
DEFAULT_SIZE = 512
MATCH_BY_SUBJECT_ENCODER = "none (the subject encoder)"  # the Face Detailer's facenet_name for no FaceNet


@dataclass(frozen=True)
class Placement:
    """One detected face of a picture: its ``person`` (marker index, 0 = the first marker; None =
    matched nobody), its cosine ``similarity`` to that person (to the most similar person when
    unmatched), its working ``square``, whether it is ``rendered`` and its ``seed``."""

    face: Face
    person: Optional[int]
    similarity: float
    square: CropSquare
    rendered: bool
    seed: int


Render = Callable[[torch.Tensor, Placement], torch.Tensor]
"""``render(crop [1,size,size,3], placement) -> [1,size,size,3]`` (0..1): the re-rendered crop."""


def person_prompt(word: str) -> str:
    """The prompt a person's face is re-rendered with: its class word and marker alone."""
    return f"a photo of a {word} {MARKER}"


def cosine_to_people(faces: torch.Tensor, people: Sequence[torch.Tensor]) -> torch.Tensor:
    """[F,D] face embeddings, P people's [N_p,D] reference embeddings -> [F,P] float64: each face's
    mean cosine similarity (:func:`~facediffuser_core.faces.identity.cosine_matrix`) to a person's photos."""
    return torch.stack([cosine_matrix(faces, photos).double().mean(dim=1) for photos in people], dim=1)


def assign_people(similarity: torch.Tensor) -> tuple[Optional[int], ...]:
    """[F,P] similarities -> each face's person (None for faces left over): min(F, P) face-person
    pairs, each face and person used once, with the largest total similarity."""
    from scipy.optimize import linear_sum_assignment  # ComfyUI requires scipy; imported when used

    people: list[Optional[int]] = [None] * similarity.shape[0]
    if similarity.numel():
        rows, columns = linear_sum_assignment(similarity.detach().double().cpu().numpy(), maximize=True)
        for face, person in zip(rows.tolist(), columns.tolist()):
            people[face] = person
    return tuple(people)


def place_faces(faces: Sequence[Face], similarity: torch.Tensor, margin: float, if_unmatched: IfUnmatched, seed: int) -> tuple[Placement, ...]:
    """The :class:`Placement` of each of a picture's ``faces`` (largest first) given their [F,P]
    ``similarity`` to the people. Face k gets seed ``seed + k``; an unmatched face is rendered only
    with ``if_unmatched="text only"``."""
    if if_unmatched not in IF_UNMATCHED:
        raise FaceDiffuserError(f"if_unmatched must be one of {', '.join(IF_UNMATCHED)}, got '{if_unmatched}'")
    if similarity.shape[0] != len(faces):
        raise ValueError(f"{similarity.shape[0]} similarity rows for {len(faces)} faces")
    placements = []
    for index, (face, person) in enumerate(zip(faces, assign_people(similarity))):
        row = similarity[index]
        score = float(row[person]) if person is not None else float(row.max())
        rendered = person is not None or if_unmatched == "text only"
        placements.append(Placement(face, person, score, crop_square(face.box, margin), rendered, seed + index))
    return tuple(placements)


def feather_mask(square: CropSquare, height: int, width: int, feather: float) -> torch.Tensor:
    """[H,W] float32: 0 outside ``square``; inside, min(1, d / (feather * side)) where d is the
    distance in pixels from a pixel's centre to the square's nearest edge (1 everywhere inside when
    ``feather`` is 0). Every pixel of the square is > 0."""
    if not 0 <= feather <= 0.5:
        raise FaceDiffuserError(f"feather must be in 0..0.5 (a fraction of the face square's side), got {feather}")
    ramp = feather * square.size

    def along(count: int, start: int) -> torch.Tensor:
        centres = torch.arange(count, dtype=torch.float64) + 0.5
        distance = torch.minimum(centres - start, start + square.size - centres)
        inside = distance > 0
        weight = (distance / ramp).clamp(max=1.0) if ramp > 0 else torch.ones_like(distance)
        return torch.where(inside, weight, torch.zeros_like(weight))

    return torch.minimum(along(height, square.top)[:, None], along(width, square.left)[None, :]).float()


def face_crop(picture: torch.Tensor, square: CropSquare, size: int) -> torch.Tensor:
    """[3,H,W] picture -> [1,size,size,3]: the square's pixels (0 past the edge) resized to ``size``
    (bilinear, antialiased)."""
    return resize_square(cut_square(picture, square)[None], size).clamp(0, 1).permute(0, 2, 3, 1)


def paste_face(picture: torch.Tensor, rendered: torch.Tensor, square: CropSquare, mask: torch.Tensor) -> torch.Tensor:
    """[3,H,W] picture with ``rendered`` [1,s,s,3] resized to the square's side and blended in:
    picture * (1 - mask) + rendered * mask where ``mask`` [H,W] > 0; every other pixel is the
    picture's, bit for bit. Returns a new tensor."""
    _, height, width = picture.shape
    back = resize_square(rendered.permute(0, 3, 1, 2).to(picture), square.size)[0].clamp(0, 1)
    canvas = picture.new_zeros(3, height, width)
    x0, y0 = max(square.left, 0), max(square.top, 0)
    x1, y1 = min(square.left + square.size, width), min(square.top + square.size, height)
    if x1 > x0 and y1 > y0:
        canvas[:, y0:y1, x0:x1] = back[:, y0 - square.top : y1 - square.top, x0 - square.left : x1 - square.left]
    weight = mask.to(picture)
    return torch.where(weight > 0, picture * (1 - weight) + canvas * weight, picture)


def detail_picture(picture: torch.Tensor, placements: Sequence[Placement], render: Optional[Render], size: int, feather: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One picture [H,W,C] (0..1) -> (detailed [H,W,3], mask [H,W] of what was re-rendered): each
    rendered placement in order (a later face's square over an earlier one's where they overlap).
    ``render`` is called only for rendered placements (None when there are none)."""
    if size < 8 or size % 8:
        raise FaceDiffuserError(f"size must be a positive multiple of 8 (the VAE's pixel grid), got {size}")
    pixels = to_rgb(picture, "image")[0]
    _, height, width = pixels.shape
    covered = torch.zeros(height, width)
    for placement in placements:
        if not placement.rendered:
            continue
        crop = face_crop(pixels, placement.square, size)
        mask = feather_mask(placement.square, height, width, feather)
        pixels = paste_face(pixels, render(crop, placement), placement.square, mask)
        covered = torch.maximum(covered, mask)
    return pixels.permute(1, 2, 0), covered


def detail_pictures(pictures: torch.Tensor, placements: Sequence[Sequence[Placement]], render: Optional[Render], size: int, feather: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`detail_picture` for each picture of [N,H,W,C] -> ([N,H,W,3], masks [N,H,W])."""
    if len(placements) != pictures.shape[0]:
        raise ValueError(f"placements for {len(placements)} pictures but {pictures.shape[0]} pictures")
    done = [detail_picture(picture, placed, render, size, feather) for picture, placed in zip(pictures, placements)]
    return torch.stack([image for image, _ in done]), torch.stack([mask for _, mask in done])


def check_faces_found(faces: Sequence[Sequence[Face]], if_no_face: IfNoFace) -> None:
    """A picture without a face is an error unless ``if_no_face`` is "pass through"."""
    if if_no_face not in IF_NO_FACE:
        raise FaceDiffuserError(f"if_no_face must be one of {', '.join(IF_NO_FACE)}, got '{if_no_face}'")
    for index, found in enumerate(faces):
        if not found and if_no_face == "error":
            raise FaceNotFoundError(
                f"no face was found in picture {index + 1} of {len(faces)} (batch index {index}); faces must be visible "
                f"and at least {MIN_FACE_SIZE} px tall, or set if_no_face to 'pass through' to return such a picture unchanged"
            )


def detail_preview(pictures: Sequence[Image.Image], placements: Sequence[Sequence[Placement]], words: Sequence[str]) -> torch.Tensor:
    """IMAGE [N,H,W,3]: each picture with its faces boxed, labelled with the person's marker number
    and word and the similarity; rendered faces in green, others in grey."""
    drawn = []
    for picture, placed in zip(pictures, placements):
        labels = []
        for p in placed:
            who = f"{p.person + 1} {words[p.person]}" if p.person is not None else "nobody"
            labels.append((p.face.box, f"{who}: {p.similarity:.2f}", CHOSEN if p.rendered else UNUSED))
        drawn.append(draw_boxes(picture, labels))
    return pil_to_image(drawn)
