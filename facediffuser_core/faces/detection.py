"""Face detection and square face crops.

The detector is facenet-pytorch's MTCNN with the settings of FastComposer's evaluation (the protocol
Face-diffuser reports). Its weights ship inside the package, so nothing is downloaded; the package is
imported only when a detector is first needed.

Images are ComfyUI IMAGE tensors [N,H,W,C] float 0..1 (C = 1..4, alpha dropped) or 8-bit RGB PIL
images. Boxes are ``(x1, y1, x2, y2)`` in pixel coordinates of their image, as MTCNN reports them
(continuous: pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)``); they may reach past the image border.
"""

from __future__ import annotations

import functools
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Literal, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from ..errors import FaceDiffuserError, FaceNotFoundError, MissingDependencyError
from ..method.preprocess import pad_to_square, resize_square, to_rgb

__all__ = [
    "FACENET_PACKAGE",
    "facenet_install_hint",
    "DEFAULT_MARGIN",
    "DEFAULT_CROP_SIZE",
    "IF_NO_FACE",
    "Box",
    "Progress",
    "Face",
    "CropSquare",
    "FaceCrops",
    "import_facenet",
    "load_detector",
    "to_pil_images",
    "detect",
    "detect_faces",
    "crop_square",
    "cut_square",
    "box_mask",
    "crop_faces",
    "open_photo",
    "reference_png",
    "png_bytes",
    "draw_boxes",
    "pil_to_image",
    "crop_preview",
]

FACENET_PACKAGE = ("-m", "pip", "install", "--no-deps", "facenet-pytorch")  # run by ComfyUI's Python: --no-deps keeps its torch
MIN_FACE_SIZE = 20  # pixels: MTCNN finds no smaller faces
DEFAULT_MARGIN = 0.5
DEFAULT_CROP_SIZE = 512
IF_NO_FACE = ("error", "pass through")  # what to do with a picture without the face
IfNoFace = Literal["error", "pass through"]

Box = tuple[float, float, float, float]
Progress = Callable[[int, int], None]
"""``progress(done, total)``, called after each image; may raise to cancel (ComfyUI's interrupt)."""

CHOSEN, OTHER = (0, 255, 0), (255, 215, 0)  # box colours in previews: green for the face used


def _detector_settings() -> dict:
    """FastComposer's evaluation MTCNN: every face (largest first), 160 px FaceNet crops."""
    return dict(image_size=160, margin=0, min_face_size=MIN_FACE_SIZE, thresholds=[0.6, 0.7, 0.7], factor=0.709, post_process=True, keep_all=True)


@dataclass(frozen=True)
class Face:
    """One detection: its box and MTCNN's confidence (0..1)."""

    box: Box
    confidence: float


@dataclass(frozen=True)
class CropSquare:
    """A square of whole pixels: columns ``left .. left+size-1``, rows ``top .. top+size-1``."""

    left: int
    top: int
    size: int


@dataclass(frozen=True)
class FaceCrops:
    """``crops`` [N,S,S,3] (0..1); ``masks`` [N,H,W] (1 inside the face box used, all 0 for an image
    passed through); ``chosen``: per image the face cropped, None where the image was passed through."""

    crops: torch.Tensor
    masks: torch.Tensor
    chosen: tuple[Optional[Face], ...]


def facenet_install_hint(python: str = sys.executable, platform: str = sys.platform) -> str:
    """How to install facenet-pytorch into ``python`` (the interpreter running now: ComfyUI's, e.g.
    ``python_embeded\\python.exe`` of the Windows portable build or the desktop app's, where a bare
    ``pip`` would install into another Python): the pip command and the pack's ``install.py``, each
    quoted for ``platform``'s shell."""
    from ..weights.model_folders import PACK, quote_command  # PACK read at call time (tests move it)

    pip = quote_command([python, *FACENET_PACKAGE], platform)
    script = quote_command([python, str(PACK / "install.py")], platform)
    return (
        f"install it into the Python that runs ComfyUI with `{pip}` (or run the pack's install.py with that Python: "
        f"`{script}`), then restart ComfyUI (--no-deps keeps your torch; its detector weights ship inside the package)"
    )


