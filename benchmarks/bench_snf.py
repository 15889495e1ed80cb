"""Time of one Saliency-adaptive Noise Fusion vs one forward of a small conv net (and, with
``--sd15-unet``, of a random-weight SD1.5 UNet) at the same latent size.

    python benchmarks/bench_snf.py [--device cpu|cuda] [--repeats 20] [--sd15-unet] [--sizes 64x64 ...] [--batches 1 4]

Target: fusion costs well under 1% of an SD1.5 UNet step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from facediffuser_core.method.snf import fuse_noise  # noqa: E402

SIZES = ["64x64", "96x64", "128x128"]  # latent H x W: 512x512, 768x512, 1024x1024 images
BATCHES = [1, 4]


def small_conv_net() -> nn.Module:
    """Three 3x3 convolutions 4 -> 64 -> 64 -> 4: a stand-in far cheaper than a UNet."""
    return nn.Sequential(nn.Conv2d(4, 64, 3, padding=1), nn.SiLU(), nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(), nn.Conv2d(64, 4, 3, padding=1))


def median_ms(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def sd15_unet(device: torch.device) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).to(device).eval()


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sd15-unet", action="store_true", help="also time a random-weight SD1.5 UNet step (2B batch)")
    parser.add_argument("--sizes", nargs="+", default=SIZES, help="latent sizes HxW (default: %(default)s)")
    parser.add_argument("--batches", nargs="+", type=int, default=BATCHES)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = small_conv_net().to(device).eval()
    unet = sd15_unet(device) if args.sd15_unet else None
    header = f"{'latent':>9} {'batch':>5} {'fuse_noise ms':>14} {'conv net ms':>12} {'fuse/conv':>10}"
    if unet is not None:
        header += f" {'SD1.5 UNet ms':>14} {'fuse/UNet':>10}"
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(header)
    print("-" * len(header))
    for h, w in (map(int, size.split("x")) for size in args.sizes):
        for batch in args.batches:
            inputs = [torch.randn(batch, 4, h, w, device=device) for _ in range(4)]
            fuse_ms = median_ms(lambda: fuse_noise(*inputs), device, args.repeats)
            conv_ms = median_ms(lambda: net(inputs[0]), device, args.repeats)
            row = f"{h}x{w:<6} {batch:>5} {fuse_ms:>14.3f} {conv_ms:>12.3f} {fuse_ms / conv_ms:>9.1%}"
            if unet is not None:
                x = torch.randn(2 * batch, 4, h, w, device=device)
                context = torch.randn(2 * batch, 77, 768, device=device)
                t = torch.full((2 * batch,), 500, device=device)
                unet_ms = median_ms(lambda: unet(x, t, context), device, max(3, args.repeats // 5))
                row += f" {unet_ms:>14.1f} {fuse_ms / unet_ms:>9.3%}"
            print(row)


if __name__ == "__main__":
    main()
