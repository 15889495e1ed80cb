"""``python -m facediffuser_core generate``: face photos and a prompt in, Face-diffuser pictures out,
through ComfyUI (a running one with ``--server``, or the one the pack is installed in, started
headless for the run and stopped afterwards).

Everything that can be checked here (the prompt's markers against the photos, the settings, a face
in each photo) is checked before a server starts. Each photo is face-cropped with MTCNN locally,
uploaded, and the graph is built in code (:func:`~facediffuser_core.commands.comfy_client.build_graph`);
``--region``/``--layout`` place each person in a region (one Face-diffuser Regions node into Subject
Encode's ``masks``, or, with a mask image among them, each person's mask into its Face-diffuser
Subject node); ``--into`` puts the people into a picture of the user's instead of a new one.
The PNGs ComfyUI saves carry the API workflow (dropping one on the canvas reopens it); each comes
with its subject mask. Exit codes: 0 done, 1 the job failed in ComfyUI, 2 usage or server error,
130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ..errors import FaceDiffuserError, FaceNotFoundError, RegionError
from ..faces.detailer import DEFAULT_DENOISE
from ..faces.detection import DEFAULT_MARGIN, load_detector, png_bytes, reference_png
from ..method.pose import PoseError, pose_boxes
from ..method.prompt import MARKER
from ..method.regions import WHOLE_LAYOUTS, Box, marked_words, named_region
from ..method.schedule import FINAL_FRACTION, OFFICIAL_GUIDANCE, OFFICIAL_STEPS, START_MERGE_FRACTION, bounds_from_fractions, stage_at, validate_fractions
from ..method.subjects import COMBINE_MODES, DEFAULT_COMBINE
from ..weights.model_folders import MODEL_FOLDER, comfyui_model_folders, download_command_line, find_model
from .comfy_client import DEFAULT_CONTROLNET, DEFAULT_SDM, DEFAULT_TDM, SUBJECT_PHOTO_INPUTS, ComfyClient, Generation, JobError, JobGraph, build_graph
from .comfy_launch import LocalComfyUI, device_args, find_comfyui, split_command

__all__ = ["add_arguments", "parse_faces", "check_photos", "check_prompt", "parse_regions", "check_models", "check_controlnet", "read_into", "read_pose", "pose_regions", "StageProgress", "save_outputs", "generate"]

UPLOAD_FOLDER = "facediffuser"  # in ComfyUI's input/ (the face crops) and output/ (the images)
OUTPUT_PREFIX = "facediffuser"
ASPECT_TOLERANCE = 0.01  # a mask image's aspect ratio may differ from the picture's by 1 %


class UsageError(FaceDiffuserError):
    """Command-line input that cannot be used; found before any server starts."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    job = parser.add_argument_group("the job")
    job.add_argument("--face", action="append", required=True, metavar="PHOTO", help="the photo of the person of one <|image|> marker, or several photos of that person comma-separated (a1.jpg,a2.jpg; at most 4); repeat --face once per marker, in marker order")
    job.add_argument("--prompt", required=True, help="the prompt, with <|image|> right after each person's class word, e.g. 'a man <|image|> reading in a cafe'")
    job.add_argument("-o", "--out", type=Path, required=True, help="folder for the images (facediffuser_NNNNN.png) and their subject masks (facediffuser_NNNNN_mask.png)")
    job.add_argument("--negative", default="", help="negative prompt of the scene stage (default: empty, as the official method)")
    job.add_argument("--steps", type=int, default=OFFICIAL_STEPS, help=f"sampling steps (default {OFFICIAL_STEPS})")
    job.add_argument("--cfg", type=float, default=OFFICIAL_GUIDANCE, help=f"guidance scale (default {OFFICIAL_GUIDANCE:g})")
    job.add_argument("--start-merge", type=float, default=START_MERGE_FRACTION, help=f"end of the scene stage, a fraction of the steps (default {START_MERGE_FRACTION:g})")
    job.add_argument("--final", type=float, default=FINAL_FRACTION, help=f"end of the fusion stage, a fraction of the steps (default {FINAL_FRACTION:g})")
    job.add_argument("--size", type=int, default=512, help="image width and height in pixels (default 512)")
    job.add_argument("--width", type=int, help="image width in pixels (default --size)")
    job.add_argument("--height", type=int, help="image height in pixels (default --size)")
    job.add_argument("--seed", type=int, help="seed of the initial noise (default: a random one, printed)")
    job.add_argument("--batch", type=int, default=1, help="images to make, one batch (default 1)")
    job.add_argument("--sampler", default="ddim", help="ComfyUI sampler name (default ddim, the official method)")
    job.add_argument("--scheduler", default="ddim_uniform", help="ComfyUI scheduler name (default ddim_uniform)")
    job.add_argument("--sdm", default=DEFAULT_SDM, help=f"SDM file in ComfyUI's models/facediffuser (default {DEFAULT_SDM})")
    job.add_argument("--tdm", default=DEFAULT_TDM, help=f"TDM file in ComfyUI's models/facediffuser (default {DEFAULT_TDM})")
    job.add_argument("--combine", choices=COMBINE_MODES, default=DEFAULT_COMBINE, help=f"how several photos of one person become one face embedding: their average, or norm average (the mean direction at the photos' mean length) (default {DEFAULT_COMBINE})")
    job.add_argument("--detail", action="store_true", help="after sampling, re-render each person's face with their own photo (the Face-diffuser Face Detailer: faces matched to people by identity, 512 px crops, same seed, steps, cfg and sampler)")
    job.add_argument("--detail-denoise", type=float, default=DEFAULT_DENOISE, help=f"how much of each face --detail re-renders, 0..1 (default {DEFAULT_DENOISE:g})")
    job.add_argument("--region", action="append", metavar="WHERE", help="where the person of one --face goes: left, right, centre, n/N (the n-th of N side-by-side columns, e.g. 2/3), or a mask image (white where the person goes, the picture's aspect ratio); repeat once per --face, in marker order; that person's identity acts only there")
    job.add_argument("--layout", choices=WHOLE_LAYOUTS, help="put every --face's person in a region of their own: columns = side by side, the first marker on the left (instead of --region)")
    job.add_argument("--pose", type=Path, metavar="IMAGE", help="a pose image (an OpenPose render: coloured skeletons on black, one per --face, ideally the output's size): the ControlNet --controlnet on it steers every conditioning, so all three stages follow the pose, and (without --region or --layout) each --face's person gets the region around one skeleton, left to right in marker order")
    job.add_argument("--controlnet", default=DEFAULT_CONTROLNET, metavar="NAME", help=f"the ControlNet file in ComfyUI's models/controlnet for --pose (default {DEFAULT_CONTROLNET}: download --controlnet openpose)")
    job.add_argument("--control-strength", type=float, default=1.0, help="how strongly --pose steers the image, 0..10 (default 1)")
    job.add_argument("--into", type=Path, metavar="PHOTO", help="put the people into your own picture instead of a new one: PHOTO is scaled to --width (or --size) pixels wide, its aspect ratio kept (no --height), and only the people's regions (--region boxes, --layout or --pose, required) are repainted; every other pixel of the scaled picture is kept")
    job.add_argument("--no-crop", action="store_true", help="use each photo whole (padded to a square) instead of cropping it around the largest face")
    server = parser.add_argument_group("the ComfyUI server")
    server.add_argument("--server", metavar="HOST:PORT", help="a running ComfyUI with this pack and the models; without it, ComfyUI is started for the run")
    server.add_argument("--comfyui", type=Path, metavar="PATH", help="the ComfyUI folder to start (default: $COMFYUI_PATH, else the ComfyUI this pack is installed in)")
    server.add_argument("--comfyui-args", default="", metavar="ARGS", help="extra arguments for the ComfyUI it starts, one string: --comfyui-args='--cpu' or --comfyui-args='--lowvram --base-directory /data/comfy'; without a device option in it (--cpu, --lowvram, --cuda-device, --directml, ...), --cpu is added when torch finds no CUDA, MPS or XPU device")
    server.add_argument("--startup-timeout", type=float, default=600, help="seconds to wait for the started ComfyUI (default 600)")
    server.add_argument("--timeout", type=float, help="seconds the job may take, queue included (default: no limit)")


