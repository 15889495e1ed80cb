"""Face-diffuser Face Crop: whole photos -> square face crops for the subject encoder."""

from __future__ import annotations

import comfy.model_management as mm
import torch
from comfy_api.latest import io

from ..facediffuser_core.faces.detection import DEFAULT_CROP_SIZE, DEFAULT_MARGIN, IF_NO_FACE, crop_faces, crop_preview, detect_faces, load_detector, to_pil_images
from .common import CATEGORY, errors_named, progress

NAME = "Face-diffuser Face Crop"


def face_crop(images: torch.Tensor, face_index: int, margin: float, size: int, if_no_face: str):
    """Returns ``(crops [N,size,size,3], face masks [N,H,W], preview [N,H,W,3])``."""
    photos = to_pil_images(images, "images")
    faces = detect_faces(load_detector(str(mm.get_torch_device())), photos, progress(len(photos)))
    crops = crop_faces(images, faces, face_index, margin, size, if_no_face)
    return crops.crops, crops.masks, crop_preview(photos, faces, crops.chosen)


class FaceDiffuserFaceCrop(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceDiffuserFaceCrop",
            display_name=NAME,
            category=CATEGORY,
            description="Finds the faces in whole photos (MTCNN, the detector of the paper's evaluation) and crops "
            "one face per photo to a square with a margin around it, ready for Face-diffuser Subject Encode. "
            "A photo without the face is an error unless if_no_face passes it through uncropped.",
            inputs=[
                io.Image.Input("images", tooltip="Reference photos (a batch): one face is cropped from each."),
                io.Int.Input("face_index", default=0, min=0, max=63, tooltip="Which face to crop when a photo shows several: 0 = the largest, 1 = the second largest, ..."),
                io.Float.Input(
                    "margin",
                    default=DEFAULT_MARGIN,
                    min=0.0,
                    max=4.0,
                    step=0.05,
                    tooltip="Space around the face box on every side, as a fraction of its longer side: 0.5 makes the square twice the face box (head and some hair). Parts past the photo's edge are black.",
                ),
                io.Int.Input("size", default=DEFAULT_CROP_SIZE, min=64, max=2048, step=8, tooltip="Side of the square crops in pixels (the subject encoder resizes them anyway; 512 matches its object_resolution)."),
                io.Combo.Input("if_no_face", options=list(IF_NO_FACE), default=IF_NO_FACE[0], tooltip="A photo without the face: 'error' stops with a message naming the photo; 'pass through' uses the whole photo, padded to a square, and gives it an empty mask."),
            ],
            outputs=[
                io.Image.Output("crops", display_name="crops", tooltip="One square face crop per photo, size x size; connect to Subject Encode's images."),
                io.Mask.Output("face_mask", display_name="face_mask", tooltip="Per photo, 1 inside the box of the face that was cropped (photo size); all 0 for a photo passed through."),
                io.Image.Output("preview", display_name="preview", tooltip="The photos with every detected face boxed and its detection confidence; the cropped face in green."),
            ],
        )

    @classmethod
    def execute(cls, images: torch.Tensor, face_index: int, margin: float, size: int, if_no_face: str) -> io.NodeOutput:
        with errors_named(NAME):
            return io.NodeOutput(*face_crop(images, face_index, margin, size, if_no_face))
