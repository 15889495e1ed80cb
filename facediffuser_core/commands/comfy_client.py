"""The ComfyUI job machinery the ``generate`` and ``evaluate`` commands share (standard library only,
no ComfyUI import: it talks to a server over HTTP and its websocket).

- :class:`Generation` and :func:`build_graph`: the Face-diffuser API workflow for 1 to 4 subjects,
  built in code; :func:`fill_template` puts a generation into a hand-made API workflow instead.
- :class:`ComfyClient`: ``POST /upload/image`` for the face photos, ``POST /prompt`` to queue a graph,
  the ``/ws`` event stream for progress until the job has finished, ``GET /history/<id>`` for its
  outputs and ``GET /view`` for the saved images. Rejected workflows and failed nodes become one
  readable :class:`JobError` naming the node.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re
import socket
import ssl
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

from ..errors import FaceDiffuserError
from ..faces.detailer import DEFAULT_FEATHER, DEFAULT_SIZE, MATCH_BY_SUBJECT_ENCODER
from ..faces.detection import DEFAULT_MARGIN
from ..method.prompt import MARKER, MAX_SUBJECTS
from ..method.regions import Box, format_boxes
from ..method.schedule import FINAL_FRACTION, OFFICIAL_GUIDANCE, OFFICIAL_STEPS, START_MERGE_FRACTION
from ..method.subjects import DEFAULT_COMBINE
from ..weights.model_folders import MODEL_FOLDER

__all__ = [
    "DEFAULT_SDM",
    "DEFAULT_TDM",
    "DEFAULT_CONTROLNET",
    "JobError",
    "ServerUnavailable",
    "Generation",
    "JobGraph",
    "build_graph",
    "fill_template",
    "WebSocket",
    "ComfyClient",
]

DEFAULT_SDM = "facediffuser_sdm.safetensors"  # the names the README tells users to give the models
DEFAULT_TDM = "facediffuser_tdm.safetensors"
DEFAULT_CONTROLNET = "control_v11p_sd15_openpose_fp16.safetensors"  # what download --controlnet openpose fetches
BATCH_NODES = ("ImageBatch", "BatchImagesNode")  # "Batch Images" (0.3.75+; 0.8's newer node): read in users' templates only, build_graph uses none
SUBJECT_PHOTO_INPUTS = ("images", "images_2", "images_3", "images_4")  # a Face-diffuser Subject node's photo inputs
EventHandler = Callable[[str, dict], None]
"""``on_event(type, data)`` for each websocket event of the running job (``progress``, ``executing``...)."""


class JobError(Exception):
    """A job that ComfyUI refused or that failed while running (the server itself is fine)."""


class ServerUnavailable(Exception):
    """The server cannot be reached, or is not a ComfyUI with the Face-diffuser nodes."""


def _first_line(text: str, limit: int = 500) -> str:
    text = text.strip()
    return (text.splitlines()[0] if text else "")[:limit]


# --- graphs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    """One Face-diffuser job: ``faces`` has the photos of each ``<|image|>`` marker of ``prompt`` in
    marker order, each a tuple of LoadImage values (uploaded file names, one or more photos of that
    person, of one size, combined by ``combine``: one of :data:`~facediffuser_core.method.subjects.COMBINE_MODES`);
    sizes in pixels; ``start_merge``/``final`` are fractions of the steps; ``sdm``/``tdm`` are model
    file names (None: :data:`DEFAULT_SDM` / :data:`DEFAULT_TDM`, or a template's own); images are
    saved under ``filename_prefix``. Where each person goes: ``layout="columns"`` (side by side, in
    marker order), or ``regions``, one per face in marker order, each a box (fractions of the width
    and height, see :mod:`.regions`) or the LoadImage value of an uploaded mask image (white inside,
    the picture's aspect ratio); neither: no regions. ``pose`` (a LoadImage value) puts the ControlNet file
    ``controlnet`` (in ComfyUI's models/controlnet) on that image, at ``control_strength``, on every
    conditioning. ``into`` (a LoadImage value) puts the people into that picture instead of a new one: it is
    scaled to ``width`` pixels wide (its aspect ratio kept; ``height`` unused), encoded, and only the
    union of the people's regions (columns or boxes, which it needs) is repainted; the rest is kept
    pixel for pixel (:func:`build_graph`)."""

    prompt: str
    faces: tuple[tuple[str, ...], ...]
    negative: str = ""
    seed: int = 0
    steps: int = OFFICIAL_STEPS
    cfg: float = OFFICIAL_GUIDANCE
    start_merge: float = START_MERGE_FRACTION
    final: float = FINAL_FRACTION
    width: int = 512
    height: int = 512
    batch: int = 1
    sampler: str = "ddim"
    scheduler: str = "ddim_uniform"
    sdm: Optional[str] = None
    tdm: Optional[str] = None
    filename_prefix: str = "facediffuser"
    subject_mask: bool = True  # also preview the sampler's subject_mask (MaskToImage -> PreviewImage)
    combine: str = DEFAULT_COMBINE
    detail: Optional[float] = None  # the Face Detailer's denoise after sampling; None: no detail pass
    regions: tuple[Union[Box, str], ...] = ()
    layout: Optional[str] = None
    pose: Optional[str] = None  # a control image (an OpenPose render) for the ControlNet; None: no ControlNet
    controlnet: str = DEFAULT_CONTROLNET
    control_strength: float = 1.0
    into: Optional[str] = None  # a picture to put the people into (a LoadImage value); None: a new picture


@dataclass(frozen=True)
class JobGraph:
    """An API-format graph and the ids of the nodes a client watches: the sampler (progress), the
    SaveImage of the images, the PreviewImage of the subject masks (None when there is none) and the
    Face Detailer (progress; None when there is none)."""

    nodes: dict
    sampler: str
    images: str
    masks: Optional[str]
    detailer: Optional[str] = None


class _GraphBuilder:
    def __init__(self) -> None:
        self.nodes: dict[str, dict] = {}

    def add(self, class_type: str, title: str, **inputs: Any) -> str:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}
        return node_id


def _ordinal(number: int) -> str:
    """``1st``, ``2nd``, ``3rd``, ``4th``: the shipped workflows' node titles ("Person of the 1st <|image|>")."""
    return f"{number}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(number if number < 20 else number % 10, 'th')}"


def _region_masks(graph: _GraphBuilder, job: Generation, picture: Optional[list] = None) -> tuple[Optional[list], list[list]]:
    """The MASK links of the job's regions, as (Subject Encode's ``masks``, each Face-diffuser Subject's
    ``mask``): one Face-diffuser Regions node with every person's region in marker order into
    ``masks`` (as the shipped regions and pose workflows) where the regions are columns or boxes;
    with a mask image among them, one mask per person into its Subject node (a box through a
    one-person Regions node, a mask image through LoadImage and "Convert Image to Mask", red
    channel), so nothing needs batching; (None, []) without regions. ``picture``: the LATENT link of the
    picture the people go into, the Regions node's ``size_from``."""
    count = len(job.faces)
    size: dict[str, Any] = {"width": job.width, "height": job.height}
    if picture is not None:
        size["size_from"] = picture  # the masks take the encoded picture's size
    if job.layout is not None:
        return [graph.add("FaceDiffuserRegions", "Face-diffuser Regions", **size, people=count, layout=job.layout, boxes="", prompt=job.prompt), 0], []
    regions = list(job.regions)
    if not regions:
        return None, []
    if len(regions) != count:
        raise FaceDiffuserError(f"a Face-diffuser graph needs one region per face, got {len(regions)} region(s) for {count} face(s)")
    if not any(isinstance(region, str) for region in regions):
        return [graph.add("FaceDiffuserRegions", "Face-diffuser Regions", **size, people=count, layout="boxes", boxes=format_boxes(regions), prompt=job.prompt), 0], []
    links = []
    for number, region in enumerate(regions, start=1):
        if isinstance(region, str):
            image = [graph.add("LoadImage", f"Region {number} (mask image)", image=region), 0]
            links.append([graph.add("ImageToMask", f"Region {number}", image=image, channel="red"), 0])
        else:
            links.append([graph.add("FaceDiffuserRegions", f"Region {number}", **size, people=1, layout="boxes", boxes=format_boxes([region]), prompt=""), 0])
    return None, links


def build_graph(job: Generation) -> JobGraph:
    """The API workflow of the shipped two-person workflows (``facediffuser_two_subjects.json``,
    ``facediffuser_two_regions.json``...) for any 1 to 4 faces: per face, in marker order, one
    Face-diffuser Subject node ("Person of the 1st <|image|>"...) with that person's LoadImage photos
    (up to four, one per photo input: images, images_2...), each Subject's ``subjects`` into the next
    one's ``previous_subjects`` and the last one's into Subject Encode's ``subjects``; no "Batch
    Images" node, which ComfyUI 0.33 marks deprecated. The job's regions (see :func:`_region_masks`)
    go into Subject Encode's ``masks``, or each Subject node's ``mask``. Then
    the all-in-one Face-diffuser Sampler (with ``job.pose``, all its conditionings through Face-diffuser
    Apply ControlNet), VAE decode, with ``job.detail`` the Face-diffuser Face
    Detailer (same people, prompt, seed, steps, cfg and sampler; a picture without a face passes
    through, faces that match nobody are left), SaveImage, and the subject mask previewed. With
    ``job.into``, the graph of ``facediffuser_into_a_photo.json``: the picture (Load Image, Upscale Image
    to ``job.width`` wide, VAE Encode) sizes the regions, their union (Face-diffuser Regions Union) is
    its noise mask (Set Latent Noise Mask) instead of an Empty Latent Image, and the decoded result is
    composited over the scaled picture through that union (ImageCompositeMasked) before saving."""
    if not 1 <= len(job.faces) <= MAX_SUBJECTS:
        raise FaceDiffuserError(f"a Face-diffuser graph takes 1 to {MAX_SUBJECTS} faces, got {len(job.faces)}")
    if not all(job.faces):
        raise FaceDiffuserError("every face of a Face-diffuser graph needs at least one photo")
    for number, faces in enumerate(job.faces, start=1):
        if len(faces) > len(SUBJECT_PHOTO_INPUTS):
            raise FaceDiffuserError(f"face {number} has {len(faces)} photos; a Face-diffuser Subject node takes at most {len(SUBJECT_PHOTO_INPUTS)} ({', '.join(SUBJECT_PHOTO_INPUTS)}): give at most {len(SUBJECT_PHOTO_INPUTS)} photos per face")
    graph = _GraphBuilder()
    loader = graph.add("FaceDiffuserLoader", "Face-diffuser Loader", sdm_name=job.sdm or DEFAULT_SDM, tdm_name=job.tdm or DEFAULT_TDM, weight_dtype="auto")
    photos = [
        [[graph.add("LoadImage", f"Face {number}" + (f", photo {index}" if len(faces) > 1 else ""), image=photo), 0] for index, photo in enumerate(faces, start=1)]
        for number, faces in enumerate(job.faces, start=1)
    ]  # fmt: skip
    picture = None  # with job.into: the scaled picture (IMAGE) and its latent
    if job.into is not None:
        loaded = graph.add("LoadImage", "Your picture", image=job.into)
        scaled = [graph.add("ImageScale", f"Working size ({job.width} wide, aspect ratio kept)", image=[loaded, 0], upscale_method="lanczos", width=job.width, height=0, crop="disabled"), 0]
        picture = (scaled, [graph.add("VAEEncode", "VAE Encode (your picture)", pixels=scaled, vae=[loader, 3]), 0])
    masks, person_masks = _region_masks(graph, job, None if picture is None else picture[1])
    if picture is not None and (masks is None or person_masks):
        raise FaceDiffuserError("putting people into a picture needs their regions as columns or boxes (one Face-diffuser Regions node), not none and not mask images")
    regions = {} if masks is None else {"masks": masks}
    subjects = None
    for number, links in enumerate(photos, start=1):
        chained = {} if subjects is None else {"previous_subjects": subjects}
        region = {"mask": person_masks[number - 1]} if person_masks else {}
        inputs = dict(zip(SUBJECT_PHOTO_INPUTS, links))
        subjects = [graph.add("FaceDiffuserSubject", f"Person of the {_ordinal(number)} {MARKER}", **inputs, combine=job.combine, **chained, **region), 0]
    references = {"subjects": subjects}
    clip = [loader, 2]
    encode = graph.add("FaceDiffuserSubjectEncode", "Face-diffuser Subject Encode", clip=clip, subject_encoder=[loader, 4], prompt=job.prompt, object_resolution=512, **references, **regions)
    negative = graph.add("CLIPTextEncode", "Negative prompt (TDM scene stage)", text=job.negative, clip=clip)
    conditionings = {"text": [encode, 0], "subject": [encode, 1], "negative": [negative, 0]}
    if job.pose is not None:  # the ControlNet on every conditioning the sampler takes
        control_net = graph.add("ControlNetLoader", "Load ControlNet Model", control_net_name=job.controlnet)
        pose = graph.add("LoadImage", "Pose", image=job.pose)
        control = graph.add(
            "FaceDiffuserApplyControlNet", "Face-diffuser Apply ControlNet", **conditionings, control_net=[control_net, 0],
            image=[pose, 0], strength=job.control_strength, start_percent=0.0, end_percent=1.0,
        )  # fmt: skip
        conditionings = {name: [control, index] for index, name in enumerate(conditionings)}
    union = None
    if picture is None:
        latent = graph.add("EmptyLatentImage", "Empty Latent Image", width=job.width, height=job.height, batch_size=job.batch)
    else:  # repaint only where the people go
        union = [graph.add("FaceDiffuserRegionsUnion", "Where people go (repainted)", masks=masks), 0]
        latent = graph.add("SetLatentNoiseMask", "Repaint only the people's regions", samples=picture[1], mask=union)
    sampler = graph.add(
        "FaceDiffuserSampler", "Face-diffuser Sampler", tdm=[loader, 0], sdm=[loader, 1], **conditionings, latent_image=[latent, 0],
        seed=job.seed, steps=job.steps, cfg=job.cfg, sampler_name=job.sampler, scheduler=job.scheduler, start_merge=job.start_merge, final=job.final, denoise=1.0,
    )  # fmt: skip
    decoded = [graph.add("VAEDecode", "VAE Decode", samples=[sampler, 0], vae=[loader, 3]), 0]
    detailer = None
    if job.detail is not None:
        detailer = graph.add(
            "FaceDiffuserFaceDetailer", "Face-diffuser Face Detailer", image=decoded, vae=[loader, 3], sdm=[loader, 1], clip=clip,
            subject_encoder=[loader, 4], prompt=job.prompt, seed=job.seed, steps=job.steps, cfg=job.cfg, sampler_name=job.sampler,
            scheduler=job.scheduler, denoise=job.detail, size=DEFAULT_SIZE, margin=DEFAULT_MARGIN, feather=DEFAULT_FEATHER,
            if_unmatched="leave it", if_no_face="pass through", object_resolution=512, facenet_name=MATCH_BY_SUBJECT_ENCODER, **references,
        )  # fmt: skip
        decoded = [detailer, 0]
    if picture is not None:  # the rest of the picture kept pixel for pixel
        decoded = [graph.add("ImageCompositeMasked", "Keep the rest of your picture", destination=picture[0], source=decoded, x=0, y=0, resize_source=False, mask=union), 0]
    save = graph.add("SaveImage", "Save Image", images=decoded, filename_prefix=job.filename_prefix)
    masks = None
    if job.subject_mask:
        mask_image = graph.add("MaskToImage", "Subject mask as image", mask=[sampler, 1])
        masks = graph.add("PreviewImage", "Subject mask (where the SDM owned the image)", images=[mask_image, 0])
    return JobGraph(graph.nodes, sampler, save, masks, detailer)


def _single(graph: dict, class_type: str, source: str) -> str:
    ids = [key for key, node in graph.items() if node.get("class_type") == class_type]
    if len(ids) != 1:
        raise FaceDiffuserError(f"{source}: the workflow needs exactly one {class_type} node, it has {len(ids)}")
    return ids[0]


def _batch_inputs(node: dict) -> list[list]:
    """The image links of a "Batch Images" node in batch order: ImageBatch (image1, image2) or
    ComfyUI 0.8's BatchImagesNode (images.image0, images.image1, ...)."""
    if node["class_type"] == "ImageBatch":
        return [node["inputs"]["image1"], node["inputs"]["image2"]]
    names = [name for name in node["inputs"] if name.startswith("images.")]
    return [node["inputs"][name] for name in sorted(names, key=lambda name: int(re.sub(r"\D", "", name) or 0))]


def _image_loaders(graph: dict, link: list, source: str) -> list[dict]:
    """The LoadImage nodes feeding an IMAGE input, in batch order (through batching nodes)."""
    node = graph[link[0]]
    if node["class_type"] == "LoadImage":
        return [node]
    if node["class_type"] in BATCH_NODES:
        return [loader for inner in _batch_inputs(node) for loader in _image_loaders(graph, inner, source)]
    raise FaceDiffuserError(f"{source}: the subject images come from a {node['class_type']} node; expected LoadImage, or Batch Images of LoadImage nodes")


def _subject_chain(graph: dict, link: list, source: str) -> list[dict]:
    """The Face-diffuser Subject nodes of a chain, in marker order, from the link of its last one."""
    chain: list[dict] = []
    seen = set()
    while link is not None:
        node = graph[link[0]]
        if node["class_type"] != "FaceDiffuserSubject":
            raise FaceDiffuserError(f"{source}: the subjects come from a {node['class_type']} node; expected Face-diffuser Subject nodes, chained in marker order")
        if link[0] in seen:
            raise FaceDiffuserError(f"{source}: the Face-diffuser Subject nodes' previous_subjects links form a loop at node {link[0]}")
        seen.add(link[0])
        chain.insert(0, node)
        link = node["inputs"].get("previous_subjects")
    return chain


def _people_loaders(graph: dict, references: dict, source: str) -> list[list[dict]]:
    """Per ``<|image|>`` marker, the LoadImage nodes of that person's photos, from the inputs of a node
    taking the people (Subject Encode, Face Detailer): its ``images`` (one per marker, through Batch
    Images), or its ``subjects`` (chained Face-diffuser Subject nodes, each with its photo inputs)."""
    if "images" in references:
        return [[loader] for loader in _image_loaders(graph, references["images"], source)]
    if "subjects" in references:
        chain = _subject_chain(graph, references["subjects"], source)
        return [[loader for name in SUBJECT_PHOTO_INPUTS if name in node["inputs"] for loader in _image_loaders(graph, node["inputs"][name], source)] for node in chain]
    raise FaceDiffuserError(f"{source}: its Subject Encode takes no faces; connect its images or its subjects")


def _bypass_face_crops(graph: dict, source: str) -> None:
    """Wire each Face-diffuser Face Crop's photos straight to where its crops went, and drop it: the
    job's faces are crops already (the commands crop each photo as that node does), and a second crop
    would zoom in on the first."""
    for key in [key for key, node in graph.items() if node.get("class_type") == "FaceDiffuserFaceCrop"]:
        photos = graph.pop(key)["inputs"]["images"]
        for node in graph.values():
            for name, value in node["inputs"].items():
                if isinstance(value, list) and len(value) == 2 and value[0] == key:
                    if value[1] != 0:
                        raise FaceDiffuserError(f"{source}: node {key} (Face-diffuser Face Crop) feeds its face_mask or preview on; a template may use only its crops")
                    node["inputs"][name] = photos


def fill_template(template: dict, job: Generation, source: str = "workflow") -> JobGraph:
    """A hand-made API workflow (one Subject Encode, Face-diffuser Sampler, EmptyLatentImage and
    SaveImage) with the job's prompt, faces (its LoadImage nodes in marker order: in the batch of
    Subject Encode's images, or one per Face-diffuser Subject node of the chain into its subjects), seed, steps, cfg,
    size, batch and image prefix, and the model files where the job names them; the rest stays the
    template's. Preview nodes are dropped unless ``job.subject_mask``; Face Crop nodes are bypassed
    (the job's faces are cropped already)."""
    graph = copy.deepcopy(template)
    _bypass_face_crops(graph, source)
    if not job.subject_mask:
        for key in [key for key, node in graph.items() if node.get("class_type") == "PreviewImage"]:
            del graph[key]
    encode = graph[_single(graph, "FaceDiffuserSubjectEncode", source)]
    people = _people_loaders(graph, encode["inputs"], source)
    if len(people) != len(job.faces):
        raise FaceDiffuserError(f"{source}: the workflow loads the photos of {len(people)} person(s) but the job has {len(job.faces)} faces")
    if any(len(faces) != 1 for faces in job.faces):
        raise FaceDiffuserError(f"{source}: a workflow template takes one photo per face")
    for number, loaders in enumerate(people, start=1):
        if len(loaders) != 1:
            raise FaceDiffuserError(f"{source}: the person of marker {number} has {len(loaders)} Load Image nodes; a workflow template takes one photo per face")
    for key, node in graph.items():  # a Face Detailer must detail the people the job sampled, not the template's
        if node.get("class_type") == "FaceDiffuserFaceDetailer" and {k: node["inputs"].get(k) for k in ("images", "subjects")} != {k: encode["inputs"].get(k) for k in ("images", "subjects")}:
            raise FaceDiffuserError(f"{source}: node {key} (Face-diffuser Face Detailer) takes other people than Subject Encode; connect the same images or subjects to both")
    for (loader,), (face,) in zip(people, job.faces):
        loader["inputs"]["image"] = face
    encode["inputs"]["prompt"] = job.prompt
    sampler = _single(graph, "FaceDiffuserSampler", source)
    graph[sampler]["inputs"].update(seed=job.seed, steps=job.steps, cfg=job.cfg)
    graph[_single(graph, "EmptyLatentImage", source)]["inputs"].update(width=job.width, height=job.height, batch_size=job.batch)
    save = _single(graph, "SaveImage", source)
    graph[save]["inputs"]["filename_prefix"] = job.filename_prefix
    models = {"sdm_name": job.sdm, "tdm_name": job.tdm}
    graph[_single(graph, "FaceDiffuserLoader", source)]["inputs"].update({key: value for key, value in models.items() if value})
    masks = [key for key, node in graph.items() if node.get("class_type") == "PreviewImage"]
    return JobGraph(graph, sampler, save, masks[0] if len(masks) == 1 else None)


# --- the websocket ----------------------------------------------------------------------------


class WebSocket:
    """Just enough of a RFC 6455 client to follow ComfyUI's ``/ws`` event stream: messages in (text
    or binary, fragmented or not), pings answered, a close ends it. Client frames are masked."""

    GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, url: str, timeout: float) -> None:
        parts = urllib.parse.urlsplit(url)
        secure = parts.scheme in ("https", "wss")
        host, port = parts.hostname or "127.0.0.1", parts.port or (443 if secure else 80)
        self.sock = socket.create_connection((host, port), timeout=timeout)
        if secure:
            self.sock = ssl.create_default_context().wrap_socket(self.sock, server_hostname=host)
        self.buffer = b""
        self.fragments: list[bytes] = []
        key = base64.b64encode(os.urandom(16)).decode()
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        while b"\r\n\r\n" not in self.buffer:
            self._fill(len(self.buffer) + 1)
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
        accept = base64.b64encode(hashlib.sha1((key + self.GUID).encode()).digest()).decode()
        if lines[0].split()[1:2] != ["101"] or headers.get("sec-websocket-accept") != accept:
            self.sock.close()
            raise ConnectionError(f"no websocket at {url} (answer: {lines[0]})")

    def _fill(self, size: int) -> None:
        """Read until the buffer holds ``size`` bytes (a socket timeout keeps what was read)."""
        while len(self.buffer) < size:
            chunk = self.sock.recv(max(65536, size - len(self.buffer)))
            if not chunk:
                raise ConnectionError("the server closed the websocket")
            self.buffer += chunk

    def _frame(self) -> tuple[bool, int, bytes]:
        """The next whole frame (fin, opcode, payload); consumed only once it is complete."""
        self._fill(2)
        length, offset = self.buffer[1] & 0x7F, 2
        if length >= 126:
            extra = 2 if length == 126 else 8
            self._fill(2 + extra)
            (length,) = struct.unpack(">H" if extra == 2 else ">Q", self.buffer[2 : 2 + extra])
            offset += extra
        mask = b""
        if self.buffer[1] & 0x80:
            self._fill(offset + 4)
            mask, offset = self.buffer[offset : offset + 4], offset + 4
        self._fill(offset + length)
        first, payload = self.buffer[0], self.buffer[offset : offset + length]
        self.buffer = self.buffer[offset + length :]
        if mask:
            payload = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
        return bool(first & 0x80), first & 0x0F, payload

    def send(self, opcode: int, payload: bytes = b"") -> None:
        mask = os.urandom(4)
        length = len(payload)
        if length < 126:
            header = struct.pack(">BB", 0x80 | opcode, 0x80 | length)
        elif length < 1 << 16:
            header = struct.pack(">BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            header = struct.pack(">BBQ", 0x80 | opcode, 0x80 | 127, length)
        self.sock.sendall(header + mask + bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload)))

    def receive(self, timeout: Optional[float]) -> Optional[tuple[int, bytes]]:
        """The next message as (opcode: 1 text, 2 binary; payload), or None when ``timeout`` seconds
        pass without one. A close from the server raises :class:`ConnectionError`."""
        self.sock.settimeout(timeout)
        while True:
            try:
                fin, opcode, payload = self._frame()
            except socket.timeout:
                return None
            if opcode == 0x9:  # ping
                self.send(0xA, payload)
            elif opcode == 0x8:
                raise ConnectionError("the server closed the websocket")
            elif opcode in (0x0, 0x1, 0x2):
                self.fragments.append(bytes([opcode]) + payload if opcode else payload)
                if fin:
                    message, self.fragments = b"".join(self.fragments), []
                    return message[0], message[1:]

    def close(self) -> None:
        try:
            self.send(0x8, struct.pack(">H", 1000))
        except OSError:
            pass  # already gone: nothing to tell it
        self.sock.close()


# --- the client -------------------------------------------------------------------------------


def _validation_message(body: Any, graph: dict) -> str:
    """ComfyUI's HTTP 400 answer to ``POST /prompt`` as one line naming each node that failed."""
    if not isinstance(body, dict):
        return _first_line(str(body), 2000)
    error = body.get("error", {})
    parts = [error.get("message", "") if isinstance(error, dict) else str(error)]
    for node_id, node_error in (body.get("node_errors") or {}).items():
        problems = "; ".join(
            f"{problem.get('message', '')}: {problem.get('details', '')}".rstrip(": ") for problem in node_error.get("errors", [])
        )
        parts.append(f"{_node_name(graph, node_id, node_error.get('class_type'))}: {problems}")
    if isinstance(error, dict) and error.get("details") and not body.get("node_errors"):
        parts.append(str(error["details"]))
    return "; ".join(part for part in parts if part)


def _node_name(graph: dict, node_id: Any, class_type: Optional[str] = None) -> str:
    node = graph.get(str(node_id), {})
    title = node.get("_meta", {}).get("title")
    kind = class_type or node.get("class_type", "?")
    return f"{kind} (node {node_id}{', ' + repr(title) if title and title != kind else ''})"


class ComfyClient:
    """One ComfyUI server, ``host:port`` or an ``http(s)://`` URL."""

    def __init__(self, server: str, timeout: float = 60.0, heartbeat: float = 5.0) -> None:
        self.url = (server if "://" in server else f"http://{server}").rstrip("/")
        self.timeout = timeout  # one HTTP request
        self.heartbeat = heartbeat  # seconds without an event after which the job's history is checked
        self.client_id = uuid.uuid4().hex
        self.running: Optional[str] = None  # the prompt id of the job being waited for

    def __str__(self) -> str:
        return self.url

    def _request(self, path: str, data: Optional[bytes] = None, headers: Optional[dict[str, str]] = None, timeout: Optional[float] = None) -> bytes:
        request = urllib.request.Request(self.url + path, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, ConnectionError, socket.timeout) as error:
            raise ServerUnavailable(f"{self.url} cannot be reached ({getattr(error, 'reason', error)})") from None

    def _json(self, path: str, body: Any = None, timeout: Optional[float] = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        return json.loads(self._request(path, data, {"Content-Type": "application/json"} if data is not None else None, timeout))

    def ping(self) -> None:
        """Raise :class:`ServerUnavailable` unless the server answers HTTP at all."""
        try:
            self._request("/system_stats")
        except urllib.error.HTTPError:
            pass  # it answers

    def check(self) -> None:
        """Raise :class:`ServerUnavailable` unless the server answers and has the Face-diffuser nodes."""
        try:
            info = self._json("/object_info/FaceDiffuserSampler")
        except (urllib.error.HTTPError, json.JSONDecodeError) as error:
            raise ServerUnavailable(f"{self.url} answered {getattr(error, 'code', 'no JSON')}: is it a ComfyUI server?") from None
        if "FaceDiffuserSampler" not in info:
            raise ServerUnavailable(f"{self.url} has no Face-diffuser nodes: install the pack in its custom_nodes folder")

    def check_models(self, files: Sequence[str]) -> None:
        """Raise :class:`ServerUnavailable` when the server's Face-diffuser model folders (its
        ``GET /models/facediffuser``) lack one of ``files``, naming the command that downloads them."""
        try:
            listed = self._json(f"/models/{MODEL_FOLDER}")
        except urllib.error.HTTPError:
            return  # a server without that route: the queue's validation names a missing file
        missing = [file for file in files if file not in listed]
        if missing:
            raise ServerUnavailable(
                f"{self.url} has no {' or '.join(missing)} in its models/{MODEL_FOLDER} ({len(listed)} file(s) there); on that machine, "
                "`python -m facediffuser_core download` in the pack's folder downloads the official models (or pick other files with --sdm/--tdm)"
            )

    def upload(self, stem: str, data: bytes, subfolder: str) -> str:
        """Upload PNG ``data`` into ComfyUI's input folder as ``<subfolder>/<stem>_<content hash>.png``
        (the same photo is stored once); returns the value for a LoadImage node."""
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or "image"
        name = f"{stem}_{hashlib.sha1(data).hexdigest()[:10]}.png"
        boundary = uuid.uuid4().hex
        fields = [
            (f'name="image"; filename="{name}"', "image/png", data),
            ('name="subfolder"', None, subfolder.encode()),
            ('name="overwrite"', None, b"true"),
        ]
        body = b""
        for disposition, kind, value in fields:
            body += f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n".encode()
            body += (f"Content-Type: {kind}\r\n" if kind else "").encode() + b"\r\n" + value + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        answer = json.loads(self._request("/upload/image", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}))
        return f"{answer['subfolder']}/{answer['name']}" if answer.get("subfolder") else answer["name"]

    def queue(self, graph: dict) -> str:
        """Queue an API-format workflow; returns its prompt id. A workflow ComfyUI rejects is a
        :class:`JobError` naming the nodes that failed validation."""
        try:
            return self._json("/prompt", {"prompt": graph, "client_id": self.client_id})["prompt_id"]
        except urllib.error.HTTPError as error:
            text = error.read().decode(errors="replace")
            try:
                detail = _validation_message(json.loads(text), graph)
            except json.JSONDecodeError:
                detail = _first_line(text, 2000)
            raise JobError(f"{self.url} rejected the workflow (HTTP {error.code}): {detail}") from None

    def run(self, graph: dict, timeout: Optional[float] = None, on_event: Optional[EventHandler] = None) -> dict:
        """Queue ``graph``, pass its websocket events to ``on_event`` until it has finished, and return
        its ``/history`` entry. A failed job is a :class:`JobError` naming the node; ``timeout``
        (seconds, queue included; None: no limit) too. If waiting stops for any reason (Ctrl-C
        included), the job is taken off the server's queue or interrupted."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            events = WebSocket(f"{self.url}/ws?clientId={self.client_id}", self.timeout)  # before queueing: no event is missed
        except (OSError, ConnectionError) as error:
            raise ServerUnavailable(f"{self.url} cannot be reached ({error})") from None
        try:
            self.running = self.queue(graph)
            entry = self._follow(events, self.running, deadline, on_event)
            self.running = None
        except BaseException:
            self.cancel()
            raise
        finally:
            events.close()
        if entry.get("status", {}).get("status_str") != "success":
            raise JobError(f"{self.url} failed the job: {self._error_message(entry, graph)}")
        return entry

    def _follow(self, events: WebSocket, prompt_id: str, deadline: Optional[float], on_event: Optional[EventHandler]) -> dict:
        """Events of ``prompt_id`` until ComfyUI reports it finished (``executing`` with no node comes
        after its history is stored); its history entry is also checked after each quiet heartbeat."""
        while True:
            wait = self.heartbeat if deadline is None else min(self.heartbeat, deadline - time.monotonic())
            if wait <= 0:
                raise JobError(f"{self.url} did not finish the job within the time limit")
            try:
                message = events.receive(wait)
            except (OSError, ConnectionError) as error:
                raise ServerUnavailable(f"{self.url} went away during the job ({error})") from None
            if message is None:  # quiet: a missed event must not leave us waiting
                entry = self.history(prompt_id)
                if entry is not None and entry.get("status", {}).get("completed") is not None:
                    return entry
                continue
            if message[0] != 1:  # binary: a preview image
                continue
            event = json.loads(message[1])
            kind, data = event.get("type", ""), event.get("data") or {}
            if data.get("prompt_id") != prompt_id:
                continue
            if kind == "executing" and data.get("node") is None:
                entry = self.history(prompt_id)
                if entry is None:
                    raise JobError(f"{self.url} finished the job but has no history entry for it")
                return entry
            if on_event is not None:
                on_event(kind, data)

    def history(self, prompt_id: str) -> Optional[dict]:
        """The ``/history`` entry of a prompt, None until it has finished."""
        return self._json(f"/history/{prompt_id}").get(prompt_id)

    def cancel(self) -> None:
        """Take the job being waited for off the queue, or interrupt it if it is running (best effort:
        called while another error is on its way, so a server that is gone is not an error here)."""
        if self.running is None:
            return
        prompt_id, self.running = self.running, None
        for path, body in (("/queue", {"delete": [prompt_id]}), ("/interrupt", {"prompt_id": prompt_id})):
            try:
                self._request(path, json.dumps(body).encode(), {"Content-Type": "application/json"}, timeout=5)
            except (ServerUnavailable, urllib.error.HTTPError):
                pass

    def _error_message(self, entry: dict, graph: dict) -> str:
        for event, data in entry.get("status", {}).get("messages", []):
            if event == "execution_error":
                name = _node_name(graph, data.get("node_id"), data.get("node_type"))
                return f"{name}: {_first_line(str(data.get('exception_message', '')))}"
            if event == "execution_interrupted":
                return "interrupted on the server"
        return entry.get("status", {}).get("status_str", "unknown error")

    def images(self, entry: dict, node_id: str) -> list[bytes]:
        """The files a SaveImage or PreviewImage node of a finished job wrote, in batch order."""
        listed = entry.get("outputs", {}).get(node_id, {}).get("images", [])
        return [self.download(image) for image in listed]

    def download(self, image: dict) -> bytes:
        """The bytes of an image listed in a history entry's outputs."""
        query = urllib.parse.urlencode({key: image.get(key, "") for key in ("filename", "subfolder", "type")})
        return self._request(f"/view?{query}")
