"""Time and peak memory of ``python -m facediffuser_core convert`` on a synthetic official file.

    python benchmarks/bench_convert.py [--size-mb 400] [--dtypes fp16 fp32] [--workdir DIR]

The input is a tiny SDM in the official layout (float32 UNet and VAE, bfloat16 encoders)
padded with ``unet.*`` filler tensors in the official SDM's dtype mix (about 87% float32,
13% bfloat16 by bytes) up to ``--size-mb``. Each conversion runs in a child process; its peak
RSS minus that of a child that only imports torch and the converter is the memory the
conversion itself costs (Linux: read from /proc/self/status; tests/convert_memory.py), and its
wall time minus that child's is the conversion time (the input is in the page cache, having
just been written).
Target: the peak is at most 1.2x the input file size; the command exits 1 if any conversion
is OVER it. (tests/core/weights/test_convert.py holds the converter to 1.3x.)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from convert_memory import run_child, write_padded_sdm  # noqa: E402

TARGET_RATIO = 1.2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=400, help="input file size in MiB (default 400)")
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "fp32"], choices=["fp16", "bf16", "fp32", "keep"])
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the files (default: a temp dir)")
    args = parser.parse_args()
    over = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        src = Path(tmp) / "SDM" / "pytorch_model.bin"
        write_padded_sdm(src, args.size_mb)
        startup, baseline = run_child([])
        print(
            f"torch {torch.__version__}, {os.cpu_count()} CPUs; baseline child (imports only): "
            f"{baseline / 2**20:.0f} MiB RSS, {startup:.1f} s"
        )
        header = f"{'dtype':>5} {'input MiB':>10} {'output MiB':>11} {'time s':>7} {'peak extra MiB':>15} {'ratio':>6} {'target':>7}"
        print(header)
        print("-" * len(header))
        for dtype in args.dtypes:
            dst = Path(tmp) / f"sdm_{dtype}.safetensors"
            elapsed, peak = run_child(["convert", str(src), "-o", str(dst), "--dtype", dtype])
            extra = peak - baseline
            ratio = extra / src.stat().st_size
            verdict = "ok" if ratio <= TARGET_RATIO else "OVER"
            if verdict == "OVER":
                over.append(dtype)
            print(
                f"{dtype:>5} {src.stat().st_size / 2**20:>10.0f} {dst.stat().st_size / 2**20:>11.0f} {elapsed - startup:>7.1f} "
                f"{extra / 2**20:>15.0f} {ratio:>6.2f} {verdict:>7}"
            )
            dst.unlink()
    if over:
        print(f"OVER: the peak exceeds {TARGET_RATIO}x the input for {', '.join(over)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