def parse_faces(values: Sequence[str]) -> list[tuple[Path, ...]]:
    """``--face`` values -> the photos of each subject, in marker order (``a1.jpg,a2.jpg``: several
    photos of one person, at most one per photo input of a Face-diffuser Subject node)."""
    subjects = []
    for number, value in enumerate(values, start=1):
        photos = tuple(Path(part.strip()) for part in value.split(",") if part.strip())
        if not photos:
            raise UsageError(f"--face #{number} is empty; give the path of a photo")
        if len(photos) > len(SUBJECT_PHOTO_INPUTS):
            raise UsageError(f"--face #{number} has {len(photos)} photos; give at most {len(SUBJECT_PHOTO_INPUTS)} photos of one person (a Face-diffuser Subject node's {len(SUBJECT_PHOTO_INPUTS)} photo inputs)")
        subjects.append(photos)
    return subjects


def check_photos(subjects: Sequence[tuple[Path, ...]]) -> None:
    """Every photo of every subject is a file."""
    for number, photos in enumerate(subjects, start=1):
        for photo in photos:
            if not photo.is_file():
                raise UsageError(f"--face #{number}: no such file {photo}")


def check_prompt(prompt: str, faces: int) -> None:
    """The prompt's markers against the number of ``--face`` photos, and the marker placement rules
    Subject Encode applies (the token limit is left to it: it needs CLIP's tokenizer)."""
    count = prompt.count(MARKER)
    if count == 0:
        raise UsageError(f"the prompt has no {MARKER} marker; put one right after each person's class word, e.g. 'a man {MARKER} reading in a cafe'")
    if count != faces:
        raise UsageError(f"the prompt has {count} {MARKER} marker(s) but --face was given {faces} time(s); give one --face per marker, in marker order (several photos of one person comma-separated)")
    marked_words(prompt)


