"""Time and peak memory of ``python -m facediffuser_core convert`` on a synthetic official file.

    python benchmarks/bench_convert.py [--size-mb 400] [--dtypes fp16 fp32] [--workdir DIR]

The input is a tiny SDM in the official layout (float32 UNet and VAE, bfloat16 encoders)
padded with ``unet.*`` filler tensors in the official SDM's dtype mix (about 87% float32,
13% bfloat16 by bytes) up to ``--size-mb``. Each conversion runs in a child process; its peak
RSS minus that of a child that only imports torch and the converter is the memory the
conversion itself costs (Linux: read from /proc/self/status), and its wall time minus that
child's is the conversion time (the input is in the page cache, having just been written).
Target: the peak is at most 1.2x the input file size.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import factories  # noqa: E402

TARGET_RATIO = 1.2
FILLER_MB = 32  # about the size of the largest SD1.5 UNet tensors
BF16_SHARE = 0.13  # bytes of bfloat16 tensors (text and image encoders) in the official SDM
PEAK_MARK = "peak_rss_kib="
# The child reads its own VmHWM: ru_maxrss would also count the parent's RSS, which a
# vfork()ed child inherits as its starting high-water mark.
PROBE = f"""
import sys, torch, safetensors, tqdm, facediffuser_core.convert
from facediffuser_core.__main__ import main
code = main(sys.argv[1:]) if sys.argv[1:] else 0
print("{PEAK_MARK}" + next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
sys.exit(code)
"""


def build_input(path: Path, size_mb: int) -> None:
    """Save an official-layout SDM of about ``size_mb`` MiB (zip format, as torch.save writes)."""
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
    torch.save(state, path)


def run_child(argv: list[str]) -> tuple[float, int]:
    """Run the CLI (or, with no ``argv``, only its imports) in a child; its wall time (s) and peak RSS (bytes)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"child {argv} failed:\n{done.stderr[-2000:]}")
    return elapsed, int(done.stdout.rsplit(PEAK_MARK, 1)[1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=400, help="input file size in MiB (default 400)")
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "fp32"], choices=["fp16", "bf16", "fp32", "keep"])
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the files (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        src = Path(tmp) / "SDM" / "pytorch_model.bin"
        src.parent.mkdir()
        build_input(src, args.size_mb)
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
            print(
                f"{dtype:>5} {src.stat().st_size / 2**20:>10.0f} {dst.stat().st_size / 2**20:>11.0f} {elapsed - startup:>7.1f} "
                f"{extra / 2**20:>15.0f} {ratio:>6.2f} {verdict:>7}"
            )
            dst.unlink()


if __name__ == "__main__":
    main()
