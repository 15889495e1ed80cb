"""Identity Preservation (IP): FaceNet similarity between reference and generated faces.

FastComposer's protocol, which the Face-diffuser paper reports: MTCNN (:mod:`.faces`) finds the faces,
largest first, and crops each box to 160x160 (fixed standardisation); FaceNet (InceptionResnetV1,
VGGFace2 weights) embeds each crop as a unit 512-vector; similarity is the dot product (cosine).
A reference is the largest face of its photo. A generated image contributes its R largest faces for
R references; they are matched greedily (take the most similar remaining face-reference pair, strike
both, repeat). A reference left without a face scores 0. The image's IP is max(min over references, 0).
With several references, each matched face's separation is its similarity to its own person minus
its highest similarity to any other person: how well the identities stay apart (0 or below: blended).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import CheckpointError, FaceNotFoundError
from ..weights.checkpoints import read_state_dict
from ..weights.model_folders import FACENET_WEIGHTS
from .detection import CHOSEN, MIN_FACE_SIZE, Face, detect, draw_boxes, import_facenet

__all__ = [
    "FACENET_WEIGHTS",
    "FACENET_URL",
    "Match",
    "IdentityScore",
    "load_facenet",
    "face_tensors",
    "embed_faces",
    "cosine_matrix",
    "greedy_match",
    "reference_embeddings",
    "score_identity",
    "annotate_identity",
]

FACENET_URL = "https://github.com/timesler/facenet-pytorch/releases"
UNUSED = (160, 160, 160)  # box colour of detected faces that no reference was matched to


@dataclass(frozen=True)
class Match:
    """Reference ``reference`` matched to generated face ``face`` (an index into the image's faces,
    largest first) with cosine ``similarity``; ``face`` is None (similarity 0) when none was left.
    ``other``: that face's highest similarity to any other reference (None without a face, or with
    one reference)."""

    reference: int
    face: Optional[int]
    similarity: float
    other: Optional[float] = None

    @property
    def separation(self) -> Optional[float]:
        """``similarity - other``: the face's own person against the best other one (None without ``other``)."""
        return None if self.other is None else self.similarity - self.other


@dataclass(frozen=True)
class IdentityScore:
    """One generated image: a match per reference (in reference order) and every detected face."""

    matches: tuple[Match, ...]
    faces: tuple[Face, ...]

    @property
    def score(self) -> float:
        """The image's IP: max(min over references of the matched similarity, 0)."""
        return max(min(match.similarity for match in self.matches), 0.0)

    def describe(self) -> str:
        parts = [
            f"ref {m.reference + 1}: {m.similarity:.3f} (face {m.face + 1})" if m.face is not None else f"ref {m.reference + 1}: no face"
            for m in self.matches
        ]
        return f"IP {self.score:.3f} [{', '.join(parts)}; {len(self.faces)} face(s) found]"


def load_facenet(path: Union[str, Path]) -> torch.nn.Module:
    """FaceNet InceptionResnetV1 in eval mode, returning unit 512-d embeddings, on the CPU.

    ``path``: a state dict file (``.pt``/``.pth`` read with ``torch.load(weights_only=True)``, or
    ``.safetensors``) such as facenet-pytorch's ``20180402-114759-vggface2.pt``; its ``logits.*``
    classifier (if present) is loaded too, so every tensor is checked, but not used.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such FaceNet file; download {FACENET_WEIGHTS} from {FACENET_URL}")
    state = read_state_dict(path)
    logits = state.get("logits.weight")
    model = import_facenet().InceptionResnetV1(
        pretrained=None, classify=logits is not None, num_classes=None if logits is None else logits.shape[0]
    )
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} is not a FaceNet InceptionResnetV1 state dict ({len(missing)} tensors missing, e.g. "
            f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}); use {FACENET_WEIGHTS} from {FACENET_URL}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:  # shape mismatches
        detail = str(error).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{path} does not fit FaceNet InceptionResnetV1 ({detail}); use {FACENET_WEIGHTS} from {FACENET_URL}") from None
    model.classify = False  # embeddings, not class logits
    return model.eval()


def face_tensors(detector: torch.nn.Module, image: Image.Image, faces: Sequence[Face]) -> torch.Tensor:
    """MTCNN's FaceNet input for ``faces`` of ``image``: [K,3,160,160], (pixel - 127.5) / 128."""
    if not faces:
        return torch.zeros(0, 3, detector.image_size, detector.image_size)
    return detector.extract(image, np.array([face.box for face in faces], dtype=np.float32), None)


@torch.no_grad()
def embed_faces(facenet: torch.nn.Module, faces: torch.Tensor) -> torch.Tensor:
    """[K,3,160,160] face tensors -> [K,512] float32 unit embeddings (on the CPU)."""
    param = next(facenet.parameters())
    if faces.shape[0] == 0:
        return torch.zeros(0, facenet.last_linear.out_features)
    return facenet(faces.to(device=param.device, dtype=param.dtype)).float().cpu()


def cosine_matrix(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """[G,D] x [R,D] -> [G,R] cosine similarities."""
    return F.normalize(generated.float(), dim=-1) @ F.normalize(references.float(), dim=-1).T


def greedy_match(similarity: torch.Tensor) -> tuple[Match, ...]:
    """Greedy matching of a [faces, references] similarity matrix: repeatedly take the largest
    remaining entry and strike its row and column. Returns one :class:`Match` per reference, with the
    matched face's best similarity to the other references."""
    faces, references = similarity.shape
    remaining = similarity.detach().double().cpu().clone()
    found: dict[int, Match] = {}
    for _ in range(min(faces, references)):
        face, reference = divmod(int(torch.argmax(remaining)), references)
        others = [float(similarity[face, r]) for r in range(references) if r != reference]
        found[reference] = Match(reference, face, float(similarity[face, reference]), max(others) if others else None)
        remaining[face, :] = -torch.inf
        remaining[:, reference] = -torch.inf
    return tuple(found.get(r, Match(r, None, 0.0)) for r in range(references))


def reference_embeddings(facenet: torch.nn.Module, detector: torch.nn.Module, photos: Sequence[Image.Image]) -> torch.Tensor:
    """[R,512]: the embedding of the largest face of each reference photo."""
    crops = []
    for index, photo in enumerate(photos):
        faces = detect(detector, photo)
        if not faces:
            raise FaceNotFoundError(
                f"no face was found in reference image {index + 1} of {len(photos)}; give a photo where the "
                f"face is visible and at least {MIN_FACE_SIZE} px tall"
            )
        crops.append(face_tensors(detector, photo, faces[:1]))
    return embed_faces(facenet, torch.cat(crops))


def score_identity(facenet: torch.nn.Module, detector: torch.nn.Module, references: torch.Tensor, image: Image.Image) -> IdentityScore:
    """IP of one generated RGB image against [R,512] reference embeddings."""
    faces = detect(detector, image)
    used = faces[: references.shape[0]]
    similarity = cosine_matrix(embed_faces(facenet, face_tensors(detector, image, used)), references)
    return IdentityScore(greedy_match(similarity), tuple(faces))


def annotate_identity(image: Image.Image, score: IdentityScore) -> Image.Image:
    """The image with each matched face boxed in green with its reference and similarity, and every
    other detected face boxed in grey."""
    matched = {m.face: m for m in score.matches if m.face is not None}
    labels = []
    for index, face in enumerate(score.faces):
        match = matched.get(index)
        if match is None:
            labels.append((face.box, "", UNUSED))
        else:
            labels.append((face.box, f"ref {match.reference + 1}: {match.similarity:.2f}", CHOSEN))
    return draw_boxes(image, labels)
