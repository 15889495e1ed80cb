"""``python -m facediffuser_core download``: the official model files, ready in the folders ComfyUI
loads them from.

Face-diffuser's (and FastComposer's) ``pytorch_model.bin`` are converted to safetensors; the score
models are stored as published: CLIP ViT-L/14's Hugging Face folder in ``models/clip_eval`` and
FaceNet's VGGFace2 weights (a facenet-pytorch release file, not on the hub) in ``models/facenet``.
Every file comes through a ranged HTTP GET (``requests``) into a ``.incomplete`` file that the next
run resumes: hub files at the address and with the headers ``huggingface_hub``'s public API gives
(``hf_hub_url``, ``get_hf_file_metadata``, ``build_hf_headers``: ``HF_ENDPOINT``, ``HF_TOKEN`` or a
stored login apply), the FaceNet file at its release URL (``FACEDIFFUSER_FACENET_URL`` names a
mirror). huggingface_hub's own ``hf_hub_download`` is not used: from 2.0 on it deletes a cut-off
file, so a run stopped by Ctrl-C would start over. Each goes into a staging folder next to its model
folder (``models/.facediffuser-download``: outside the folder ComfyUI lists, so an unverified file is
never offered). Before the first byte, the free space is checked for what is left to download plus
the converted files. A downloaded file is checked against the size and, for large (LFS) hub files,
the SHA-256 the hub reports; one that does not match is removed and never converted. A file reaches
its final name last (verified, renamed into place), so a name in the model folder always holds a
complete file: a file already there is not fetched again.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..errors import CheckpointError, FaceDiffuserError
from ..weights.checkpoints import ModelKind
from ..weights.model_folders import (
    CLIP_EVAL_FOLDER,
    CLIP_TOKENIZER_FILES,
    FACENET_FOLDER,
    FACENET_WEIGHTS,
    MODEL_FOLDER,
    PACK,
    comfyui_model_folders,
    desktop_app_config,
)
from .comfy_client import DEFAULT_CONTROLNET, DEFAULT_SDM, DEFAULT_TDM
from .comfy_launch import find_comfyui, user_folder

__all__ = ["HubModel", "MODELS", "DEFAULT_CLIP_EVAL", "DownloadError", "add_arguments", "selected", "free_bytes", "space_needed", "download"]

FACEDIFFUSER_LICENSE = "non-commercial academic use only (https://github.com/CodeGoat24/Face-diffuser#-license)"
FACENET_RELEASE = f"https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/{FACENET_WEIGHTS}"  # where facenet-pytorch itself fetches it
FACENET_URL_VARIABLE = "FACEDIFFUSER_FACENET_URL"  # a mirror of FACENET_RELEASE
DEFAULT_CLIP_EVAL = "clip-vit-large-patch14/model.safetensors"  # in models/clip_eval: what the score nodes and evaluate pick
CONTROLNET_FOLDER = "controlnet"  # ComfyUI's own folder for ControlNets (Load ControlNet Model)
CONTROLNET_LICENSE = "OpenRAIL license (https://huggingface.co/lllyasviel/ControlNet-v1-1); fp16 copy by comfyanonymous"
CONTROLNETS = {"openpose": "controlnet_openpose"}  # --controlnet NAME -> model
_CHUNK = 2**20  # bytes written at a time by the FaceNet download
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HASH_BLOCK = 2**24  # bytes read at a time while hashing


class DownloadError(FaceDiffuserError):
    """A download that cannot start or whose file does not match what the hub reports."""


@dataclass(frozen=True)
class HubModel:
    """One official weights file (on the hub, or at ``url``) and the name it gets in its model folder:
    converted by the pack's converter where ``kind`` is set, else stored as published."""

    repo_id: str
    filename: str  # in the repository (the file name of ``url``)
    target: str  # its name in the model folder (the converted file's, for a ``kind``)
    license: str
    kind: Optional[ModelKind] = None
    original: str = ""  # where --keep-original puts a converted model's .bin, in the model folder (a name the converter and the Loader understand)
    folder: str = MODEL_FOLDER  # the ComfyUI model folder (folder_paths name)
    extras: tuple[str, ...] = ()  # small files of the repository that go next to ``target`` (a Hugging Face model folder)
    url: Optional[str] = None  # a file outside the hub, fetched over plain HTTP(S)

    def describe(self) -> str:
        return f"{self.filename} of {self.repo_id}"

    def source(self) -> Optional[str]:
        """The URL of a file outside the hub (its mirror where one is set), None for a hub file."""
        return os.environ.get(FACENET_URL_VARIABLE) or self.url if self.url else None


