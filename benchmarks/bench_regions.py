"""The per-step cost of the people's regions (regional cross-attention on all 16 cross-attention
blocks) inside the real ComfyUI, on the integration suite's random SD1.5 weights: the Face-diffuser
Sampler in its subject stage (the SDM, text and subject batched: one UNet evaluation of two latents
per step) with two people in side-by-side regions, against the same run without regions.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_regions.py [--size 512] [--steps 3] [--rounds 2] [--device cpu|cuda]

Both runs share one process and its loaded models and alternate ``rounds`` times (CPU timings drift
between runs); each row is the median seconds per step. Goal: under 3 % on a CPU at 512 px.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "integration")]

PROMPT = "a man <|image|> and a woman <|image|> in a cafe"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed run (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="timed runs of each kind, alternating (default 2)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    args = parser.parse_args()
    if not os.environ.get("COMFYUI_PATH"):
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""

    import numpy as np
    import torch
    from PIL import Image

    from comfy_inprocess import import_comfy, import_pack
    from models import ensure_model_files
    from paths import FACES

    import_comfy(Path(os.environ["COMFYUI_PATH"]))
    import_pack()
    import comfy.model_management as mm
    from facediffuser_pack.nodes import encode, loader, sampler

    files = ensure_model_files()
    tdm, sdm, clip, _, subject_encoder = loader.load_models(str(files.sdm), str(files.tdm))
    faces = torch.cat([torch.from_numpy(np.asarray(Image.open(FACES / name).convert("RGB").resize((224, 224)), dtype=np.float32) / 255)[None] for name in ("man1.jpeg", "man2.jpeg")])
    masks = torch.zeros(2, args.size, args.size)
    masks[0, :, : args.size // 2], masks[1, :, args.size // 2 :] = 1, 1
    negative = encode.encode_text(clip, "")
    conditionings = {
        "no regions": encode.encode_subjects(clip, subject_encoder, faces, PROMPT, 512),
        "two regions": encode.encode_subjects(clip, subject_encoder, faces, PROMPT, 512, masks),
    }
    latent = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def run(name: str, steps: int) -> float:
        synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            sampler.FaceDiffuserSampler.execute(tdm, sdm, *conditionings[name], negative, latent, 0, steps, 5.0, "ddim", "ddim_uniform", 0.0, 0.0, 1.0)
        synchronize()
        return (time.perf_counter() - start) / steps

    for name in conditionings:  # warm-up: loads the models, builds the regions' biases once
        run(name, 1)
    per_step = {name: [] for name in conditionings}
    for _ in range(args.rounds):
        for name in conditionings:
            per_step[name].append(run(name, args.steps))
    base = statistics.median(per_step["no regions"])
    print(f"device: {mm.get_torch_device()}, {args.size}x{args.size} px, subject stage (SDM, text + subject batched), {args.steps} steps x {args.rounds} rounds, random SD1.5 weights")
    header = f"{'run':<12} {'s/step':>8} {'overhead':>9}"
    print(header)
    print("-" * len(header))
    for name, times in per_step.items():
        median = statistics.median(times)
        print(f"{name:<12} {median:>8.2f} {100 * (median / base - 1):>8.1f}%")


if __name__ == "__main__":
    main()
