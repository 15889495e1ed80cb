"""Face-diffuser for ComfyUI: put the people of reference face photos into any scene a prompt describes."""

from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