MODELS = {
    "sdm": HubModel("CodeGoat24/Face-diffuser", "SDM/pytorch_model.bin", DEFAULT_SDM, FACEDIFFUSER_LICENSE, ModelKind.SDM, "SDM/pytorch_model.bin"),
    "tdm": HubModel("CodeGoat24/Face-diffuser", "TDM/pytorch_model.bin", DEFAULT_TDM, FACEDIFFUSER_LICENSE, ModelKind.TDM, "TDM/pytorch_model.bin"),
    "fastcomposer": HubModel(
        "mit-han-lab/fastcomposer", "pytorch_model.bin", "fastcomposer.safetensors",
        "MIT license (https://github.com/mit-han-lab/fastcomposer)", ModelKind.FASTCOMPOSER, "fastcomposer/pytorch_model.bin",
    ),
    "facenet": HubModel(
        "timesler/facenet-pytorch", FACENET_WEIGHTS, FACENET_WEIGHTS,
        "MIT license (https://github.com/timesler/facenet-pytorch); trained on VGGFace2: check that dataset's terms for your use",
        folder=FACENET_FOLDER, url=FACENET_RELEASE,
    ),
    "clip": HubModel(
        "openai/clip-vit-large-patch14", "model.safetensors", DEFAULT_CLIP_EVAL,
        "MIT license (https://github.com/openai/CLIP/blob/main/LICENSE); intended for research (see its model card)",
        folder=CLIP_EVAL_FOLDER, extras=("config.json", *CLIP_TOKENIZER_FILES),
    ),
    "controlnet_openpose": HubModel(
        "comfyanonymous/ControlNet-v1-1_fp16_safetensors", DEFAULT_CONTROLNET, DEFAULT_CONTROLNET, CONTROLNET_LICENSE, folder=CONTROLNET_FOLDER,
    ),
}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--facediffuser", action="store_true", help="Face-diffuser's SDM and TDM (the default when no model is named)")
    parser.add_argument("--fastcomposer", action="store_true", help="FastComposer's model (MIT license) as fastcomposer.safetensors")
    parser.add_argument("--scores", action="store_true", help=f"the score models of evaluate and the score nodes: FaceNet VGGFace2 into models/{FACENET_FOLDER}, CLIP ViT-L/14 into models/{CLIP_EVAL_FOLDER}")
    parser.add_argument("--facenet", action="store_true", help=f"only FaceNet VGGFace2 ({FACENET_WEIGHTS}) of --scores")
    parser.add_argument("--clip", action="store_true", help=f"only CLIP ViT-L/14 ({DEFAULT_CLIP_EVAL}) of --scores")
    parser.add_argument("--all", action="store_true", help="every model above")
    parser.add_argument(
        "--controlnet", action="append", choices=sorted(CONTROLNETS), default=[],
        help=f"an SD1.5 ControlNet into ComfyUI's models/{CONTROLNET_FOLDER}, for the Face-diffuser Apply ControlNet node: openpose "
        f"({MODELS['controlnet_openpose'].target}); repeatable; not part of --all",
    )  # fmt: skip
    parser.add_argument(
        "--to", type=Path, metavar="DIR",
        help=f"the folder to write to (default: ComfyUI's models/{MODEL_FOLDER}, models/{FACENET_FOLDER} or models/{CLIP_EVAL_FOLDER}, or their "
        "folders from extra_model_paths.yaml); one folder, so only with models that share one",
    )  # fmt: skip
    parser.add_argument("--comfyui", type=Path, metavar="PATH", help="the ComfyUI whose model folders to fill (default: $COMFYUI_PATH, else the ComfyUI this pack is installed in)")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32", "keep"], default="fp16", help="floating-point dtype to store the converted models in (default fp16, as convert)")
    parser.add_argument("--keep-original", action="store_true", help="keep each downloaded pytorch_model.bin (as SDM/, TDM/ or fastcomposer/pytorch_model.bin in the folder) instead of removing it after the conversion")


