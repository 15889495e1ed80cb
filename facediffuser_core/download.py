"""``python -m facediffuser_core download``: the official model files from the Hugging Face Hub,
converted to safetensors in the folder ComfyUI loads them from.

Each ``pytorch_model.bin`` comes through ``huggingface_hub`` (its resume, progress bars, ``HF_ENDPOINT``
and ``HF_TOKEN``) into a staging folder next to the model folder (``models/.facediffuser-download``:
outside the folder ComfyUI lists, so an unverified file is never offered). Before the first byte, the
free space is checked for what is left to download plus the converted files. A downloaded file is
checked against the size and, for large (LFS) files, the SHA-256 the hub reports; one that does not
match is removed and never converted. The converter writes the final name last (verified, renamed
into place), so a name in the model folder always holds a complete file: a file already there is not
fetched again.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .checkpoints import ModelKind
from .comfy_client import DEFAULT_SDM, DEFAULT_TDM
from .comfy_launch import find_comfyui
from .errors import FaceDiffuserError
from .model_folders import MODEL_FOLDER, comfyui_model_folders

__all__ = ["HubModel", "MODELS", "DownloadError", "add_arguments", "selected", "free_bytes", "space_needed", "download"]

FACEDIFFUSER_LICENSE = "non-commercial academic use only (https://github.com/CodeGoat24/Face-diffuser#-license)"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HASH_BLOCK = 2**24  # bytes read at a time while hashing


class DownloadError(FaceDiffuserError):
    """A download that cannot start or whose file does not match what the hub reports."""


@dataclass(frozen=True)
class HubModel:
    """One official file on the hub and the name it gets, converted, in the model folder."""

    repo_id: str
    filename: str  # in the repository
    target: str  # the converted file's name in the model folder
    kind: ModelKind
    license: str
    original: str  # where --keep-original puts the .bin, in the model folder (a name the converter and the Loader understand)


MODELS = {
    "sdm": HubModel("CodeGoat24/Face-diffuser", "SDM/pytorch_model.bin", DEFAULT_SDM, ModelKind.SDM, FACEDIFFUSER_LICENSE, "SDM/pytorch_model.bin"),
    "tdm": HubModel("CodeGoat24/Face-diffuser", "TDM/pytorch_model.bin", DEFAULT_TDM, ModelKind.TDM, FACEDIFFUSER_LICENSE, "TDM/pytorch_model.bin"),
    "fastcomposer": HubModel(
        "mit-han-lab/fastcomposer", "pytorch_model.bin", "fastcomposer.safetensors", ModelKind.FASTCOMPOSER,
        "MIT license (https://github.com/mit-han-lab/fastcomposer)", "fastcomposer/pytorch_model.bin",
    ),
}  # fmt: skip
GROUPS = {"facediffuser": ("sdm", "tdm"), "fastcomposer": ("fastcomposer",)}  # command-line flag -> models


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--facediffuser", action="store_true", help="Face-diffuser's SDM and TDM (the default when no model is named)")
    parser.add_argument("--fastcomposer", action="store_true", help="FastComposer's model (MIT license) as fastcomposer.safetensors")
    parser.add_argument("--all", action="store_true", help="every model above")
    parser.add_argument("--to", type=Path, metavar="DIR", help="the folder to write to (default: ComfyUI's models/facediffuser, or its folder from extra_model_paths.yaml)")
    parser.add_argument("--comfyui", type=Path, metavar="PATH", help="the ComfyUI whose model folder to fill (default: $COMFYUI_PATH, else the ComfyUI this pack is installed in)")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32", "keep"], default="fp16", help="floating-point dtype to store (default fp16, as convert)")
    parser.add_argument("--keep-original", action="store_true", help="keep each downloaded pytorch_model.bin (as SDM/, TDM/ or fastcomposer/pytorch_model.bin in the folder) instead of removing it after the conversion")


def selected(args: argparse.Namespace) -> list[str]:
    """The models the flags name, in MODELS order (Face-diffuser's when none is named)."""
    groups = [group for group in GROUPS if args.all or getattr(args, group)] or ["facediffuser"]
    return [name for name in MODELS if any(name in GROUPS[group] for group in groups)]


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or would: its nearest existing folder)."""
    existing = next(folder for folder in [path, *path.parents] if folder.exists())
    return shutil.disk_usage(existing).free


def _device(path: Path) -> int:
    return next(folder for folder in [path, *path.parents] if folder.exists()).stat().st_dev


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB"


def _is_complete(path: Path) -> bool:
    """Whether ``path`` holds a readable safetensors file (the converter only ever renames a verified
    one into place); a file under that name that is not one is an error, not something to overwrite."""
    if not path.exists():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as model:
            model.keys()
    except Exception as error:  # safetensors raises its own SafetensorError
        raise DownloadError(f"{path} exists but is not a readable safetensors file ({error}); remove it and run the command again") from None
    return True


@dataclass
class _Fetch:
    """A model to download: the hub's size and ETag (the SHA-256 for LFS files) and the bytes
    already in the staging folder from an earlier run."""

    name: str
    model: HubModel
    size: int
    etag: str
    have: int


def _staging(folder: Path) -> Path:
    return folder.parent / f".{folder.name}-download"


def _is_download(relative: Path) -> bool:
    """Whether a file in the staging folder is (part of) a download rather than huggingface_hub's
    bookkeeping in ``.cache/`` (locks, metadata)."""
    return relative.parts[0] != ".cache" or relative.name.endswith(".incomplete")


def _partial_bytes(staging: Path, model: HubModel, etag: str, size: int) -> int:
    """Bytes of ``model`` already in ``staging``: a whole file, or a cut-off download that resumes."""
    from huggingface_hub._local_folder import get_local_download_paths

    if not staging.is_dir():
        return 0  # (get_local_download_paths makes its folders)
    paths = get_local_download_paths(staging, model.filename)
    if paths.file_path.is_file() and paths.file_path.stat().st_size == size:
        return size
    incomplete = paths.incomplete_path(etag)
    return incomplete.stat().st_size if incomplete.is_file() else 0


def _metadata(model: HubModel, staging: Path, name: str) -> _Fetch:
    """HEAD the file on the hub (HF_ENDPOINT, HF_TOKEN apply)."""
    import requests
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    endpoint = os.environ.get("HF_ENDPOINT")
    try:
        meta = get_hf_file_metadata(hf_hub_url(model.repo_id, model.filename, endpoint=endpoint), endpoint=endpoint)
    except requests.RequestException as error:
        raise DownloadError(
            f"cannot reach {model.filename} of {model.repo_id} on the hub ({error}); check the connection "
            "(HF_ENDPOINT for a mirror, HF_TOKEN for a token)"
        ) from None
    if meta.size is None or meta.etag is None:
        raise DownloadError(f"the hub reported no size or ETag for {model.filename} of {model.repo_id}; nothing can be verified, so nothing was downloaded")
    return _Fetch(name, model, meta.size, meta.etag, _partial_bytes(staging, model, meta.etag, meta.size))


def _output_bytes(size: int, dtype: str) -> int:
    """About the size of the converted file: the official files hold float32."""
    return size // 2 if dtype in ("fp16", "bf16") else size


def space_needed(fetches: Sequence[_Fetch], dtype: str, keep: bool) -> int:
    """The most extra bytes the downloads and conversions hold at once: models go one at a time, and
    each .bin is removed after its conversion unless kept."""
    done = peak = 0
    for fetch in fetches:
        converted = _output_bytes(fetch.size, dtype)
        peak = max(peak, done + fetch.size - fetch.have + converted)
        done += converted + (fetch.size - fetch.have if keep else 0)
    return peak


def _check_space(fetches: Sequence[_Fetch], staging: Path, folder: Path, dtype: str, keep: bool) -> None:
    """Refuse to start when the model folder's filesystem (or the staging folder's, where that is
    another one) has less room than :func:`space_needed`."""
    need = space_needed(fetches, dtype, keep)
    for path in {_device(path): path for path in (staging, folder)}.values():  # the folder's name where both share a disk
        free = free_bytes(path)
        if need > free:
            raise DownloadError(
                f"not enough free space: {len(fetches)} model(s) to download and convert need {_gb(need)} "
                f"({_gb(sum(f.size - f.have for f in fetches))} still to download, about "
                f"{_gb(sum(_output_bytes(f.size, dtype) for f in fetches))} converted) but {path} has {_gb(free)} free; "
                "free some space, or pass --to DIR on a disk with room"
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
    """The downloaded file has the hub's size and (for LFS files) SHA-256; else it is removed."""
    size = path.stat().st_size
    problem = f"has {size} bytes, the hub reports {fetch.size}" if size != fetch.size else None
    if problem is None and _SHA256.match(fetch.etag):
        digest = _sha256(path)
        problem = f"has SHA-256 {digest}, the hub reports {fetch.etag}" if digest != fetch.etag else None
    if problem:
        path.unlink()
        raise DownloadError(
            f"{fetch.model.filename} of {fetch.model.repo_id} {problem}: it was removed and nothing was converted; "
            "run the command again to download it anew"
        )


