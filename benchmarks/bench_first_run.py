"""A user's first run through a real ComfyUI server: peak and steady memory of the Face-diffuser
one-subject workflow against stock ComfyUI loaders and KSamplers on the same weights.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_first_run.py [--size 256] [--steps 2]

The weights are the integration suite's random SD1.5-sized SDM / TDM (converted fp16 files, as the
README tells users to make them). The stock graph loads the same tensors from separate files through
ComfyUI's own loaders: the TDM's and the SDM's UNets (two UNETLoader, a KSampler each), the SDM's text
encoder (CLIPLoader), VAE (VAELoader) and image encoder (CLIPVisionLoader, CLIPVisionEncode of the face);
that is, what a stock KSampler's first run costs plus the second UNet and the image encoder.

Each graph runs once in a fresh server (``--cpu``, ComfyUI's defaults: float32 compute, no suite
settings), so every figure is a first run. Printed per graph: the server's resident memory when idle
(ComfyUI and torch imported), its peak (VmHWM: everything it touched at once, memory-mapped model files
included) and steady RSS after the run (the loaded models), the peak over the models' float32 size
(both UNets, CLIP text, VAE, image encoder and postfuse), the same for the peak above idle, and the
peak over the stock graph's peak.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "integration")]

MIB = 2**20
STOCK = {  # ComfyUI folder / file name -> the checkpoint component it holds
    "diffusion_models/fd_tdm_unet.safetensors": ("tdm", "unet"),
    "diffusion_models/fd_sdm_unet.safetensors": ("sdm", "unet"),
    "text_encoders/fd_clip_l.safetensors": ("sdm", "text_encoder"),
    "vae/fd_vae.safetensors": ("sdm", "vae"),
    "clip_vision/fd_image_encoder.safetensors": ("sdm", "image_encoder"),
}


def status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process in bytes."""
    with open(f"/proc/{pid}/status") as file:
        return {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in file) if k in ("VmRSS", "VmHWM")}


def component(checkpoint, name: str) -> dict:
    """A checkpoint component in the layout ComfyUI's stock loader for it reads."""
    if name == "image_encoder":  # transformers CLIPVisionModelWithProjection keys
        return {k.removeprefix("image_encoder."): v for k, v in checkpoint.subject_encoder.items() if k.startswith("image_encoder.")}
    if name == "text_encoder":  # as the pack's Loader passes it (identity projection)
        import torch

        text = dict(checkpoint.text_encoder)
        width = text["text_model.final_layer_norm.weight"].shape[0]
        return {**text, "text_projection.weight": torch.eye(width, dtype=torch.float16)}
    return dict(getattr(checkpoint, name))


