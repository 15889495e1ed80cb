"""Convert an official Face-diffuser ``pytorch_model.bin`` to ``.safetensors``.

The output keeps the official keys, so it loads exactly like the original. Tensors are
written one at a time straight into the safetensors layout, so peak memory stays near the
input size (the input is memory-mapped when its format allows), and the written file is read
back and compared tensor by tensor before it replaces ``dst``.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .checkpoints import ModelKind, PathLike, classify, read_state_dict, resolve_checkpoint_path
from .errors import CheckpointError

__all__ = ["DTYPES", "ConversionReport", "convert_checkpoint"]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_SAFETENSORS_DTYPE = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ALIGN = 8


@dataclass(frozen=True)
class ConversionReport:
    kind: ModelKind
    tensors: int
    input_bytes: int
    output_bytes: int
    dst: Path


def _cast(tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    if dtype is None or not tensor.is_floating_point():
        return tensor.contiguous()
    return tensor.to(dtype).contiguous()


def _header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    entries: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        entries[name] = {"dtype": _SAFETENSORS_DTYPE[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-len(raw) % _ALIGN)


def convert_checkpoint(src: PathLike, dst: PathLike, dtype: Optional[str] = "fp16", progress: bool = True) -> ConversionReport:
    """Write ``src`` (official .bin, a folder holding it, or a .safetensors) to ``dst`` as safetensors.

    ``dtype`` (fp16 | bf16 | fp32 | None to keep) applies to floating-point tensors only.
    Raises :class:`CheckpointError` for files that are not an SDM/TDM, for values that
    overflow the target dtype, and when the read-back check fails.
    """
    from safetensors import safe_open
    from tqdm import tqdm

    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    target = DTYPES[dtype] if dtype else None
    src_path = resolve_checkpoint_path(src)
    dst_path = Path(dst)
    if dst_path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{dst_path}: the output file name must end in .safetensors")
    if dst_path.resolve() == src_path.resolve():
        raise CheckpointError(f"{dst_path}: the output must not overwrite the input")
    state = read_state_dict(src_path)
    kind = classify(state, src_path)
    meta_tensors = {name: _cast(t.to("meta"), target) for name, t in state.items()}
    header = _header(meta_tensors, {"format": "pt", "facediffuser_kind": kind.value, "source": src_path.name})
    total = sum(t.numel() * t.element_size() for t in meta_tensors.values())
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    partial = dst_path.with_name(dst_path.name + ".partial")
    try:
        with open(partial, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress) as bar:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            for name, tensor in state.items():
                cast = _cast(tensor, target)
                if cast.is_floating_point() and not bool(torch.isfinite(cast).all()) and bool(torch.isfinite(tensor).all()):
                    raise CheckpointError(
                        f"{src_path}: tensor {name} overflows {dtype}; convert with --dtype bf16 or fp32"
                    )
                out.write(memoryview(cast.reshape(-1).view(torch.uint8).numpy()))
                bar.update(cast.numel() * cast.element_size())
        with safe_open(str(partial), framework="pt", device="cpu") as written:
            if set(written.keys()) != set(state):
                raise CheckpointError(f"{partial}: read-back found other tensor names than were written")
            for name, tensor in tqdm(state.items(), desc="verify", disable=not progress):
                if not torch.equal(written.get_tensor(name), _cast(tensor, target)):
                    raise CheckpointError(f"{partial}: tensor {name} reads back different from what was written")
        os.replace(partial, dst_path)
    finally:
        partial.unlink(missing_ok=True)
    return ConversionReport(kind, len(state), src_path.stat().st_size, dst_path.stat().st_size, dst_path)
