"""Convert an official Face-diffuser ``pytorch_model.bin`` to ``.safetensors``.

The output keeps the official keys, so it loads exactly like the original. Tensors are cast
and written a chunk at a time straight into the safetensors layout, so peak memory stays near
the input size (the input is memory-mapped when its format allows). The written file is then
read back with the safetensors library and checked, tensor by tensor, against the SHA-256 of
the bytes written (the cast tensors) before it replaces ``dst``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..errors import CheckpointError
from .checkpoints import ModelKind, PathLike, StateDict, classify, declared_kind, read_state_dict, resolve_checkpoint_path, resolve_kind

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
_CHUNK = 2**22  # elements cast at a time, into one reused buffer (repeated large allocations bloat the heap)
_VERIFY_WINDOW = 64 * 2**20  # bytes read back through one mapping of the output before it is reopened


@dataclass(frozen=True)
class ConversionReport:
    kind: ModelKind
    tensors: int
    input_bytes: int
    output_bytes: int
    dst: Path


def _output_dtype(tensor: torch.Tensor, target: Optional[torch.dtype]) -> torch.dtype:
    return target if target is not None and tensor.is_floating_point() else tensor.dtype


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _raw(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous tensor."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _header(layout: StateDict, metadata: dict[str, str], source: Path) -> bytes:
    entries: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, tensor in layout.items():
        if tensor.dtype not in _SAFETENSORS_DTYPE:
            raise CheckpointError(f"{source}: tensor {name} has dtype {tensor.dtype}, which safetensors cannot store")
        entries[name] = {
            "dtype": _SAFETENSORS_DTYPE[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + _nbytes(tensor)],
        }
        offset += _nbytes(tensor)
    raw = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-len(raw) % _ALIGN)


def _check_range(name: str, values: torch.Tensor, cast: torch.Tensor, source: Path) -> None:
    """Refuse a cast of non-empty ``values`` that turned finite values into infinities (one min/max
    reduction when the cast is all finite)."""
    if all(bool(v.isfinite()) for v in torch.aminmax(cast)):
        return
    overflowed = cast.isinf() & values.isfinite()
    if bool(overflowed.any()):
        label = next(k for k, v in DTYPES.items() if v == cast.dtype)
        raise CheckpointError(
            f"{source}: tensor {name} overflows {label} (it holds {values[overflowed].abs().max().item():.4g}); "
            "convert with --dtype bf16 or fp32"
        )


def _write(path: Path, header: bytes, state: StateDict, layout: StateDict, source: Path, progress: bool) -> dict[str, bytes]:
    """Stream ``state`` cast to the dtypes of ``layout`` into ``path`` after ``header``; each tensor's SHA-256."""
    from tqdm import tqdm

    buffers: dict[torch.dtype, torch.Tensor] = {}
    digests: dict[str, bytes] = {}
    total = sum(map(_nbytes, layout.values()))
    with open(path, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress) as bar:
        out.write(struct.pack("<Q", len(header)))
        out.write(header)
        for name, tensor in state.items():
            digest = hashlib.sha256()
            flat = tensor.reshape(-1)
            out_dtype = layout[name].dtype
            for start in range(0, flat.numel(), _CHUNK):
                piece = flat[start : start + _CHUNK]
                cast = piece
                if out_dtype != piece.dtype:
                    if out_dtype not in buffers:
                        buffers[out_dtype] = torch.empty(_CHUNK, dtype=out_dtype)
                    cast = buffers[out_dtype][: piece.numel()].copy_(piece)
                    _check_range(name, piece, cast, source)
                data = _raw(cast)
                out.write(data)
                digest.update(data)
                bar.update(len(data))
            digests[name] = digest.digest()
    return digests


def _windows(layout: StateDict, budget: int) -> Iterator[list[str]]:
    """Tensor names in order, grouped so that each group holds at most ``budget`` bytes (or one tensor)."""
    group: list[str] = []
    size = 0
    for name, tensor in layout.items():
        if group and size + _nbytes(tensor) > budget:
            yield group
            group, size = [], 0
        group.append(name)
        size += _nbytes(tensor)
    if group:
        yield group


def _verify(path: Path, layout: StateDict, digests: dict[str, bytes], metadata: dict[str, str], progress: bool) -> None:
    """Read ``path`` back with the safetensors library: the same names, metadata, dtypes, shapes and bytes.

    The file is reopened every ``_VERIFY_WINDOW`` bytes: the pages of a mapping stay resident
    (and count as this process's memory) until it is closed.
    """
    from safetensors import safe_open
    from tqdm import tqdm

    with safe_open(str(path), framework="pt", device="cpu") as written:
        if set(written.keys()) != set(layout) or written.metadata() != metadata:
            raise CheckpointError(f"{path}: read-back found other tensor names or metadata than were written")
    with tqdm(total=len(layout), desc="verify", disable=not progress) as bar:
        for group in _windows(layout, _VERIFY_WINDOW):
            with safe_open(str(path), framework="pt", device="cpu") as written:
                for name in group:
                    tensor = written.get_tensor(name).contiguous()
                    same_layout = (tensor.dtype, tensor.shape) == (layout[name].dtype, layout[name].shape)
                    if not same_layout or hashlib.sha256(_raw(tensor)).digest() != digests[name]:
                        raise CheckpointError(f"{path}: tensor {name} reads back different from what was written")
                    bar.update()


def convert_checkpoint(src: PathLike, dst: PathLike, dtype: Optional[str] = "fp16", progress: bool = True, kind: Optional[ModelKind] = None) -> ConversionReport:
    """Write ``src`` (official .bin, a folder holding it, or a .safetensors) to ``dst`` as safetensors.

    ``dtype`` (fp16 | bf16 | fp32 | None to keep) applies to floating-point tensors only. The kind
    (``kind``, else what ``src`` declares, else its components: SDM or TDM) is recorded in the
    metadata (``facediffuser_kind``): FastComposer's model has the SDM's keys, so only that tells them apart.
    Raises :class:`CheckpointError` for files that are not an SDM/TDM, for values that
    overflow the target dtype, and when the read-back check fails; ``dst`` is then left as it was.
    """
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
    kind = resolve_kind(classify(state, src_path), kind or declared_kind(src_path), src_path)
    metadata = {"format": "pt", "facediffuser_kind": kind.value, "source": src_path.name}
    layout = {name: torch.empty(t.shape, dtype=_output_dtype(t, target), device="meta") for name, t in state.items()}
    header = _header(layout, metadata, src_path)
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    partial = dst_path.with_name(dst_path.name + ".partial")
    try:
        digests = _write(partial, header, state, layout, src_path, progress)
        del state  # unmaps the input: its pages leave this process's memory before the output is read
        _verify(partial, layout, digests, metadata, progress)
        os.replace(partial, dst_path)
    finally:
        partial.unlink(missing_ok=True)
    return ConversionReport(kind, len(layout), src_path.stat().st_size, dst_path.stat().st_size, dst_path)
