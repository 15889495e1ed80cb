"""Reading Face-diffuser SDM / TDM checkpoints and splitting them into components.

The official files (``SDM/pytorch_model.bin``, ``TDM/pytorch_model.bin``) are pickled state
dicts mixing float32 and bfloat16, with the keys
``unet.*`` (diffusers UNet2DConditionModel), ``text_encoder.*`` (CLIP text model without
the ``text_model.`` level), ``vae.*`` (diffusers AutoencoderKL) and, in the SDM only,
``image_encoder.vision_model.*``, ``image_encoder.visual_projection.*``, ``postfuse_module.*``.
Converted ``.safetensors`` files keep the same keys. Pickles are read with
``torch.load(weights_only=True)`` only: one that needs code execution is refused.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

import torch

from ..errors import CheckpointError

__all__ = [
    "ModelKind",
    "FaceDiffuserCheckpoint",
    "resolve_checkpoint_path",
    "read_state_dict",
    "classify",
    "split_checkpoint",
    "load_checkpoint",
]

PathLike = Union[str, Path]
StateDict = dict[str, torch.Tensor]

OFFICIAL_FILENAME = "pytorch_model.bin"
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt"}
SAFETENSORS_SUFFIXES = {".safetensors", ".sft"}

UNET, TEXT_ENCODER, VAE = "unet.", "text_encoder.", "vae."
IMAGE_ENCODER, POSTFUSE = "image_encoder.", "postfuse_module."
_SUBJECT_PREFIXES = (IMAGE_ENCODER, POSTFUSE)
_SUBJECT_PARTS = (IMAGE_ENCODER + "vision_model.", IMAGE_ENCODER + "visual_projection.", POSTFUSE)
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format since torch 1.6; older files are a bare pickle
_DERIVED_BUFFERS = ("embeddings.position_ids",)  # saved by old transformers, rebuilt on load


class ModelKind(str, Enum):
    SDM = "SDM"  # subject-augmented model: UNet + text encoder + VAE + image encoder + postfuse
    TDM = "TDM"  # text-driven model: UNet + text encoder + VAE
    FASTCOMPOSER = "FastComposer"  # FastComposer's one model: exactly the SDM's components and keys

    @property
    def description(self) -> str:
        return {
            ModelKind.SDM: "subject-augmented model (SDM)",
            ModelKind.TDM: "text-driven model (TDM)",
            ModelKind.FASTCOMPOSER: "FastComposer model (the SDM's layout)",
        }[self]

    @property
    def layout(self) -> "ModelKind":
        """The kind whose components and keys this kind's files have (SDM or TDM)."""
        return ModelKind.SDM if self is ModelKind.FASTCOMPOSER else self


@dataclass
class FaceDiffuserCheckpoint:
    """One SDM or TDM split into components, each a state dict with its own key layout.

    ``unet``: diffusers UNet2DConditionModel keys; ``text_encoder``: transformers
    CLIPTextModel keys (``text_model.*``); ``vae``: diffusers AutoencoderKL keys;
    ``subject_encoder`` (SDM only): :class:`~facediffuser_core.method.subject_encoder.SubjectEncoder`
    keys (``image_encoder.*``, ``postfuse_module.*``).
    """

    path: Path
    kind: ModelKind
    unet: StateDict
    text_encoder: StateDict
    vae: StateDict
    subject_encoder: Optional[StateDict] = None

    @property
    def cross_attention_dim(self) -> int:
        return _cross_attention_dim(self.unet, "", self.path)


def resolve_checkpoint_path(path: PathLike) -> Path:
    """A checkpoint file, or a folder holding the official ``pytorch_model.bin``."""
    path = Path(path)
    if path.is_dir():
        candidate = path / OFFICIAL_FILENAME
        if candidate.is_file():
            return candidate
        found = sorted(p.name for p in path.iterdir())[:10]
        raise CheckpointError(f"{path} is a folder without {OFFICIAL_FILENAME}; it holds {found or 'nothing'}")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    return path


def _load(path: Path) -> object:
    """Everything in a safetensors or weights-only pickle file; zip archives are memory-mapped
    (tensors are paged in as they are used). The file is opened here first, so that a missing file or
    a permission error is raised as what it is (safetensors reports any failure to open as
    FileNotFoundError)."""
    with open(path, "rb") as file:
        zipped = file.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)


def _refused(path: Path, message: str) -> CheckpointError:
    """The error for a pickle that weights-only loading will not read, naming the code it would run."""
    culprit = re.search(r"GLOBAL (\S+)", message)
    if culprit:
        found = f"loading it would run code ({culprit.group(1)}), which is never done"
    else:
        detail = re.search(r"WeightsUnpickler error: \s*(\S[^\n]*)", message)
        reason = f" ({detail.group(1)})" if detail else ""
        found = (
            f"weights-only loading cannot read it{reason}: it is corrupt, or a pickle that needs code "
            "execution to load, which is never done"
        )
    return CheckpointError(
        f"{path} was refused: {found}. Model files are plain tensor dicts; "
        "get the file from its official source"
    )


