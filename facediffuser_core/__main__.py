"""Command line, run in the pack's folder inside ComfyUI's ``custom_nodes`` (or by the pack's ``cli.py``,
from anywhere). No console script is installed: the commands find ComfyUI and print ``cli.py`` command
lines from the pack's place in ``custom_nodes``, which a copy in site-packages does not have.

- ``python -m facediffuser_core generate --face PHOTO --prompt "a man <|image|> ..." -o OUT``
- ``python -m facediffuser_core download [--fastcomposer] [--scores] [--all] [--to DIR] [--keep-original]``
- ``python -m facediffuser_core convert IN -o OUT.safetensors [--dtype fp16|bf16|fp32] [--kind sdm|tdm|fastcomposer]``
- ``python -m facediffuser_core evaluate --subjects DIR --prompts FILE --out DIR --server HOST:PORT``

Exit codes: 0 done, 1 a job that failed in ComfyUI, 2 usage, input or server error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Optional, Sequence

from .commands.comfy_client import JobError, ServerUnavailable
from .errors import FaceDiffuserError

KINDS = {"sdm": "SDM", "tdm": "TDM", "fastcomposer": "FastComposer"}  # convert --kind -> ModelKind value


def _convert(args: argparse.Namespace) -> int:
    from .weights.checkpoints import ModelKind
    from .weights.convert import convert_checkpoint

    kind = None if args.kind is None else ModelKind(KINDS[args.kind])
    report = convert_checkpoint(args.input, args.output, dtype=None if args.dtype == "keep" else args.dtype, kind=kind)
    print(
        f"wrote {report.dst} ({report.kind.description}, {report.tensors} tensors, "
        f"{report.input_bytes / 2**30:.2f} GiB -> {report.output_bytes / 2**30:.2f} GiB), verified"
    )
    if report.kind is ModelKind.SDM and kind is None:
        print("note: Face-diffuser's SDM and FastComposer's model have the same layout; this one was taken for an SDM (pass --kind fastcomposer if it is FastComposer's)")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .commands.generate import generate

    return generate(args)


def _download(args: argparse.Namespace) -> int:
    from .commands.download import download

    return download(args)


def _evaluate(args: argparse.Namespace) -> int:
    from .commands.evaluate import run

    return run(args)


def parser() -> argparse.ArgumentParser:
    from .commands import download, evaluate
    from .commands.generate import add_arguments

    main_parser = argparse.ArgumentParser(prog="python -m facediffuser_core", description="Face-diffuser tools")
    commands = main_parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser(
        "generate",
        help="face photos and a prompt in, pictures out (through ComfyUI)",
        description="Generate pictures of the people in the --face photos in the scene the prompt describes, with "
        "the Face-diffuser nodes in ComfyUI: a running one (--server) or the one this pack is installed in, "
        "started for the run and stopped afterwards.",
        epilog='Example: python -m facediffuser_core generate --face me.jpg --prompt "a man <|image|> as an astronaut on the moon" -o out',
    )
    add_arguments(generate)
    generate.set_defaults(run=_generate)
    fetch = commands.add_parser(
        "download",
        help="the official models, ready in ComfyUI's models/facediffuser (and models/facenet, models/clip_eval)",
        description="Download the official models (Face-diffuser's SDM and TDM by default) from the Hugging Face Hub "
        "(HF_ENDPOINT and HF_TOKEN apply) and convert them to safetensors under the names the nodes and generate "
        "use, in the model folders of the ComfyUI this pack is installed in; --scores stores the score models "
        "(FaceNet from facenet-pytorch's release, CLIP ViT-L/14 from the hub) as published. A model already there "
        "is skipped; a download that was cut off resumes.",
        epilog="Example: python -m facediffuser_core download --all",
    )
    download.add_arguments(fetch)
    fetch.set_defaults(run=_download)
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
        "so a file without 'fastcomposer' in its name or folder needs --kind fastcomposer)",
    )
    convert.set_defaults(run=_convert)
    scores = commands.add_parser(
        "evaluate",
        help="the paper's benchmark on ComfyUI servers: images, then Identity Preservation and Prompt Consistency scores",
        description=evaluate.DESCRIPTION,
        epilog=evaluate.EPILOG,
    )
    evaluate.add_arguments(scores)
    scores.set_defaults(run=_evaluate)
    return main_parser


def exit_code(error: BaseException) -> int:
    """The exit code of a command that stopped with ``error``: 1 for a job ComfyUI refused or failed,
    2 for bad input or a server that cannot be used, 130 for Ctrl-C (or SIGTERM)."""
    if isinstance(error, JobError):
        return 1
    if isinstance(error, KeyboardInterrupt):
        return 130
    return 2


def _terminate(signum: int, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops like Ctrl-C: a ComfyUI started for the run is stopped too


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.run(args)
    except (JobError, ServerUnavailable, FaceDiffuserError, OSError, KeyboardInterrupt) as error:  # OSError: unreadable input, unwritable output, full disk
        print(f"error: {error}" if str(error) else "interrupted", file=sys.stderr)
        return exit_code(error)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