GROUPS = {"facediffuser": ("sdm", "tdm"), "fastcomposer": ("fastcomposer",), "scores": ("facenet", "clip"), "facenet": ("facenet",), "clip": ("clip",)}  # flag -> models


def selected(args: argparse.Namespace) -> list[str]:
    """The models the flags name, in MODELS order (Face-diffuser's when none is named)."""
    controlnets = {CONTROLNETS[name] for name in args.controlnet}
    groups = [group for group in GROUPS if args.all or getattr(args, group)] or ([] if controlnets else ["facediffuser"])
    return [name for name in MODELS if name in controlnets or any(name in GROUPS[group] for group in groups)]


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or would: its nearest existing folder)."""
    existing = next(folder for folder in [path, *path.parents] if folder.exists())
    return shutil.disk_usage(existing).free


def _device(path: Path) -> int:
    return next(folder for folder in [path, *path.parents] if folder.exists()).stat().st_dev


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB"


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as model:
            model.keys()
    except Exception as error:  # safetensors raises its own SafetensorError
        raise DownloadError(f"{path} exists but is not a readable safetensors file ({error}); remove it and run the command again") from None


def _is_complete(path: Path, model: HubModel) -> bool:
    """Whether ``path`` holds the model: only a verified file is ever renamed into place, so a file
    under that name is complete (a .safetensors one is still read, since a file under that name that
    is not one is an error, not something to overwrite), with the ``extras`` next to it."""
    if not path.exists():
        return False
    if path.suffix == ".safetensors":
        _check_safetensors(path)
    return all((path.parent / extra).is_file() for extra in model.extras)


@dataclass
class _Fetch:
    """A model to download into ``folder``: the hub's (or server's) size, its ETag (the SHA-256 for
    LFS files; empty where none) and the bytes already in the staging folder from an earlier run."""

    name: str
    model: HubModel
    size: int
    etag: str
    have: int
    folder: Path = Path()

    @property
    def staging(self) -> Path:
        return _staging(self.folder)


def _staging(folder: Path) -> Path:
    return folder.parent / f".{folder.name}-download"


def _paths(staging: Path, filename: str) -> tuple[Path, Path]:
    """(the whole file, the cut-off download) of ``filename`` (a path in its repository) in ``staging``."""
    return staging / filename, staging / f"{filename}.incomplete"


def _partial_bytes(staging: Path, model: HubModel, size: int) -> int:
    """Bytes of ``model`` already in ``staging``: a whole file, or a cut-off download that resumes."""
    whole, incomplete = _paths(staging, model.filename)
    if whole.is_file() and whole.stat().st_size == size:
        return size
    return incomplete.stat().st_size if incomplete.is_file() else 0


def network_errors() -> tuple[type[BaseException], ...]:
    """What a request that fails for want of a network or a good answer raises: ``requests``' errors
    (the FaceNet file, every GET, and huggingface_hub < 1.0), the hub's own HTTP errors, and the
    transport errors of the HTTP library of huggingface_hub 1.x (``httpx``) or 2.x (``httpx2``)."""
    import requests
    from huggingface_hub.errors import HfHubHTTPError

    errors: list[type[BaseException]] = [requests.RequestException, HfHubHTTPError]
    for library in ("httpx", "httpx2"):
        try:
            errors.append(importlib.import_module(library).HTTPError)
        except (ImportError, AttributeError):
            pass  # not installed: huggingface_hub does not use it
    return tuple(errors)


def _hub_url(repo_id: str, filename: str) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo_id, filename, endpoint=os.environ.get("HF_ENDPOINT"))


def _hub_headers() -> dict[str, str]:
    """The hub's request headers: user agent and the token (HF_TOKEN, or a stored login)."""
    from huggingface_hub.utils import build_hf_headers

    return build_hf_headers()