def _open_rgb(path: Path, option: str, fix: str) -> Image.Image:
    """An image file as RGB; an unreadable one is a :class:`UsageError` naming ``option`` and ``fix``."""
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise UsageError(f"{option}: {path} is not an image ({error}); {fix}") from None


def _mask_image(path: Path, number: int, width: int, height: int) -> Image.Image:
    """The mask image of ``--region #number``, checked: readable, the picture's aspect ratio, and
    white (red channel >= 128) somewhere."""
    image = _open_rgb(path, f"--region #{number}", "give a mask image, white where the person goes")
    if abs(image.width * height - image.height * width) > ASPECT_TOLERANCE * image.width * height:
        raise UsageError(f"--region #{number}: the mask image {path} is {image.width}x{image.height} but the picture is {width}x{height}; give a mask of the picture's aspect ratio")
    if image.getchannel("R").getextrema()[1] < 128:
        raise UsageError(f"--region #{number}: the mask image {path} is black everywhere; paint the person's region white")
    return image


def parse_regions(regions: Optional[Sequence[str]], layout: Optional[str], faces: int, width: int, height: int) -> list[Union[Box, bytes]]:
    """``--region`` values -> per face, in marker order, a box (fractions of the width and height) or a
    mask image's PNG bytes; none without --region (``--layout`` is passed to the graph as it is).

    Each mask image goes to its person's Face-diffuser Subject node, and Subject Encode stacks the
    people's masks, so they must have one size: where the masks (a box's is the picture's size) are
    not all of one size, each mask image not at the picture's size is resized (bilinear) to it."""
    if regions and layout:
        raise UsageError("give --region once per --face or --layout for all of them, not both")
    if not regions:
        return []
    if len(regions) != faces:
        raise UsageError(f"--region was given {len(regions)} time(s) but --face {faces} time(s); give one --region per --face, in marker order (or --layout columns for all)")
    parsed: list[Union[Box, Image.Image]] = []
    for number, spec in enumerate(regions, start=1):
        try:
            box = named_region(spec)
        except RegionError as error:
            raise UsageError(f"--region #{number}: {error}") from None
        if box is None and not Path(spec).is_file():
            raise UsageError(
                f"--region #{number}: '{spec}' is none of left, right, centre, n/N (e.g. 2/3) and no such mask image file; "
                "give one of those names or the path of a mask image, white where the person goes"
            )
        parsed.append(box if box is not None else _mask_image(Path(spec), number, width, height))
    if len({region.size if isinstance(region, Image.Image) else (width, height) for region in parsed}) > 1:
        parsed = [region.resize((width, height), Image.BILINEAR) if isinstance(region, Image.Image) and region.size != (width, height) else region for region in parsed]
    return [png_bytes(region) if isinstance(region, Image.Image) else region for region in parsed]


