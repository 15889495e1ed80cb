"""Face-diffuser for ComfyUI: put the people of reference face photos into any scene a prompt describes."""

from .nodes import comfy_entrypoint

# web/docs/<NodeId>.md: the pages ComfyUI's node help panel shows for our nodes.
WEB_DIRECTORY = "./web"

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
