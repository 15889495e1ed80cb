"""The Face-diffuser ComfyUI nodes (V3 schema); thin adapters over ``facediffuser_core``."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from .common import add_example_inputs, register_model_folder
from .controlnet import FaceDiffuserApplyControlNet
from .detailer import FaceDiffuserFaceDetailer
from .encode import FaceDiffuserSubjectEncode
from .faces import FaceDiffuserFaceCrop
from .fastcomposer import FastComposerGuider
from .guider import FaceDiffuserGuider
from .loader import FaceDiffuserLoader
from .regions import FaceDiffuserRegions, FaceDiffuserRegionsUnion
from .sampler import FaceDiffuserSampler
from .scores import CLIP_EVAL_EXTENSIONS, CLIP_EVAL_FOLDER, FACENET_FOLDER, FaceDiffuserIdentityScore, FaceDiffuserPromptConsistency
from .subject import FaceDiffuserSubject

register_model_folder()
register_model_folder(FACENET_FOLDER)
register_model_folder(CLIP_EVAL_FOLDER, CLIP_EVAL_EXTENSIONS)
add_example_inputs()  # the templates' Load Image nodes find face_1.png, face_2.png, the pose and the park there


class FaceDiffuserExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [
            FaceDiffuserLoader,
            FaceDiffuserSubject,
            FaceDiffuserSubjectEncode,
            FaceDiffuserRegions,
            FaceDiffuserRegionsUnion,
            FaceDiffuserGuider,
            FaceDiffuserSampler,
            FastComposerGuider,
            FaceDiffuserFaceCrop,
            FaceDiffuserFaceDetailer,
            FaceDiffuserIdentityScore,
            FaceDiffuserPromptConsistency,
            FaceDiffuserApplyControlNet,
        ]


async def comfy_entrypoint() -> FaceDiffuserExtension:
    return FaceDiffuserExtension()