def _size(path: Path) -> Optional[int]:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _out_of_memory(path: Path, error: Exception) -> bool:
    """Whether reading failed for want of memory: Python's MemoryError, or torch's allocation and
    mmap failures (RuntimeError or OSError with the system's ENOMEM message). An allocation larger
    than the whole file is a corrupt size field, not a lack of memory."""
    message = str(error)
    requested = re.search(r"allocate (\d+) bytes", message)
    if requested and int(requested.group(1)) > (_size(path) or 0):
        return False
    if isinstance(error, MemoryError) or getattr(error, "errno", None) == errno.ENOMEM:
        return True
    return any(sign in message.lower() for sign in (os.strerror(errno.ENOMEM).lower(), "can't allocate memory", "out of memory"))


def _file_size(path: Path) -> str:
    size = _size(path)
    if size is None:
        return "size unknown"
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size} bytes"


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    """The error for a file that could not be read, naming the cause: a missing file, no permission,
    too little memory, another I/O error, and only otherwise a truncated or corrupt file."""
    detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
    cause = f"{type(error).__name__}: {detail}" if detail else type(error).__name__
    if isinstance(error, FileNotFoundError):
        return CheckpointError(f"{path}: no such file (it was removed or moved while it was being read)")
    if isinstance(error, PermissionError):
        return CheckpointError(f"{path} cannot be read: permission denied ({cause}); make the file readable by the user running this")
    if _out_of_memory(path, error):
        return CheckpointError(
            f"{path} could not be loaded: out of memory ({cause}). Loading takes about the file's size "
            f"({_file_size(path)}) of free memory: close other programs or unload other models and try again"
        )
    if isinstance(error, OSError):
        return CheckpointError(f"{path} could not be read ({cause}): the disk or file system failed; check it and try again")
    return CheckpointError(
        f"{path} could not be read ({cause}); the file ({_file_size(path)}) is probably truncated or corrupt: "
        "download it again"
    )