def import_facenet() -> ModuleType:
    """The facenet_pytorch package, or a :class:`MissingDependencyError` saying how to install it."""
    try:
        import facenet_pytorch
    except ImportError as error:
        raise MissingDependencyError(
            f"face detection and identity scores need facenet-pytorch, which cannot be imported ({error}); {facenet_install_hint()}"
        ) from None
    return facenet_pytorch


@functools.lru_cache(maxsize=None)
def load_detector(device: str = "cpu") -> torch.nn.Module:
    """FastComposer's evaluation MTCNN on ``device`` (built once per device)."""
    return import_facenet().MTCNN(**_detector_settings(), device=torch.device(device)).eval()


def to_pil_images(images: torch.Tensor, name: str = "images") -> list[Image.Image]:
    """IMAGE [N,H,W,C] -> 8-bit RGB PIL images, rounded down as ComfyUI's SaveImage writes PNGs."""
    pixels = (to_rgb(images, name).permute(0, 2, 3, 1) * 255).to(torch.uint8).cpu().numpy()
    return [Image.fromarray(array, "RGB") for array in pixels]


def detect(detector: torch.nn.Module, image: Image.Image) -> list[Face]:
    """Every face MTCNN finds in an RGB PIL image, largest box first."""
    boxes, probabilities = detector.detect(image)
    if boxes is None:
        return []
    return [Face(tuple(float(v) for v in box), float(p)) for box, p in zip(boxes, probabilities)]


def detect_faces(detector: torch.nn.Module, images: Sequence[Image.Image], progress: Optional[Progress] = None) -> list[list[Face]]:
    """:func:`detect` for each image."""
    found = []
    for index, image in enumerate(images):
        found.append(detect(detector, image))
        if progress is not None:
            progress(index + 1, len(images))
    return found


def crop_square(box: Box, margin: float = DEFAULT_MARGIN) -> CropSquare:
    """The square centred on ``box`` whose side is the box's longer side plus ``margin`` times it on
    every side (side = longer * (1 + 2 * margin)), in whole pixels; it may reach past the image."""
    if margin < 0:
        raise FaceDiffuserError(f"margin must be >= 0 (a fraction of the face box added on each side), got {margin}")
    x1, y1, x2, y2 = box
    size = max(1, round(max(x2 - x1, y2 - y1) * (1 + 2 * margin)))
    return CropSquare(round((x1 + x2 - size) / 2), round((y1 + y2 - size) / 2), size)


def cut_square(image: torch.Tensor, square: CropSquare) -> torch.Tensor:
    """[C,H,W] -> [C,S,S]: the square's pixels, zero where it lies outside the image."""
    _, height, width = image.shape
    out = image.new_zeros(image.shape[0], square.size, square.size)
    x0, y0 = max(square.left, 0), max(square.top, 0)
    x1, y1 = min(square.left + square.size, width), min(square.top + square.size, height)
    if x1 > x0 and y1 > y0:
        out[:, y0 - square.top : y1 - square.top, x0 - square.left : x1 - square.left] = image[:, y0:y1, x0:x1]
    return out


def box_mask(box: Box, height: int, width: int) -> torch.Tensor:
    """[H,W] float: 1 at the pixels whose centre lies inside ``box``, 0 elsewhere."""
    x1, y1, x2, y2 = box
    columns = torch.arange(width, dtype=torch.float64) + 0.5
    rows = torch.arange(height, dtype=torch.float64) + 0.5
    inside_x = (columns >= x1) & (columns <= x2)
    inside_y = (rows >= y1) & (rows <= y2)
    return (inside_y[:, None] & inside_x[None, :]).float()


def _missing_face(index: int, count: int, found: int, face_index: int) -> FaceNotFoundError:
    where = f"image {index + 1} of {count} (batch index {index})"
    if found == 0:
        problem = f"no face was found in {where}"
    else:
        problem = f"{where} has {found} face(s) but face_index {face_index} asks for face {face_index + 1}"
    return FaceNotFoundError(
        f"{problem}; use a photo where the face is visible and at least {MIN_FACE_SIZE} px tall, "
        "or set if_no_face to 'pass through' to use it uncropped"
    )