def _hub_metadata(repo_id: str, filename: str) -> tuple[Optional[int], Optional[str]]:
    """(size, ETag) of a file on the hub: a HEAD request through huggingface_hub."""
    from huggingface_hub import get_hf_file_metadata

    meta = get_hf_file_metadata(_hub_url(repo_id, filename), endpoint=os.environ.get("HF_ENDPOINT"))
    return meta.size, meta.etag


def _metadata(model: HubModel, folder: Path, name: str) -> _Fetch:
    """HEAD the file on the hub (HF_ENDPOINT, HF_TOKEN apply), or at its URL."""
    import requests

    url = model.source()
    try:
        if url:
            response = requests.head(url, allow_redirects=True, timeout=30)
            response.raise_for_status()
            size, etag = response.headers.get("Content-Length"), ""
            size = int(size) if size and size.isdigit() else None
        else:
            size, etag = _hub_metadata(model.repo_id, model.filename)
    except network_errors() as error:
        fix = f"{FACENET_URL_VARIABLE} for a mirror" if url else "HF_ENDPOINT for a mirror, HF_TOKEN for a token"
        where = f"at {url}" if url else "on the hub"
        raise DownloadError(f"cannot reach {model.describe()} {where} ({error}); check the connection ({fix})") from None
    if size is None or etag is None:
        raise DownloadError(f"{url or 'the hub'} reported no size or ETag for {model.describe()}; nothing can be verified, so nothing was downloaded")
    return _Fetch(name, model, size, etag, _partial_bytes(_staging(folder), model, size), folder)


def _output_bytes(size: int, dtype: str) -> int:
    """About the size of the converted file: the official files hold float32."""
    return size // 2 if dtype in ("fp16", "bf16") else size


def space_needed(fetches: Sequence[_Fetch], dtype: str, keep: bool) -> int:
    """The most extra bytes the downloads and conversions hold at once: models go one at a time, each
    .bin is removed after its conversion unless kept, and a model stored as published is moved (its
    download becomes the file)."""
    done = peak = 0
    for fetch in fetches:
        new = fetch.size - fetch.have
        converted = _output_bytes(fetch.size, dtype) if fetch.model.kind else 0
        peak = max(peak, done + new + converted)
        done += converted + (new if keep or not fetch.model.kind else 0)
    return peak


def _check_space(fetches: Sequence[_Fetch], dtype: str, keep: bool) -> None:
    """Refuse to start when a filesystem that a model folder (or its staging folder) is on has less
    room than :func:`space_needed` (of every model, as if all shared one disk)."""
    need = space_needed(fetches, dtype, keep)
    paths = [path for fetch in fetches for path in (fetch.staging, fetch.folder)]
    for path in {_device(path): path for path in reversed(paths)}.values():  # the folder's name where both share a disk
        free = free_bytes(path)
        if need > free:
            converted = sum(_output_bytes(f.size, dtype) for f in fetches if f.model.kind)
            raise DownloadError(
                f"not enough free space: {len(fetches)} model(s) to download{' and convert' if converted else ''} need {_gb(need)} "
                f"({_gb(sum(f.size - f.have for f in fetches))} still to download{f', about {_gb(converted)} converted' if converted else ''}) "
                f"but {path} has {_gb(free)} free; free some space, or pass --to DIR on a disk with room"
            )