def read_state_dict(path: PathLike) -> StateDict:
    """All tensors of a ``.safetensors`` or weights-only pickle file (``state_dict`` wrappers unwrapped)."""
    path = resolve_checkpoint_path(path)
    suffix = path.suffix.lower()
    if suffix not in PICKLE_SUFFIXES | SAFETENSORS_SUFFIXES:
        raise CheckpointError(
            f"{path}: unsupported file type '{suffix}'; expected .safetensors or the official .bin"
        )
    try:
        data = _load(path)
    except pickle.UnpicklingError as error:
        raise _refused(path, str(error)) from error
    except Exception as error:
        raise _unreadable(path, error) from error
    if isinstance(data, Mapping) and "state_dict" in data and isinstance(data["state_dict"], Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path} does not hold a dict of tensors (found a {type(data).__name__})")
    odd = next((k for k, v in data.items() if not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise CheckpointError(f"{path} does not hold a dict of tensors (found {odd!r}: a {type(data[odd]).__name__})")
    return dict(data)


def _top_prefixes(keys: Iterable[str], limit: int = 6) -> list[str]:
    seen: dict[str, None] = {}
    for key in keys:
        seen.setdefault(key.split(".")[0] + ".*", None)
    return list(seen)[:limit]


def _cross_attention_dim(state_dict: Mapping[str, torch.Tensor], prefix: str, source: PathLike) -> int:
    for key, value in state_dict.items():
        if key.startswith(prefix) and key.endswith("attn2.to_k.weight"):
            return value.shape[1]
    raise CheckpointError(f"{source}: the UNet has no cross-attention (attn2) layers: not a text-conditioned SD UNet")


def classify(state_dict: Mapping[str, torch.Tensor], source: PathLike = "checkpoint") -> ModelKind:
    """Tell an SDM from a TDM by its components; raise :class:`CheckpointError` for anything else."""
    keys = list(state_dict)
    if any(k.startswith("model.diffusion_model.") for k in keys):
        if any(k.startswith(("conditioner.embedders.1", "model.diffusion_model.label_emb")) for k in keys):
            found = "an SDXL checkpoint"
        else:
            found = "a single-file Stable Diffusion checkpoint (model.diffusion_model.*)"
        raise CheckpointError(
            f"{source} is {found}, not a Face-diffuser SDM or TDM; use the official SDM/TDM "
            "pytorch_model.bin (or its converted .safetensors)"
        )
    present = {p for p in (UNET, TEXT_ENCODER, VAE, *_SUBJECT_PARTS) if any(k.startswith(p) for k in keys)}
    if UNET not in present:
        raise CheckpointError(
            f"{source} has no Face-diffuser components (no unet.* keys); found {_top_prefixes(keys)}"
        )
    missing = [p + "*" for p in (TEXT_ENCODER, VAE) if p not in present]
    if present.intersection(_SUBJECT_PARTS):  # an SDM needs its whole subject encoder
        missing += [p + "*" for p in _SUBJECT_PARTS if p not in present]
    if missing:
        raise CheckpointError(f"{source} is incomplete: it lacks {', '.join(missing)} (found {_top_prefixes(keys)})")
    if UNET + "conv_in.weight" not in state_dict:
        raise CheckpointError(
            f"{source}: the UNet is not in diffusers layout (no unet.conv_in.weight); found {_top_prefixes(keys)}"
        )
    in_channels = state_dict[UNET + "conv_in.weight"].shape[1]
    if in_channels != 4:
        raise CheckpointError(f"{source}: the UNet takes {in_channels} latent channels; SD1.5 UNets take 4")
    context = _cross_attention_dim(state_dict, UNET, source)
    text_width_key = TEXT_ENCODER + "embeddings.token_embedding.weight"
    alt_key = TEXT_ENCODER + "text_model.embeddings.token_embedding.weight"
    token_embedding = state_dict.get(text_width_key, state_dict.get(alt_key))
    if token_embedding is None:
        raise CheckpointError(f"{source}: the text encoder has no token embedding ({text_width_key})")
    if context != token_embedding.shape[1]:
        shape = " (SDXL-shaped)" if context == 2048 else ""
        raise CheckpointError(
            f"{source}: the UNet's cross-attention width is {context}{shape} but the text encoder's is "
            f"{token_embedding.shape[1]}; Face-diffuser models are SD1.5 (768)"
        )
    return ModelKind.SDM if POSTFUSE in present else ModelKind.TDM


def _strip(state_dict: Mapping[str, torch.Tensor], prefix: str, new_prefix: str = "") -> StateDict:
    return {
        new_prefix + k[len(prefix) :]: v
        for k, v in state_dict.items()
        if k.startswith(prefix) and not k.endswith(_DERIVED_BUFFERS)
    }


def declared_kind(path: PathLike) -> Optional[ModelKind]:
    """The kind a file says it is, where keys cannot tell (an SDM and FastComposer's model share
    them): the converter's ``facediffuser_kind`` metadata of a .safetensors, else "fastcomposer" in
    its name or its folder's (the official download is ``fastcomposer/pytorch_model.bin``); None
    when it says nothing."""
    path = Path(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES and path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as file:
            recorded = (file.metadata() or {}).get("facediffuser_kind")
        if recorded in {kind.value for kind in ModelKind}:
            return ModelKind(recorded)
    return ModelKind.FASTCOMPOSER if "fastcomposer" in f"{path.parent.name}/{path.name}".lower() else None


def resolve_kind(layout: ModelKind, declared: Optional[ModelKind], source: PathLike = "checkpoint") -> ModelKind:
    """The kind of a file whose keys have ``layout`` (SDM or TDM) and that declares ``declared``."""
    if declared is None:
        return layout
    if declared.layout is not layout:
        raise CheckpointError(f"{source} was given as a {declared.description} but its components are those of a {layout.description}")
    return declared


def split_checkpoint(state_dict: Mapping[str, torch.Tensor], path: PathLike = "checkpoint", kind: Optional[ModelKind] = None) -> FaceDiffuserCheckpoint:
    """Split an official-layout state dict into components (tensors are shared, not copied);
    ``kind`` is what the file declares (:func:`declared_kind`), checked against its components."""
    kind = resolve_kind(classify(state_dict, path), kind, path)
    text = _strip(state_dict, TEXT_ENCODER)
    if not any(k.startswith("text_model.") for k in text):
        text = {"text_model." + k: v for k, v in text.items()}
    subject = None
    if kind.layout is ModelKind.SDM:
        subject = {k: v for k, v in state_dict.items() if k.startswith(_SUBJECT_PREFIXES) and not k.endswith(_DERIVED_BUFFERS)}
    return FaceDiffuserCheckpoint(Path(path), kind, _strip(state_dict, UNET), text, _strip(state_dict, VAE), subject)


def load_checkpoint(path: PathLike, expect: Optional[ModelKind] = None) -> FaceDiffuserCheckpoint:
    """Read and split a checkpoint; with ``expect``, a file of another layout (an SDM given for a
    TDM, or back) is an error; FastComposer's model is accepted where an SDM is expected."""
    resolved = resolve_checkpoint_path(path)
    checkpoint = split_checkpoint(read_state_dict(resolved), resolved, declared_kind(resolved))
    if expect is not None and checkpoint.kind.layout is not expect.layout:
        raise CheckpointError(
            f"{resolved} is a {checkpoint.kind.description}, but a {ModelKind(expect).description} was expected "
            f"here; check that the SDM and TDM files are not swapped"
        )
    return checkpoint
