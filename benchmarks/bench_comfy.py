"""Face-diffuser sampler vs a stock KSampler inside the real ComfyUI, on the same random SD1.5
weights, image size and step count (the integration suite's cached models); and the Face Detailer's
cost per face (denoise 0.45, crops re-rendered at the same size and step count) against the
Face-diffuser sampling of the base image.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_comfy.py [--size 512] [--steps 50] [--device cpu|cuda] [--controlnet]

Each sampler runs in its own process so its peak memory is its own. Printed per sampler: UNet
evaluations (one per latent per conditioning), wall time and its ratio to KSampler (the floor is
1.30x at 15/30 of 50 steps: 130 vs 100 evaluations; target <= 1.35x), time inside UNet forwards,
time outside them per step, and peak memory (process RSS; CUDA allocator peak on a GPU). The
detailer's row is per face: a picture of the two test photos side by side (two faces) is detailed
and its time divided by the faces re-rendered; its "ratio" is against the Face-diffuser
sampler's row (a base image), "outside ms/step" includes detection, matching, VAE and blending.
With ``--controlnet`` both samplers instead run with the integration suite's random SD1.5 ControlNet
(openpose layout) on the shipped pose image, on every conditioning (KSampler: ComfyUI's Apply
ControlNet; Face-diffuser: Face-diffuser Apply ControlNet), and the detailer is left out; the
ControlNet's own forward counts as time outside the UNet.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "integration")]

PROMPT = "a photo of a man <|image|> reading in a cafe"


def peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


class UNetTimer:
    """Wraps a ComfyUI UNet's forward to add up the time and the latents it evaluates."""

    def __init__(self, patcher, synchronize) -> None:
        self.seconds, self.evaluations = 0.0, 0
        unet = patcher.model.diffusion_model
        forward = unet.forward

        def timed(x, *args, **kwargs):
            synchronize()
            start = time.perf_counter()
            out = forward(x, *args, **kwargs)
            synchronize()
            self.seconds += time.perf_counter() - start
            self.evaluations += x.shape[0]
            return out

        unet.forward = timed


def with_controlnet(files, size: int, *conditionings: list) -> tuple:
    """``conditionings`` with the tests' random ControlNet on the shipped pose image (resized to
    ``size``), all in one Face-diffuser Apply ControlNet call."""
    import comfy.controlnet
    import numpy as np
    import torch
    from facediffuser_pack.nodes.controlnet import apply_controlnet
    from models import ensure_controlnet_file
    from PIL import Image

    control_net = comfy.controlnet.load_controlnet(str(ensure_controlnet_file(files, Path(os.environ["COMFYUI_PATH"]))))
    image = Image.open(ROOT / "workflows" / "inputs" / "pose_two_people.png").convert("RGB").resize((size, size))
    pose = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)[None]
    applied = apply_controlnet(dict(enumerate(conditionings)), control_net, pose, 1.0, 0.0, 1.0)
    return tuple(applied.values())