def _fetch(fetch: _Fetch, staging: Path) -> Path:
    """Download (or resume) one file into ``staging`` with huggingface_hub."""
    import requests
    from huggingface_hub import hf_hub_download

    print(f"license of {fetch.model.repo_id}: {fetch.model.license}")
    resume = f", resuming at {_gb(fetch.have)}" if 0 < fetch.have < fetch.size else ""
    print(f"downloading {fetch.model.filename} of {fetch.model.repo_id} ({_gb(fetch.size)}{resume})")
    try:
        return Path(hf_hub_download(fetch.model.repo_id, fetch.model.filename, local_dir=staging, endpoint=os.environ.get("HF_ENDPOINT")))
    except (requests.RequestException, OSError) as error:  # a dropped connection; huggingface_hub's size check
        raise DownloadError(f"the download of {fetch.model.filename} of {fetch.model.repo_id} stopped ({error}); run the command again to resume it") from None


def destination(args: argparse.Namespace) -> Path:
    """``--to``, else the first folder the ComfyUI searches for Face-diffuser models."""
    return args.to if args.to else comfyui_model_folders(find_comfyui(args.comfyui))[0]


def download(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint

    folder = destination(args)
    staging = _staging(folder)
    names = selected(args)
    pending = []
    for name in names:
        target = folder / MODELS[name].target
        if _is_complete(target):
            print(f"{target} is already there: nothing to download")
        else:
            pending.append(name)
    fetches = [_metadata(MODELS[name], staging, name) for name in pending]
    _check_space(fetches, staging, folder, args.dtype, args.keep_original)
    try:
        for fetch in fetches:
            original = _fetch(fetch, staging)
            _verify(original, fetch)
            report = convert_checkpoint(original, folder / fetch.model.target, dtype=None if args.dtype == "keep" else args.dtype, kind=fetch.model.kind)
            print(f"wrote {report.dst} ({report.kind.description}, {_gb(report.output_bytes)}), verified")
            if args.keep_original:
                kept = folder / fetch.model.original
                kept.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(original, kept)
                print(f"kept the original as {kept}")
            else:
                original.unlink()
    except KeyboardInterrupt:
        print("interrupted: nothing half-written is left in the model folder; run the command again to resume the download", flush=True)
        return 130
    if staging.is_dir() and not any(_is_download(path.relative_to(staging)) for path in staging.rglob("*") if path.is_file()):
        shutil.rmtree(staging)  # only huggingface_hub's bookkeeping is left
    print(f"the models are in {folder}")
    return 0