def _sha256(path: Path) -> str:
    from tqdm import tqdm

    digest = hashlib.sha256()
    with open(path, "rb") as source, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc="sha256") as bar:
        while block := source.read(_HASH_BLOCK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _verify(path: Path, fetch: _Fetch) -> None:
    """The downloaded file has the reported size and (for LFS files) SHA-256; else it is removed."""
    size = path.stat().st_size
    problem = f"has {size} bytes, {fetch.model.source() or 'the hub'} reports {fetch.size}" if size != fetch.size else None
    if problem is None and _SHA256.match(fetch.etag):
        digest = _sha256(path)
        problem = f"has SHA-256 {digest}, the hub reports {fetch.etag}" if digest != fetch.etag else None
    if problem:
        path.unlink()
        raise DownloadError(f"{fetch.model.describe()} {problem}: it was removed and nothing was converted; run the command again to download it anew")


def _get(url: str, whole: Path, incomplete: Path, size: int, headers: Optional[dict[str, str]] = None) -> None:
    """Download ``url`` into ``incomplete``, resuming it with a ranged GET, then rename it ``whole``.
    ``headers`` go with the request (redirects to another host drop the token, as requests does)."""
    import requests
    from tqdm import tqdm

    have = incomplete.stat().st_size if incomplete.is_file() else 0
    incomplete.parent.mkdir(parents=True, exist_ok=True)
    if have < size:  # (a run stopped between the last byte and the rename has nothing left to fetch)
        ranged = {**(headers or {}), **({"Range": f"bytes={have}-"} if have else {})}
        with requests.get(url, headers=ranged, stream=True, timeout=30) as response:
            response.raise_for_status()
            have = have if response.status_code == 206 else 0  # a server that ignores the range sends it all
            with open(incomplete, "ab" if have else "wb") as out, tqdm(total=size, initial=have, unit="B", unit_scale=True, desc=whole.name) as bar:
                for chunk in response.iter_content(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
    if incomplete.stat().st_size < size:
        raise requests.ConnectionError(f"the connection closed after {incomplete.stat().st_size} of {size} bytes")
    incomplete.replace(whole)


def _fetch(fetch: _Fetch) -> Path:
    """Download (or resume) one file into its staging folder: from the hub, or by URL."""
    model, staging = fetch.model, fetch.staging
    print(f"license of {model.repo_id}: {model.license}")
    resume = f", resuming at {_gb(fetch.have)}" if 0 < fetch.have < fetch.size else ""
    print(f"downloading {model.describe()} ({_gb(fetch.size)}{resume})")
    whole, incomplete = _paths(staging, model.filename)
    try:
        if not whole.is_file():
            url, headers = (model.source(), None) if model.url else (_hub_url(model.repo_id, model.filename), _hub_headers())
            _get(url, whole, incomplete, fetch.size, headers)
        return whole
    except (*network_errors(), OSError) as error:  # a dropped connection; a full disk
        raise DownloadError(f"the download of {model.describe()} stopped ({error}); run the command again to resume it") from None


def _fetch_extra(model: HubModel, extra: str, staging: Path) -> Path:
    """One small file of ``model``'s repository (``extras``), downloaded into ``staging``."""
    whole, incomplete = _paths(staging, extra)
    try:
        size, _ = _hub_metadata(model.repo_id, extra)
        if size is None:
            raise DownloadError(f"the hub reported no size for {extra} of {model.repo_id}; nothing can be verified, so nothing was stored")
        _get(_hub_url(model.repo_id, extra), whole, incomplete, size, _hub_headers())
    except (*network_errors(), OSError) as error:
        raise DownloadError(f"the download of {extra} of {model.repo_id} stopped ({error}); run the command again to resume it") from None
    return whole


def _place(source: Path, target: Path) -> None:
    """Move a verified file to ``target``: next to it first, then renamed, so the name only ever
    holds a whole file (also where the staging folder is on another filesystem)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    moving = target.with_name(f".{target.name}.moving")
    shutil.move(source, moving)
    moving.replace(target)


def _check_published(path: Path, model: HubModel) -> None:
    """A model stored as published loads as what it is meant to be, before it gets its final name."""
    from ..faces.identity import load_facenet  # torch and PIL: only when a FaceNet file is stored

    try:
        if model.folder == FACENET_FOLDER:
            load_facenet(path)
        else:
            _check_safetensors(path)
    except (CheckpointError, DownloadError) as error:
        path.unlink()
        raise DownloadError(f"{model.describe()} was downloaded but does not load ({error}); it was removed: run the command again") from None


def _store(fetch: _Fetch, original: Path, args: argparse.Namespace) -> None:
    """Convert a downloaded model into its folder (keeping or removing the .bin), or store it as published
    with its extras."""
    from ..weights.convert import convert_checkpoint

    model, target = fetch.model, fetch.folder / fetch.model.target
    if model.kind is None:
        _check_published(original, model)
        for extra in model.extras:
            _place(_fetch_extra(model, extra, fetch.staging), target.parent / extra)
        _place(original, target)
        print(f"wrote {target} ({_gb(target.stat().st_size)}), verified")
        return
    report = convert_checkpoint(original, target, dtype=None if args.dtype == "keep" else args.dtype, kind=model.kind)
    print(f"wrote {report.dst} ({report.kind.description}, {_gb(report.output_bytes)}), verified")
    if args.keep_original:
        kept = fetch.folder / model.original
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(original, kept)
        print(f"kept the original as {kept}")
    else:
        original.unlink()


def _verified(fetch: _Fetch) -> Path:
    original = _fetch(fetch)
    _verify(original, fetch)
    return original


def destinations(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Path]:
    """Each model's folder: ``--to``, else the first folder the ComfyUI searches for its kind (where
    the pack is in the desktop app's user folder, that folder's and those of the app's
    extra_models_config.yaml, as the app's ComfyUI searches them)."""
    kinds = sorted({MODELS[name].folder for name in names})
    if args.to:
        if len(kinds) > 1:
            raise DownloadError(f"--to names one folder, but these models go in {len(kinds)} ({', '.join(kinds)}); download them in separate commands, each with its --to")
        return {name: args.to for name in names}
    base = None if args.comfyui or os.environ.get("COMFYUI_PATH") else user_folder(PACK, os.environ.get("PWD"))
    if base is None:
        comfyui, comfyui_args = find_comfyui(args.comfyui, pack=PACK), []
    else:  # the desktop app's user folder: its models/ is the base directory's, after the app's own model folders
        config = desktop_app_config()
        comfyui, comfyui_args = base, ["--extra-model-paths-config", str(config)] if config.is_file() else []
        print(f"this pack is in the ComfyUI user folder {base}: downloading into its model folders" + (f" (and those of {config})" if comfyui_args else ""))
    return {name: comfyui_model_folders(comfyui, comfyui_args, name=MODELS[name].folder)[0] for name in names}


def download(args: argparse.Namespace) -> int:
    names = selected(args)
    folders = destinations(args, names)
    pending = []
    for name in names:
        target = folders[name] / MODELS[name].target
        if _is_complete(target, MODELS[name]):
            print(f"{target} is already there: nothing to download")
        else:
            pending.append(name)
    fetches = [_metadata(MODELS[name], folders[name], name) for name in pending]
    _check_space(fetches, args.dtype, args.keep_original)
    try:
        for fetch in fetches:
            _store(fetch, _verified(fetch), args)
    except KeyboardInterrupt:
        print("interrupted: nothing half-written is left in the model folder; run the command again to resume the download", flush=True)
        return 130
    for staging in {fetch.staging for fetch in fetches}:
        if staging.is_dir() and not any(path.is_file() for path in staging.rglob("*")):
            shutil.rmtree(staging)  # only empty folders are left
    for folder in dict.fromkeys(folders.values()):
        print(f"the models are in {folder}")
    return 0

