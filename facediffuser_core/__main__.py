"""Command line: ``python -m facediffuser_core convert IN -o OUT.safetensors [--dtype fp16|bf16|fp32]``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .errors import FaceDiffuserError


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint

    report = convert_checkpoint(args.input, args.output, dtype=None if args.dtype == "keep" else args.dtype)
    print(
        f"wrote {report.dst} ({report.kind.value}, {report.tensors} tensors, "
        f"{report.input_bytes / 2**30:.2f} GiB -> {report.output_bytes / 2**30:.2f} GiB), verified"
    )
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m facediffuser_core", description="Face-diffuser tools")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser(
        "convert",
        help="official pytorch_model.bin -> .safetensors",
        description="Convert an official Face-diffuser SDM or TDM checkpoint to safetensors (same keys), "
        "verifying that the written file reads back identical.",
    )
    convert.add_argument("input", help="pytorch_model.bin, or the SDM/ or TDM/ folder holding it")
    convert.add_argument("-o", "--output", required=True, help="output file, e.g. models/facediffuser/facediffuser_sdm.safetensors")
    convert.add_argument("--dtype", choices=["fp16", "bf16", "fp32", "keep"], default="fp16", help="floating-point dtype to store (default fp16)")
    convert.set_defaults(run=_convert)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (FaceDiffuserError, OSError) as error:  # OSError: unreadable input, unwritable output, full disk
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
