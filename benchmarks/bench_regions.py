"""The per-step cost of the people's regions (regional cross-attention on all 16 cross-attention
blocks) inside the real ComfyUI, on the integration suite's random SD1.5 weights: the Face-diffuser
Sampler in its subject stage (the SDM, text and subject batched: one UNet evaluation of two latents
per step) with two people in side-by-side regions, against the same run without regions.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_regions.py [--size 512] [--steps 3] [--rounds 2] [--device cpu|cuda]

Both runs share one process and its loaded models and alternate ``rounds`` times, each round in the
other order. Two measures:
- ``s/step``: the median wall seconds per step. On a CPU whole steps spread by about 10 % from one to
  the next, so their difference cannot resolve a few per cent.
- ``xattn s/step``: the seconds per step spent in the 16 cross-attention layers, the only code the
  regions change (they add no UNet evaluation: ``UNet evals`` counts them). Each layer is timed from its
  ``to_q`` projection to the end of its ``to_out``, which spans the stock attention and the regional
  patch alike. ``overhead`` is the regions' extra cross-attention time per step as a share of a step
  without regions. Goal: under 3 % on a CPU at 512 px.
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

    files = ensure_model_files(full_size=True)
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
    timer = CrossAttentionTimer(sdm.model.diffusion_model, synchronize)

    def run(name: str, steps: int) -> tuple[float, float, int]:
        """(wall s/step, cross-attention s/step, UNet evaluations) of one sampling run."""
        timer.reset()
        synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            sampler.FaceDiffuserSampler.execute(tdm, sdm, *conditionings[name], negative, latent, 0, steps, 5.0, "ddim", "ddim_uniform", 0.0, 0.0, 1.0)
        synchronize()
        return (time.perf_counter() - start) / steps, timer.seconds / steps, timer.evaluations

    for name in conditionings:  # warm-up: loads the models, builds the regions' biases once
        run(name, 1)
    runs = {name: [] for name in conditionings}
    for round_ in range(args.rounds):  # alternate which kind goes first: a round's second run tends to differ
        for name in list(conditionings)[:: 1 if round_ % 2 == 0 else -1]:
            runs[name].append(run(name, args.steps))
    step = {name: statistics.median(r[0] for r in rs) for name, rs in runs.items()}
    xattn = {name: statistics.median(r[1] for r in rs) for name, rs in runs.items()}
    print(f"device: {mm.get_torch_device()}, {args.size}x{args.size} px, subject stage (SDM, text + subject batched), {args.steps} steps x {args.rounds} rounds, random SD1.5 weights")
    header = f"{'run':<12} {'UNet evals':>10} {'s/step':>8} {'xattn s/step':>13} {'overhead':>9}"
    print(header)
    print("-" * len(header))
    for name, rs in runs.items():
        overhead = (xattn[name] - xattn["no regions"]) / step["no regions"]
        print(f"{name:<12} {rs[0][2]:>10} {step[name]:>8.2f} {xattn[name]:>13.3f} {100 * overhead:>8.2f}%")
    print(f"overhead: the cross-attention's extra seconds per step as a share of a step without regions; whole steps differ by {100 * (step['two regions'] / step['no regions'] - 1):+.1f} % (CPU spread)")


class CrossAttentionTimer:
    """Seconds spent in a UNet's cross-attention layers (each from its attn2.to_q call to the end of
    its attn2.to_out, which spans both ComfyUI's own attn2 and an attn2_replace patch) and the number of
    UNet forward calls, by module hooks."""

    def __init__(self, unet, synchronize) -> None:
        self.synchronize, self.started = synchronize, 0.0
        self.reset()
        unet.register_forward_pre_hook(self._evaluation)
        for module in unet.modules():
            attn2 = getattr(module, "attn2", None)
            if attn2 is not None:
                attn2.to_q.register_forward_pre_hook(self._start)
                attn2.to_out.register_forward_hook(self._stop)

    def reset(self) -> None:
        self.seconds, self.evaluations = 0.0, 0

    def _evaluation(self, *_) -> None:
        self.evaluations += 1

    def _start(self, *_) -> None:
        self.synchronize()
        self.started = time.perf_counter()

    def _stop(self, *_) -> None:
        self.synchronize()
        self.seconds += time.perf_counter() - self.started


if __name__ == "__main__":
    main()
