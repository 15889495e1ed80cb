"""The frontend's UI-format -> API-format conversion (graphToPrompt), for the node types our
shipped workflows use. ``WIDGETS`` lists each type's widgets in the order the frontend saves
``widgets_values``; entries starting with ``$`` are frontend-only values (the seed's
control_after_generate, LoadImage's upload button) that the API format does not carry. The
integration suite checks this table against a live ComfyUI's /object_info."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
API_WORKFLOWS = WORKFLOWS / "api"

# Node classes ComfyUI marks deprecated (DEPRECATED = True, or is_deprecated in the v3 schema; /object_info
# says "deprecated": true and the web UI badges them [DEPR]). The integration suite reads the flag from each
# host's /object_info and the browser suite from each web UI; this list keeps the check without a ComfyUI,
# for the shipped workflows (tests/test_workflows.py) and the graphs generate builds (test_comfy_client.py).
DEPRECATED_NODES = {"ImageBatch"}  # "Batch Images": deprecated in ComfyUI 0.33 (nodes.py), not in 0.3.75

WIDGETS: dict[str, list[str]] = {
    "FaceDiffuserLoader": ["sdm_name", "tdm_name", "weight_dtype"],
    "FaceDiffuserSubject": ["combine"],
    "FaceDiffuserFaceCrop": ["face_index", "margin", "size", "if_no_face"],
    "FaceDiffuserSubjectEncode": ["prompt", "object_resolution"],
    "FaceDiffuserRegions": ["width", "height", "people", "layout", "boxes", "prompt", "margin"],
    "FaceDiffuserRegionsUnion": [],
    "FaceDiffuserApplyControlNet": ["strength", "start_percent", "end_percent"],
    "ControlNetLoader": ["control_net_name"],
    "FaceDiffuserGuider": ["cfg", "start_merge", "final"],
    "FaceDiffuserSampler": ["seed", "$control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "start_merge", "final", "denoise"],
    "LoadImage": ["image", "$upload"],
    "CLIPTextEncode": ["text"],
    "EmptyLatentImage": ["width", "height", "batch_size"],
    "SaveImage": ["filename_prefix"],
    "PreviewImage": [],
    "VAEDecode": [],
    "VAEEncode": [],
    "ImageScale": ["upscale_method", "width", "height", "crop"],
    "SetLatentNoiseMask": [],
    "ImageCompositeMasked": ["x", "y", "resize_source"],
    "MaskToImage": [],
    "KSamplerSelect": ["sampler_name"],
    "BasicScheduler": ["scheduler", "steps", "denoise"],
    "RandomNoise": ["noise_seed", "$control_after_generate"],
    "SamplerCustomAdvanced": [],
    "CheckpointLoaderSimple": ["ckpt_name"],
    "LoraLoader": ["lora_name", "strength_model", "strength_clip"],
    "FastComposerGuider": ["cfg", "start_merge"],
    "FaceDiffuserFaceDetailer": [
        "prompt", "seed", "$control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise", "size", "margin",
        "feather", "if_unmatched", "if_no_face", "object_resolution", "facenet_name",
    ],  # fmt: skip
}


def widget_names_from_object_info(node_info: dict) -> list[str]:
    """What ``WIDGETS`` should say for one node type, derived from its /object_info entry."""
    names = []
    for section in ("required", "optional"):
        for name in node_info.get("input_order", {}).get(section, []):
            kind, *rest = node_info["input"][section][name]
            options = rest[0] if rest else {}
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                names.append(name)
                if options.get("control_after_generate"):
                    names.append("$control_after_generate")
                if options.get("image_upload"):
                    names.append("$upload")
    return names


# Node types the frontend keeps to itself (virtual nodes): shown on the canvas, never sent to the server.
FRONTEND_ONLY = {"Note", "MarkdownNote"}
BYPASS = 4  # a node's mode when bypassed (Ctrl+B): left out of the prompt, its inputs passed through
NEVER = 2  # muted (Ctrl+M): left out, and so is what only it feeds


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def ui_to_api(ui: dict) -> dict:
    """API-format graph (``class_type`` and ``inputs`` per node id) of a UI-format workflow: as the
    frontend's graphToPrompt, without its Note nodes and bypassed nodes; a link from a bypassed node
    comes from what feeds that node's input of the same type (the same slot first)."""
    links = {link[0]: link for link in ui["links"]}
    nodes = {node["id"]: node for node in ui["nodes"]}

    def source(link_id: int):
        _, origin, slot, _, _, kind = links[link_id]
        node = nodes[origin]
        if node.get("mode", 0) != BYPASS:
            return [str(origin), slot]
        inputs = node.get("inputs", [])
        candidates = ([inputs[slot]] if slot < len(inputs) else []) + inputs
        for socket in candidates:
            if socket["type"] == kind and socket.get("link") is not None:
                return source(socket["link"])
        return None

    api = {}
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (BYPASS, NEVER):
            continue
        names = WIDGETS[node["type"]]
        values = node.get("widgets_values", [])
        if len(values) != len(names):
            raise ValueError(f"node {node['id']} ({node['type']}) has {len(values)} widget values, expected {len(names)}: {names}")
        inputs = {name: value for name, value in zip(names, values) if not name.startswith("$")}
        for socket in node.get("inputs", []):
            if socket.get("link") is not None and (origin := source(socket["link"])) is not None:
                inputs[socket["name"]] = origin
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def workflow_pairs() -> list[tuple[Path, Path]]:
    return [(path, API_WORKFLOWS / path.name) for path in sorted(WORKFLOWS.glob("*.json"))]