def crop_faces(
    images: torch.Tensor,
    faces: Sequence[Sequence[Face]],
    face_index: int = 0,
    margin: float = DEFAULT_MARGIN,
    size: int = DEFAULT_CROP_SIZE,
    if_no_face: IfNoFace = "error",
) -> FaceCrops:
    """Square crops of face ``face_index`` (0 = largest) of each image, resized to ``size``.

    ``faces``: the detections of each image (:func:`detect_faces`). Where the square reaches past the
    image it is zero-padded. An image without that face raises :class:`FaceNotFoundError` naming it,
    or with ``if_no_face="pass through"`` is zero-padded to a centred square and resized whole.
    """
    pixels = to_rgb(images, "images")
    count, _, height, width = pixels.shape
    if len(faces) != count:
        raise ValueError(f"got detections for {len(faces)} images but {count} images")
    if face_index < 0:
        raise FaceDiffuserError(f"face_index must be >= 0 (0 = the largest face), got {face_index}")
    crops, masks, chosen = [], [], []
    for index, (image, found) in enumerate(zip(pixels, faces)):
        if face_index < len(found):
            face = found[face_index]
            crops.append(cut_square(image, crop_square(face.box, margin)))
            masks.append(box_mask(face.box, height, width))
            chosen.append(face)
        elif if_no_face == "pass through":
            crops.append(pad_to_square(image[None])[0])
            masks.append(torch.zeros(height, width))
            chosen.append(None)
        else:
            raise _missing_face(index, count, len(found), face_index)
    resized = torch.cat([resize_square(crop[None], size) for crop in crops]).clamp(0, 1)  # as the subject encoder resizes
    return FaceCrops(resized.permute(0, 2, 3, 1).contiguous(), torch.stack(masks), tuple(chosen))


def open_photo(path: Path) -> Image.Image:
    """A photo file as an RGB PIL image, turned upright by its EXIF orientation as ComfyUI's LoadImage does."""
    with Image.open(path) as opened:
        return ImageOps.exif_transpose(opened).convert("RGB")


def reference_png(path: Path, detector: Optional[torch.nn.Module], margin: Optional[float] = DEFAULT_MARGIN, size: int = DEFAULT_CROP_SIZE) -> bytes:
    """A photo file as a square ``size`` px PNG reference for Subject Encode: its largest face cropped
    with ``margin`` as Face Crop does, or (``margin`` None, no detector needed) the whole photo
    zero-padded to a centred square. EXIF rotation is applied first, as ComfyUI's LoadImage does.
    A photo without a face raises :class:`FaceNotFoundError` naming the file."""
    photo = open_photo(path)
    faces = [] if margin is None else detect(detector, photo)
    if margin is not None and not faces:
        raise FaceNotFoundError(f"no face was found in {path} (faces must be visible and at least {MIN_FACE_SIZE} px tall)")
    crops = crop_faces(pil_to_image([photo]), [faces], margin=margin or 0.0, size=size, if_no_face="pass through")
    return png_bytes(to_pil_images(crops.crops)[0])


def png_bytes(image: Image.Image) -> bytes:
    """``image`` encoded as a PNG file, for upload."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def draw_boxes(image: Image.Image, labels: Sequence[tuple[Box, str, tuple[int, int, int]]]) -> Image.Image:
    """A copy of ``image`` with each ``(box, text, rgb colour)`` drawn: the box, and its text above it."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    short = min(out.size)
    line = max(2, round(short / 200))
    text_size = max(12, round(short / 28))
    font = ImageFont.load_default(size=text_size)
    for (x1, y1, x2, y2), text, colour in labels:
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        if text:
            top = y1 - text_size - 2 * line if y1 - text_size - 2 * line >= 0 else y2 + line
            draw.text((x1, top), text, fill=colour, font=font, stroke_width=max(1, line // 2), stroke_fill=(0, 0, 0))
    return out


def pil_to_image(images: Sequence[Image.Image]) -> torch.Tensor:
    """RGB PIL images of one size -> IMAGE [N,H,W,3] float 0..1."""
    return torch.from_numpy(np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images]))


def crop_preview(images: Sequence[Image.Image], faces: Sequence[Sequence[Face]], chosen: Sequence[Optional[Face]]) -> torch.Tensor:
    """IMAGE [N,H,W,3]: each image with every detected box and its confidence; the face used in green."""
    drawn = []
    for image, found, used in zip(images, faces, chosen):
        labels = [(face.box, f"{face.confidence:.3f}", CHOSEN if face is used else OTHER) for face in found]
        drawn.append(draw_boxes(image, labels))
    return pil_to_image(drawn)