def child(mode: str, size: int, steps: int, device: str, controlnet: bool = False) -> dict:
    import torch

    from comfy_inprocess import import_comfy, import_pack
    from models import ensure_model_files

    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import_comfy(Path(os.environ["COMFYUI_PATH"]))
    import_pack()
    import comfy.model_management as mm
    import comfy.sample
    import numpy as np
    from facediffuser_pack.facediffuser_core.weights.checkpoints import ModelKind, load_checkpoint
    from facediffuser_pack.nodes import encode, loader, sampler
    from paths import FACES
    from PIL import Image

    files = ensure_model_files(full_size=True)
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    face = torch.from_numpy(np.asarray(Image.open(FACES / "man1.jpeg").convert("RGB"), dtype=np.float32) / 255)[None]
    latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}

    if mode == "ksampler":
        sdm_checkpoint = load_checkpoint(files.sdm, expect=ModelKind.SDM)
        sdm, clip = loader.load_unet(sdm_checkpoint, None), loader.load_clip(sdm_checkpoint)
        del sdm_checkpoint
        text, negative = encode.encode_text(clip, PROMPT.replace(" <|image|>", "")), encode.encode_text(clip, "")
        if controlnet:
            text, negative = with_controlnet(files, size, text, negative)
        timers = [UNetTimer(sdm, synchronize)]

        def run(n):
            noise = comfy.sample.prepare_noise(latent["samples"], 0)
            return comfy.sample.sample(sdm, noise, n, 5.0, "ddim", "ddim_uniform", text, negative, latent["samples"], disable_pbar=True, seed=0)
    elif mode == "detailer":
        from facediffuser_pack.nodes import detailer

        tdm, sdm, clip, vae, subject_encoder = loader.load_models(str(files.sdm), str(files.tdm))
        del tdm
        second = torch.from_numpy(np.asarray(Image.open(FACES / "man2.jpeg").convert("RGB"), dtype=np.float32) / 255)[None]
        scaled = [torch.nn.functional.interpolate(p.permute(0, 3, 1, 2), size=(size, round(p.shape[2] * size / p.shape[1])), mode="bilinear", antialias=True) for p in (face, second)]
        picture = torch.cat(scaled, dim=3).clamp(0, 1).permute(0, 2, 3, 1).contiguous()
        from facediffuser_pack.facediffuser_core.faces.detection import crop_faces, detect, load_detector, to_pil_images

        detector = load_detector("cpu")
        references = torch.cat([crop_faces(p, [detect(detector, to_pil_images(p)[0])]).crops for p in (face, second)])  # as Face Crop makes them
        timers = [UNetTimer(sdm, synchronize)]
        faces = []

        def run(n):
            result = detailer.face_detail(picture, vae, sdm, clip, subject_encoder, references, "a man <|image|> and a man <|image|> in a cafe",
                                          0, n, 5.0, "ddim", "ddim_uniform", 0.45, size, 0.5, 0.15, "leave it", "error", 512)  # fmt: skip
            faces.append(sum(p.rendered for placed in result[3] for p in placed))
            return result
    else:
        tdm, sdm, clip, _, subject_encoder = loader.load_models(str(files.sdm), str(files.tdm))
        text, subject = encode.encode_subjects(clip, subject_encoder, face, PROMPT, 512)
        negative = encode.encode_text(clip, "")
        if controlnet:
            text, subject, negative = with_controlnet(files, size, text, subject, negative)
        timers = [UNetTimer(tdm, synchronize), UNetTimer(sdm, synchronize)]

        def run(n):
            return sampler.FaceDiffuserSampler.execute(tdm, sdm, text, subject, negative, latent, 0, n, 5.0, "ddim", "ddim_uniform", 0.3, 0.6, 1.0)

    run(2)  # warm-up: loads the models onto the device
    for timer in timers:
        timer.seconds, timer.evaluations = 0.0, 0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    synchronize()
    start = time.perf_counter()
    run(steps)
    synchronize()
    wall = time.perf_counter() - start
    unet = sum(t.seconds for t in timers)
    per = faces[-1] if mode == "detailer" else 1  # the detailer's figures are per face
    return {
        "mode": "detailer/face" if mode == "detailer" else f"{mode}+cn" if controlnet else mode,
        "evaluations": sum(t.evaluations for t in timers) // per,
        "wall_s": wall / per,
        "unet_s": unet / per,
        "outside_ms_per_step": 1000 * (wall - unet) / steps / per,
        "peak_rss_mib": peak_rss_mib(),
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "device": str(mm.get_torch_device()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--controlnet", action="store_true", help="both samplers with the tests' random SD1.5 ControlNet on every conditioning (no detailer row)")
    parser.add_argument("--child", choices=["ksampler", "facediffuser", "detailer"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not os.environ.get("COMFYUI_PATH"):
        sys.exit("set COMFYUI_PATH to a ComfyUI 0.8 checkout")
    if args.child:
        print(json.dumps(child(args.child, args.size, args.steps, args.device, args.controlnet)))
        return
    results = {}
    for mode in ("ksampler", "facediffuser") if args.controlnet else ("ksampler", "facediffuser", "detailer"):
        command = [sys.executable, __file__, "--child", mode, "--size", str(args.size), "--steps", str(args.steps), "--device", args.device, *(["--controlnet"] if args.controlnet else [])]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(output.strip().splitlines()[-1])
    base = results["ksampler"]
    control = ", a random SD1.5 ControlNet on every conditioning" if args.controlnet else ""
    print(f"device: {base['device']}, {args.size}x{args.size} px, {args.steps} steps, ddim / ddim_uniform, cfg 5, random SD1.5 weights{control}")
    header = f"{'sampler':<14} {'UNet evals':>10} {'wall s':>8} {'ratio':>11} {'UNet s':>8} {'outside ms/step':>15} {'peak RSS MiB':>12} {'peak CUDA MiB':>13}"
    print(header)
    print("-" * len(header))
    for mode, r in results.items():
        cuda = f"{r['peak_cuda_mib']:.0f}" if r["peak_cuda_mib"] is not None else "-"
        against = results["facediffuser"] if mode == "detailer" else base
        print(
            f"{r['mode']:<14} {r['evaluations']:>10} {r['wall_s']:>8.1f} {r['wall_s'] / against['wall_s']:>10.2f}x "
            f"{r['unet_s']:>8.1f} {r['outside_ms_per_step']:>15.1f} {r['peak_rss_mib']:>12.0f} {cuda:>13}"
        )
    print("ratio: wall s against the ksampler row; the detailer/face row's against the facediffuser row")
    floor = results["facediffuser"]["evaluations"] / base["evaluations"]
    print(f"UNet-evaluation floor: {floor:.2f}x")


if __name__ == "__main__":
    main()