def write_stock_files(files, folder: Path) -> int:
    """The components as the stock loaders' files (once, cached beside the test models); returns the
    float32 size in bytes of everything the Face-diffuser Loader builds."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from facediffuser_core.weights.checkpoints import load_checkpoint

    for kind in ("tdm", "sdm"):
        wanted = [(path, part) for path, (k, part) in STOCK.items() if k == kind and not (folder / path).exists()]
        if wanted:
            checkpoint = load_checkpoint(getattr(files, kind))
            for path, part in wanted:
                (folder / path).parent.mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous() for k, v in component(checkpoint, part).items()}, str(folder / path))
            del checkpoint
    size = 0
    for kind in ("tdm", "sdm"):
        with safe_open(str(getattr(files, kind)), framework="pt") as file:
            for key in file.keys():
                if kind == "sdm" or key.startswith("unet."):
                    shape = file.get_slice(key).get_shape()
                    size += 4 * math.prod(shape)
    return size


def pack_graph(size: int, steps: int) -> dict:
    graph = json.loads((ROOT / "workflows" / "api" / "facediffuser_one_subject.json").read_text())
    graph["5"]["inputs"].update(width=size, height=size)
    graph["6"]["inputs"]["steps"] = steps
    return graph


def stock_graph(size: int, steps: int) -> dict:
    sample = {"seed": 42, "steps": steps, "cfg": 5.0, "sampler_name": "ddim", "scheduler": "ddim_uniform", "denoise": 1.0}
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "fd_tdm_unet.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": "fd_sdm_unet.safetensors", "weight_dtype": "default"}},
        "3": {"class_type": "CLIPLoader", "inputs": {"clip_name": "fd_clip_l.safetensors", "type": "stable_diffusion"}},
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": "fd_vae.safetensors"}},
        "5": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "fd_image_encoder.safetensors"}},
        "6": {"class_type": "LoadImage", "inputs": {"image": "face_1.png"}},
        "7": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["5", 0], "image": ["6", 0], "crop": "center"}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a man reading a book in a cozy cafe", "clip": ["3", 0]}},
        "9": {"class_type": "unCLIPConditioning", "inputs": {"conditioning": ["8", 0], "clip_vision_output": ["7", 0], "strength": 0.0, "noise_augmentation": 0.0}},
        "10": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["3", 0]}},
        "11": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "12": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["9", 0], "negative": ["10", 0], "latent_image": ["11", 0], **sample}},
        "13": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["9", 0], "negative": ["10", 0], "latent_image": ["12", 0], **sample, "denoise": 0.5}},
        "14": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["4", 0]}},
        "15": {"class_type": "SaveImage", "inputs": {"images": ["14", 0], "filename_prefix": "stock"}},
    }


def first_run(comfyui_path: Path, files, face_pngs: list[Path], stock: Path, graph: dict, scratch: Path) -> dict[str, int]:
    """Idle, peak and steady RSS (bytes) of a fresh server running ``graph`` once."""
    from harness import ComfyServer, make_base_directory

    base = make_base_directory(scratch, {"facediffuser_sdm.safetensors": files.sdm, "facediffuser_tdm.safetensors": files.tdm}, face_pngs)
    for path in STOCK:
        link = base / "models" / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(stock / path)
    server = ComfyServer(comfyui_path, base, suite_settings=False).start()
    try:
        idle = status(server.process.pid)["VmRSS"]
        entry = server.run(graph)
        if entry["status"]["status_str"] != "success":
            raise RuntimeError(f"the graph failed:\n{json.dumps(entry['status'])[:3000]}\n{server.log_tail()}")
        after = status(server.process.pid)
        return {"idle": idle, "peak": after["VmHWM"], "steady": after["VmRSS"]}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--steps", type=int, default=2, help="sampling steps (default 2: the first run's peak is in loading)")
    args = parser.parse_args()
    comfyui_path = Path(os.environ["COMFYUI_PATH"]).resolve()

    from PIL import Image

    from models import ensure_model_files
    from paths import FACES

    files = ensure_model_files(full_size=True)
    stock = files.root / "stock-loaders"
    models = write_stock_files(files, stock)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        face = Path(tmp) / "face_1.png"
        Image.open(sorted(FACES.glob("*.jpeg"))[0]).convert("RGB").save(face)
        for name, graph in (("ksampler (stock loaders)", stock_graph), ("facediffuser", pack_graph)):
            scratch = Path(tmp) / name.split()[0]
            rows[name] = first_run(comfyui_path, files, [face], stock, graph(args.size, args.steps), scratch)
    reference = rows["ksampler (stock loaders)"]["peak"]
    print(f"first run, {args.size} px, {args.steps} steps, --cpu; models in float32: {models / MIB:.0f} MiB")
    header = f"{'graph':<26}{'idle MiB':>10}{'peak RSS MiB':>14}{'steady MiB':>12}{'peak/models':>13}{'above idle':>12}{'vs ksampler':>13}"
    print(header + "\n" + "-" * len(header))
    for name, row in rows.items():
        print(
            f"{name:<26}{row['idle'] / MIB:>10.0f}{row['peak'] / MIB:>14.0f}{row['steady'] / MIB:>12.0f}"
            f"{row['peak'] / models:>12.2f}x{(row['peak'] - row['idle']) / models:>11.2f}x{row['peak'] / reference:>12.2f}x"
        )


if __name__ == "__main__":
    main()
