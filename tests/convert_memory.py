"""The converter's peak memory, measured in child processes: a synthetic official SDM of a given
size, and the peak RSS of ``python -m facediffuser_core`` converting it. Shared by
tests/core/weights/test_convert.py (the 1.3x bound) and benchmarks/bench_convert.py (the numbers).

Peak RSS is the child's own VmHWM (Linux: /proc/self/status); ru_maxrss would also count the
parent's RSS, which a vfork()ed child inherits as its starting high-water mark. The memory a
conversion costs is its child's peak minus that of a child that only imports the converter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import factories

ROOT = Path(__file__).resolve().parents[1]
STATUS = Path("/proc/self/status")
FILLER_MB = 32  # about the size of the largest SD1.5 UNet tensors
BF16_SHARE = 0.13  # bytes of bfloat16 tensors (text and image encoders) in the official SDM
PEAK_MARK = "peak_rss_kib="
# The command line comes through stdin as JSON; an empty list only imports.
PROBE = f"""
import json, sys, torch, safetensors, tqdm, facediffuser_core.weights.convert
from facediffuser_core.__main__ import main
argv = json.loads(sys.stdin.read())
code = main(argv) if argv else 0
print("{PEAK_MARK}" + next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
sys.exit(code)
"""


def write_padded_sdm(path: Path, size_mb: int) -> None:
    """Save an official-layout tiny SDM padded with ``unet.*`` filler tensors in the official SDM's
    dtype mix (about 87% float32, 13% bfloat16 by bytes) to about ``size_mb`` MiB (zip format, as
    torch.save writes)."""
    state = factories.official_state_dict("SDM")
    missing = size_mb * 2**20 - sum(t.numel() * t.element_size() for t in state.values())
    generator = torch.Generator().manual_seed(0)
    index = 0
    while missing > 0:
        dtype = torch.bfloat16 if index % round(1 / BF16_SHARE) == 0 else torch.float32
        numel = max(min(FILLER_MB * 2**20, missing) // dtype.itemsize, 1)
        state[f"unet.bench_filler.{index}.weight"] = torch.randn(numel, generator=generator).to(dtype)
        missing -= numel * dtype.itemsize
        index += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def run_child(argv: list[str]) -> tuple[float, int]:
    """Run the CLI with ``argv`` (or, with none, only its imports) in a child process; its wall time
    in seconds and its peak RSS in bytes. Raises RuntimeError with the child's stderr if it fails."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE], input=json.dumps(argv), cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"child {argv} failed:\n{done.stderr[-2000:]}")
    return elapsed, int(done.stdout.rsplit(PEAK_MARK, 1)[1]) * 1024