def _check_settings(args: argparse.Namespace) -> None:
    width, height = args.width or args.size, args.height or args.size
    if min(width, height) < 64 or width % 8 or height % 8:
        raise UsageError(f"the image size must be a multiple of 8 and at least 64 pixels, got {width}x{height}")
    if args.steps < 1 or args.batch < 1:
        raise UsageError(f"--steps and --batch must be at least 1, got {args.steps} and {args.batch}")
    if args.cfg < 0:
        raise UsageError(f"--cfg must be >= 0, got {args.cfg}")
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise UsageError(f"--seed must be between 0 and 2**64 - 1, got {args.seed}")
    if not 0 <= args.control_strength <= 10:
        raise UsageError(f"--control-strength must be between 0 and 10, got {args.control_strength}")
    if args.pose is not None and not args.pose.is_file():
        raise UsageError(f"--pose: no such file {args.pose}")
    if args.into is not None:
        if not args.into.is_file():
            raise UsageError(f"--into: no such file {args.into}")
        if args.height is not None:
            raise UsageError("--into takes the picture's aspect ratio: give its width with --width (or --size), not --height")
        if args.batch != 1:
            raise UsageError(f"--into makes one picture from your photo; leave out --batch (got {args.batch}) and change --seed for another")
    if not 0 <= args.detail_denoise <= 1:
        raise UsageError(f"--detail-denoise must be between 0 and 1, got {args.detail_denoise}")
    try:
        validate_fractions(args.start_merge, args.final)
    except FaceDiffuserError as error:
        raise UsageError(f"--start-merge / --final: {error}") from None


def download_command(file: str, comfyui: Path, explicit: bool, comfyui_args: Sequence[str], folder: str = MODEL_FOLDER) -> Optional[str]:
    """The ``download`` command that puts ``file`` where the ComfyUI at ``comfyui`` (``explicit``: given
    with --comfyui or COMFYUI_PATH) started with ``comfyui_args`` finds it in its model ``folder``;
    None for a file it does not make."""
    from .download import CONTROLNETS, MODELS

    named = {model: ["--controlnet", name] for name, model in CONTROLNETS.items()} | {"fastcomposer": ["--fastcomposer"]}
    flags = {model.target: named.get(name, []) for name, model in MODELS.items() if model.folder == folder}
    if file not in flags:
        return None
    folders = comfyui_model_folders(comfyui, comfyui_args, folder)
    default = comfyui_model_folders(comfyui, name=folder)[0]  # where download writes for that ComfyUI
    to = None if folders[0] == default else folders[0]
    return download_command_line(flags[file], to=to, comfyui=comfyui if explicit else None)


def check_controlnet(file: str, comfyui: Path, explicit: bool, comfyui_args: Sequence[str]) -> None:
    """The ControlNet file is in a folder the ComfyUI searches for ControlNets; the error names the
    folders and, for the OpenPose file, the command that downloads it."""
    from .download import CONTROLNET_FOLDER

    folders = comfyui_model_folders(comfyui, comfyui_args, CONTROLNET_FOLDER)
    if find_model(folders, file) is None:
        command = download_command(file, comfyui, explicit, comfyui_args, CONTROLNET_FOLDER)
        fix = f"download it with: {command}" if command else "put it in one of them"
        raise UsageError(f"--controlnet: no file {file} in the folders ComfyUI searches for ControlNets ({', '.join(map(str, folders))}); {fix}")


def read_into(path: Path, width: int) -> tuple[Image.Image, int]:
    """The ``--into`` picture as RGB and its height once scaled to ``width`` pixels wide (as the graph's
    Upscale Image does: aspect ratio kept, rounded), at least 64 pixels."""
    picture = _open_rgb(path, "--into", "give your picture (a photo to put the people into)")
    height = max(1, round(picture.height * width / picture.width))
    if height < 64:
        raise UsageError(f"--into: {path} is {picture.width}x{picture.height}, {height} pixels high at {width} wide; give a picture at least 64 pixels high at that width (or a larger --width)")
    return picture, height


def read_pose(path: Path) -> Image.Image:
    """The ``--pose`` image as RGB (uploaded as PNG for the ControlNet)."""
    return _open_rgb(path, "--pose", "give a pose image (an OpenPose render: coloured skeletons on black)")


def pose_regions(pose: Image.Image, faces: int) -> list[Box]:
    """Each face's region from the ``--pose`` image, in marker order: the boxes of its skeletons left
    to right (:func:`~.pose.pose_boxes`, as the Regions node's pose layout)."""
    try:
        return pose_boxes(np.asarray(pose, dtype=np.float32) / 255.0, faces)
    except PoseError as error:
        raise UsageError(f"--pose: {error} (or give --region once per --face, or --layout columns)") from None


