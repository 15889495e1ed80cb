"""Command line: ``python -m facediffuser_core convert IN -o OUT.safetensors [--dtype fp16|bf16|fp32] [--kind ...]``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .errors import FaceDiffuserError


def _convert(args: argparse.Namespace) -> int:
    from .checkpoints import ModelKind
    from .convert import convert_checkpoint

    kind = None if args.kind is None else ModelKind(KINDS[args.kind])
    report = convert_checkpoint(args.input, args.output, dtype=None if args.dtype == "keep" else args.dtype, kind=kind)
    print(
        f"wrote {report.dst} ({report.kind.description}, {report.tensors} tensors, "
        f"{report.input_bytes / 2**30:.2f} GiB -> {report.output_bytes / 2**30:.2f} GiB), verified"
    )
    if report.kind is ModelKind.SDM and kind is None:
        print("note: Face-diffuser's SDM and FastComposer's model have the same layout; this one was taken for an SDM (pass --kind fastcomposer if it is FastComposer's)")
    return 0


KINDS = {"sdm": "SDM", "tdm": "TDM", "fastcomposer": "FastComposer"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m facediffuser_core", description="Face-diffuser tools")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser(
        "convert",
        help="official pytorch_model.bin -> .safetensors",
        description="Convert an official Face-diffuser SDM or TDM checkpoint to safetensors (same keys), "
        "verifying that the written file reads back identical.",
    )
    convert.add_argument("input", help="pytorch_model.bin, or the SDM/, TDM/ or fastcomposer/ folder holding it")
    convert.add_argument("-o", "--output", required=True, help="output file, e.g. models/facediffuser/facediffuser_sdm.safetensors")
    convert.add_argument("--dtype", choices=["fp16", "bf16", "fp32", "keep"], default="fp16", help="floating-point dtype to store (default fp16)")
    convert.add_argument(
        "--kind",
        choices=list(KINDS),
        help="what the file is (default: from its name and components; FastComposer's model has the SDM's keys, "
        "so a file without 'fastcomposer' in its path needs --kind fastcomposer)",
    )
    convert.set_defaults(run=_convert)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (FaceDiffuserError, OSError) as error:  # OSError: unreadable input, unwritable output, full disk
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
