"""The Face-diffuser ComfyUI nodes (V3 schema); thin adapters over ``facediffuser_core``."""

from __future__ import annotations

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .common import register_model_folder
from .encode import FaceDiffuserSubjectEncode
from .guider import FaceDiffuserGuider
from .loader import FaceDiffuserLoader
from .sampler import FaceDiffuserSampler

register_model_folder()


class FaceDiffuserExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [FaceDiffuserLoader, FaceDiffuserSubjectEncode, FaceDiffuserGuider, FaceDiffuserSampler]


async def comfy_entrypoint() -> FaceDiffuserExtension:
    return FaceDiffuserExtension()