def check_models(files: Sequence[str], comfyui: Path, explicit: bool, comfyui_args: Sequence[str]) -> None:
    """Each model file is in a folder the ComfyUI will search (see :mod:`.model_folders`); the error
    for a missing one names the file, the folders and the command that downloads it."""
    folders = comfyui_model_folders(comfyui, comfyui_args)
    for file in files:
        if find_model(folders, file) is None:
            command = download_command(file, comfyui, explicit, comfyui_args)
            fix = f"download it with: {command}" if command else "put it in one of them"
            raise UsageError(f"no model file {file} in the folders ComfyUI searches for Face-diffuser models ({', '.join(map(str, folders))}); {fix}")


class StageProgress:
    """A progress bar over the sampler's steps from ComfyUI's events, named by the stage (scene,
    fusion, subject) of the step just done, then over the Face Detailer's steps (every face's) where
    the graph has one; before sampling it names the node that is running (loading the models takes
    a while)."""

    def __init__(self, graph: JobGraph, steps: int, start_merge: float, final: float) -> None:
        self.graph, self.start_merge, self.final = graph, start_merge, final
        self.bar = tqdm(total=steps, unit="step", desc="queued", dynamic_ncols=True)
        self.detailing = False

    def __call__(self, kind: str, data: dict) -> None:
        node = data.get("node")
        if kind == "executing" and node in self.graph.nodes and self.bar.n == 0:  # until sampling starts
            self.bar.set_description(self.graph.nodes[node].get("_meta", {}).get("title", node))
        elif kind == "progress" and node == self.graph.sampler and data.get("value", 0) >= 1:
            total, value = int(data["max"]), int(data["value"])
            if self.bar.n == 0:  # the first step: the rate shown is the sampling's alone
                self.bar.reset(total)
            stage = stage_at(value - 1, bounds_from_fractions(total, self.start_merge, self.final))
            self.bar.set_description(f"{stage.value} stage", refresh=False)
            self.bar.update(value - self.bar.n)
        elif kind == "progress" and node is not None and node == self.graph.detailer and data.get("value", 0) >= 1:
            if not self.detailing:  # the faces' steps: a bar of their own
                self.detailing = True
                self.bar.reset(int(data["max"]))
                self.bar.set_description("face detail", refresh=False)
            self.bar.update(int(data["value"]) - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def save_outputs(out: Path, images: Sequence[bytes], masks: Sequence[bytes]) -> list[Path]:
    """Write the PNGs as ``facediffuser_NNNNN.png`` (numbered on from the folder's highest) and each
    mask next to its image as ``..._mask.png``; returns the image paths."""
    out.mkdir(parents=True, exist_ok=True)
    numbers = [int(match.group(1)) for path in out.iterdir() if (match := re.fullmatch(rf"{OUTPUT_PREFIX}_(\d+)(?:_mask)?\.png", path.name))]
    first = max(numbers, default=0) + 1
    paths = []
    for index, data in enumerate(images):
        path = out / f"{OUTPUT_PREFIX}_{first + index:05d}.png"
        path.write_bytes(data)
        if index < len(masks):
            path.with_name(f"{path.stem}_mask.png").write_bytes(masks[index])
        paths.append(path)
    return paths


@contextlib.contextmanager
def _comfyui(args: argparse.Namespace, comfyui: Optional[Path]) -> Iterator[str]:
    """``--server``, or the ComfyUI at ``comfyui`` started for this run and stopped after it."""
    if comfyui is None:
        yield args.server
        return
    chosen = split_command(args.comfyui_args)
    added = device_args(chosen)
    if added:
        print(f"no CUDA, MPS or XPU device found: starting ComfyUI with {' '.join(added)} (give a device option in --comfyui-args to choose yourself)", file=sys.stderr)
    launcher = LocalComfyUI(comfyui, [*chosen, *added], args.startup_timeout)
    print(f"starting ComfyUI from {comfyui} on {launcher.server} (its log: {launcher.log})", file=sys.stderr)
    try:
        with launcher as server:
            print(f"ComfyUI is up (pid {launcher.pid})", file=sys.stderr)
            yield server
    except Exception:
        if launcher.log.is_file():
            print(f"ComfyUI stopped; its log of this run is kept: {launcher.log}", file=sys.stderr)
        raise
    print("ComfyUI stopped", file=sys.stderr)


def generate(args: argparse.Namespace) -> int:
    faces = parse_faces(args.face)
    check_photos(faces)
    check_prompt(args.prompt, len(faces))
    _check_settings(args)
    width, height = args.width or args.size, args.height or args.size
    into = None
    if args.into is not None:
        into, height = read_into(args.into, width)
    regions = parse_regions(args.region, args.layout, len(faces), width, height)
    pose = None if args.pose is None else read_pose(args.pose)
    if pose is not None and not regions and args.layout is None:
        regions = pose_regions(pose, len(faces))
    if into is not None and (any(isinstance(region, bytes) for region in regions) or not (regions or args.layout)):
        raise UsageError("--into repaints only where the people go: give each --face's place as a box (--region left, right, centre or n/N, once per --face), --layout columns or --pose; mask images are not taken with --into")
    comfyui = None if args.server else find_comfyui(args.comfyui)
    if comfyui is not None:
        explicit, comfyui_args = bool(args.comfyui or os.environ.get("COMFYUI_PATH")), split_command(args.comfyui_args)
        check_models([args.sdm, args.tdm], comfyui, explicit=explicit, comfyui_args=comfyui_args)
        if args.pose is not None:
            check_controlnet(args.controlnet, comfyui, explicit, comfyui_args)
    margin = None if args.no_crop else DEFAULT_MARGIN
    detector = None if args.no_crop else load_detector("cpu")
    references, crops = [], {}  # each subject's photos as (file stem, PNG crop); a photo given more than once is cropped once
    for number, photos in enumerate(faces, start=1):
        try:
            for photo in photos:
                if photo not in crops:
                    crops[photo] = reference_png(photo, detector, margin)
            references.append([(photo.stem, crops[photo]) for photo in photos])
        except FaceNotFoundError as error:
            raise UsageError(f"--face #{number}: {error}; use another photo, or --no-crop to use it whole") from None
    seed = random.SystemRandom().randrange(2**32) if args.seed is None else args.seed
    print(f"seed {seed}", file=sys.stderr)
    try:
        with _comfyui(args, comfyui) as server:
            client = ComfyClient(server)
            client.check()
            client.check_models([args.sdm, args.tdm])  # what a running --server has (a started one's folders were checked before it started)
            uploaded = tuple(tuple(client.upload(stem, data, UPLOAD_FOLDER) for stem, data in photos) for photos in references)
            placed = tuple(client.upload(f"region{number}", region, UPLOAD_FOLDER) if isinstance(region, bytes) else region for number, region in enumerate(regions, start=1))
            uploaded_pose = None if pose is None else client.upload(args.pose.stem, png_bytes(pose), UPLOAD_FOLDER)
            uploaded_into = None if into is None else client.upload(args.into.stem, png_bytes(into), UPLOAD_FOLDER)
            job = Generation(
                args.prompt, uploaded, negative=args.negative, seed=seed, steps=args.steps, cfg=args.cfg,
                start_merge=args.start_merge, final=args.final, width=width, height=height,
                batch=args.batch, sampler=args.sampler, scheduler=args.scheduler, sdm=args.sdm, tdm=args.tdm,
                filename_prefix=f"{UPLOAD_FOLDER}/{OUTPUT_PREFIX}", combine=args.combine, detail=args.detail_denoise if args.detail else None, regions=placed, layout=args.layout,
                pose=uploaded_pose, controlnet=args.controlnet, control_strength=args.control_strength, into=uploaded_into,
            )  # fmt: skip
            graph = build_graph(job)
            progress = StageProgress(graph, job.steps, job.start_merge, job.final)
            try:
                entry = client.run(graph.nodes, args.timeout, progress)
            finally:
                progress.close()
            images = client.images(entry, graph.images)
            masks = client.images(entry, graph.masks) if graph.masks else []
    except KeyboardInterrupt:
        where = "the ComfyUI started for it was stopped" if comfyui else f"its job was taken off {args.server}"
        print(f"interrupted: nothing was saved; {where}", file=sys.stderr)
        return 130
    if len(images) != job.batch:
        raise JobError(f"ComfyUI saved {len(images)} images, expected {job.batch}")
    for path in save_outputs(args.out, images, masks):
        print(path)
    return 0
