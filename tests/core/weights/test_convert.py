"""The official-file -> safetensors converter: round trips per dtype, the hand-written safetensors
writer, refusals that leave no output behind, and the ``python -m facediffuser_core convert`` CLI."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import convert_memory
import factories
from facediffuser_core.weights import convert
from facediffuser_core.__main__ import main
from facediffuser_core.weights.checkpoints import ModelKind, load_checkpoint, read_state_dict
from facediffuser_core.weights.convert import ConversionReport, convert_checkpoint
from facediffuser_core.errors import CheckpointError
from facediffuser_core.method.subject_encoder import SubjectEncoder

ROOT = Path(__file__).resolve().parents[3]
KINDS = ("SDM", "TDM")
TARGETS: dict[str, Optional[torch.dtype]] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "keep": None}


def cast(tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    """What the converter should store for ``tensor`` with ``--dtype dtype``."""
    target = TARGETS[dtype]
    return tensor.to(target) if target is not None and tensor.is_floating_point() else tensor


def api_dtype(dtype: str) -> Optional[str]:
    return None if dtype == "keep" else dtype


def leftovers(dst: Path) -> list[str]:
    """Files the converter may have left next to ``dst``."""
    return sorted(p.name for p in dst.parent.iterdir() if p.name.startswith(dst.name))


@dataclass(frozen=True)
class Conversion:
    kind: str
    dtype: str
    src: Path
    dst: Path
    report: ConversionReport


@pytest.fixture(scope="module", params=[(k, d) for k in KINDS for d in TARGETS], ids="-".join)
def conversion(request, official_files, tmp_path_factory) -> Conversion:
    """Each tiny official file converted once per dtype."""
    kind, dtype = request.param
    dst = tmp_path_factory.mktemp("converted") / f"{kind.lower()}_{dtype}.safetensors"
    report = convert_checkpoint(official_files[kind], dst, dtype=api_dtype(dtype), progress=False)
    return Conversion(kind, dtype, official_files[kind], dst, report)


@pytest.fixture
def tdm_state() -> dict[str, torch.Tensor]:
    return factories.official_state_dict("TDM")


# --- round trips -------------------------------------------------------------------------------

def test_round_trip_equals_the_original_cast(conversion):
    original = read_state_dict(conversion.src)
    converted = read_state_dict(conversion.dst)
    assert set(converted) == set(original)
    for key, tensor in original.items():
        expected = cast(tensor, conversion.dtype)
        assert (converted[key].dtype, converted[key].shape) == (expected.dtype, expected.shape), key
        assert torch.equal(converted[key], expected), key
    assert converted["text_encoder.embeddings.position_ids"].dtype == torch.int64
    float_dtypes = {t.dtype for t in converted.values() if t.is_floating_point()}
    target = TARGETS[conversion.dtype]
    assert float_dtypes == ({torch.float32, torch.bfloat16} if target is None else {target})


def test_report_metadata_and_no_partial_file(conversion):
    with safe_open(str(conversion.dst), framework="pt") as written:
        metadata = written.metadata()
    assert metadata == {"format": "pt", "facediffuser_kind": conversion.kind, "source": "pytorch_model.bin"}
    report = conversion.report
    assert report.kind is ModelKind(conversion.kind)
    assert report.tensors == len(read_state_dict(conversion.src))
    assert (report.input_bytes, report.output_bytes) == (conversion.src.stat().st_size, conversion.dst.stat().st_size)
    assert report.dst == conversion.dst
    assert leftovers(conversion.dst) == [conversion.dst.name]


def assert_holds(model: torch.nn.Module, component: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, component[key].to(value.dtype)), key


def test_components_load_strictly_into_the_real_architectures(conversion):
    checkpoint = load_checkpoint(conversion.dst, expect=ModelKind(conversion.kind))
    # another seed than the file's, so that equal weights afterwards prove they were loaded
    models = {
        "unet": factories.unet("tiny", seed=99),
        "text_encoder": factories.text_encoder("tiny", seed=99),
        "vae": factories.vae("tiny", seed=99),
    }
    for name, model in models.items():
        component = getattr(checkpoint, name)
        model.load_state_dict(component, strict=True)
        assert_holds(model, component)
    if conversion.kind == "SDM":
        assert_holds(SubjectEncoder.from_state_dict(checkpoint.subject_encoder), checkpoint.subject_encoder)
    else:
        assert checkpoint.subject_encoder is None


def test_a_converted_file_converts_again(conversion, tmp_path):
    """A .safetensors is a valid input too (e.g. to change the dtype of an fp32 conversion)."""
    dst = tmp_path / "again.safetensors"
    report = convert_checkpoint(conversion.dst, dst, dtype="fp16", progress=False)
    assert report.kind is ModelKind(conversion.kind)
    original, again = read_state_dict(conversion.dst), read_state_dict(dst)
    assert all(torch.equal(again[k], cast(v, "fp16")) for k, v in original.items())


# --- the hand-written safetensors writer ------------------------------------------------------

CHUNK = 1000  # elements per cast chunk in the writer test; the last three tensors span several
EDGE_TENSORS = {
    "unet.edge.scalar": torch.tensor(3.5),
    "unet.edge.bool_scalar": torch.tensor(True),
    "unet.edge.empty": torch.zeros(0, 3),
    "unet.edge.bf16": torch.tensor([1.5, -2.25, 3e4, 1e-3]).bfloat16(),
    "unet.edge.int8": torch.tensor([-128, 0, 127], dtype=torch.int8),
    "unet.edge.int32": torch.tensor([[-(2**31), 2**31 - 1]], dtype=torch.int32),
    "unet.edge.float64": torch.tensor([0.1, -7.0], dtype=torch.float64),
    "unet.edge.bool": torch.arange(2 * CHUNK + 1) % 3 == 0,
    "unet.edge.nonfinite": torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0]).repeat(CHUNK // 2 + 1),
    "unet.edge.transposed": torch.arange(CHUNK * 2.4).reshape(40, -1).t(),
}


@pytest.mark.parametrize("dtype", TARGETS)
def test_writer_output_is_valid_safetensors(tmp_path, tdm_state, monkeypatch, dtype):
    # small chunks and read-back windows, so that tensors span chunks and the output is reopened often
    monkeypatch.setattr(convert, "_CHUNK", CHUNK)
    monkeypatch.setattr(convert, "_VERIFY_WINDOW", 4 * CHUNK)
    state = {**tdm_state, **EDGE_TENSORS}
    src, dst = tmp_path / "pytorch_model.bin", tmp_path / "out.safetensors"
    torch.save(state, src)
    convert_checkpoint(src, dst, dtype=api_dtype(dtype), progress=False)
    with open(dst, "rb") as file:
        assert int.from_bytes(file.read(8), "little") % 8 == 0  # tensor data 8-byte aligned, as safetensors writes it
    with safe_open(str(dst), framework="pt") as written:
        assert written.metadata()["facediffuser_kind"] == "TDM"
        assert set(written.keys()) == set(state)
        for key, tensor in state.items():
            torch.testing.assert_close(written.get_tensor(key), cast(tensor, dtype), rtol=0, atol=0, equal_nan=True, msg=key)


@pytest.mark.parametrize(("dtype", "refused"), [("fp16", True), ("bf16", False), ("fp32", False)])
def test_fp16_overflow_is_refused_suggesting_bf16_or_fp32(tmp_path, tdm_state, dtype, refused):
    tdm_state["unet.conv_in.weight"][0, 0, 0, 0] = 1e6
    src, dst = tmp_path / "pytorch_model.bin", tmp_path / "out.safetensors"
    torch.save(tdm_state, src)
    if refused:
        message = re.escape(f"{src}: tensor unet.conv_in.weight overflows fp16 (it holds 1e+06); convert with --dtype bf16 or fp32")
        with pytest.raises(CheckpointError, match=message):
            convert_checkpoint(src, dst, dtype=dtype, progress=False)
        assert leftovers(dst) == []
    else:
        convert_checkpoint(src, dst, dtype=dtype, progress=False)
        assert read_state_dict(dst)["unet.conv_in.weight"][0, 0, 0, 0].item() == pytest.approx(1e6, rel=1e-2)


# --- refusals leave no output behind ----------------------------------------------------------

def write_sdxl(path: Path) -> None:
    torch.save({"model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 4)}, path)


def write_overflowing(path: Path) -> None:
    state = factories.official_state_dict("TDM")
    state["vae.decoder.conv_out.bias"][0] = -1e6
    torch.save(state, path)


def corrupt_after_writing(monkeypatch) -> None:
    """Make the written file differ from what was written: flip its last byte."""
    write = convert._write

    def write_then_corrupt(path: Path, *args, **kwargs) -> dict[str, bytes]:
        digests = write(path, *args, **kwargs)
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
        return digests

    monkeypatch.setattr(convert, "_write", write_then_corrupt)


def write_tdm(path: Path) -> None:
    torch.save(factories.official_state_dict("TDM"), path)


FAILURES: dict[str, tuple[Callable[[Path], None], Callable[[pytest.MonkeyPatch], None], str]] = {
    # name: (input writer, patch, error message)
    "SDXL input": (write_sdxl, lambda mp: None, "is an SDXL checkpoint"),
    "fp16 overflow": (write_overflowing, lambda mp: None, "overflows fp16"),
    "read-back mismatch": (write_tdm, corrupt_after_writing, "tensor vae.post_quant_conv.bias reads back different"),
}


@pytest.mark.parametrize("failure", FAILURES)
def test_failed_conversion_leaves_the_output_untouched(tmp_path, monkeypatch, failure):
    write_input, patch, message = FAILURES[failure]
    src, dst = tmp_path / "pytorch_model.bin", tmp_path / "out.safetensors"
    write_input(src)
    patch(monkeypatch)
    dst.write_bytes(b"previous conversion")
    with pytest.raises(CheckpointError, match=message):
        convert_checkpoint(src, dst, dtype="fp16", progress=False)
    assert dst.read_bytes() == b"previous conversion"
    assert leftovers(dst) == [dst.name]


def test_output_must_be_safetensors(official_files, tmp_path):
    dst = tmp_path / "out.bin"
    with pytest.raises(CheckpointError, match=re.escape(f"{dst}: the output file name must end in .safetensors")):
        convert_checkpoint(official_files["TDM"], dst, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_output_must_not_overwrite_input(tmp_path, tdm_state):
    path = tmp_path / "tdm.safetensors"
    save_file(tdm_state, str(path))
    (tmp_path / "sub").mkdir()
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: the output must not overwrite the input")):
        convert_checkpoint(tmp_path / "sub" / ".." / path.name, path, progress=False)
    assert path.read_bytes() == before


def test_unknown_dtype(official_files, tmp_path):
    with pytest.raises(CheckpointError, match=r"unknown dtype 'fp8'; choose one of fp16, bf16, fp32"):
        convert_checkpoint(official_files["TDM"], tmp_path / "out.safetensors", dtype="fp8", progress=False)


# --- command line ------------------------------------------------------------------------------

def run_cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "facediffuser_core", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("dtype", ["fp16", "keep"])
def test_cli_converts_with_progress_and_summary(official_files, tmp_path, dtype):
    dst = tmp_path / "facediffuser_sdm.safetensors"
    done = run_cli("convert", official_files["SDM"].parent, "-o", dst, "--dtype", dtype)
    assert done.returncode == 0, done.stderr
    tensors = len(read_state_dict(official_files["SDM"]))
    summary, note = done.stdout.splitlines()
    assert re.fullmatch(rf"wrote {re.escape(str(dst))} \(subject-augmented model \(SDM\), {tensors} tensors, \d+\.\d\d GiB -> \d+\.\d\d GiB\), verified", summary)
    assert note.startswith("note: Face-diffuser's SDM and FastComposer's model have the same layout") and "--kind fastcomposer" in note
    assert re.search(r"convert: 100%.*B/s", done.stderr) and re.search(r"verify: 100%", done.stderr)
    converted = read_state_dict(dst)
    assert converted["unet.conv_in.weight"].dtype == (torch.float16 if dtype == "fp16" else torch.float32)
    assert converted["text_encoder.final_layer_norm.weight"].dtype == (torch.float16 if dtype == "fp16" else torch.bfloat16)


def test_fastcomposer_files_are_told_by_name_or_kind_and_recorded(official_files, tmp_path):
    """FastComposer's model has the SDM's keys: its kind comes from its path or --kind, is recorded in
    the metadata, and the converted file declares it wherever it is afterwards."""
    named = tmp_path / "fastcomposer" / "pytorch_model.bin"  # the official download's folder name
    named.parent.mkdir()
    named.symlink_to(official_files["SDM"])
    done = run_cli("convert", named.parent, "-o", tmp_path / "fc.safetensors")
    assert done.returncode == 0, done.stderr
    assert "(FastComposer model (the SDM's layout)," in done.stdout and "note:" not in done.stdout
    moved = tmp_path / "renamed.safetensors"  # the name no longer says it: the metadata does
    (tmp_path / "fc.safetensors").rename(moved)
    with safe_open(str(moved), framework="pt") as written:
        assert written.metadata()["facediffuser_kind"] == "FastComposer"
    checkpoint = load_checkpoint(moved, expect=ModelKind.SDM)  # usable wherever an SDM is
    assert checkpoint.kind is ModelKind.FASTCOMPOSER and checkpoint.subject_encoder
    assert convert_checkpoint(moved, tmp_path / "again.safetensors", progress=False).kind is ModelKind.FASTCOMPOSER

    done = run_cli("convert", official_files["SDM"], "-o", tmp_path / "kind.safetensors", "--kind", "fastcomposer")
    assert done.returncode == 0 and "FastComposer model" in done.stdout
    done = run_cli("convert", official_files["TDM"], "-o", tmp_path / "bad.safetensors", "--kind", "fastcomposer")
    assert done.returncode == 2 and "was given as a FastComposer model (the SDM's layout) but its components are those of a text-driven model (TDM)" in done.stderr
    with pytest.raises(CheckpointError, match=r"is a FastComposer model \(the SDM's layout\), but a text-driven model \(TDM\) was expected"):
        load_checkpoint(moved, expect=ModelKind.TDM)


def test_cli_bad_input_exits_2_naming_the_file(tmp_path):
    src = tmp_path / "sd_xl_base_1.0.bin"
    write_sdxl(src)
    done = run_cli("convert", src, "-o", tmp_path / "out.safetensors")
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: {src} is an SDXL checkpoint")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out.safetensors").exists()


def truncated(tmp: Path) -> Path:
    path = tmp / "pytorch_model.bin"
    write_tdm(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


CLI_FAILURES: dict[str, tuple[Callable[[Path], Path], str, str]] = {
    # name: (input maker, output path relative to the input's folder, start of the error message)
    "missing input": (lambda tmp: tmp / "nothing.bin", "out.safetensors", "{src}: no such file"),
    "truncated input": (truncated, "out.safetensors", "{src} could not be read"),
    "wrong output suffix": (lambda tmp: factories.write_official(tmp, "TDM"), "out.ckpt", "{dst}: the output file name must end in .safetensors"),
    "output folder is a file": (lambda tmp: factories.write_official(tmp, "TDM"), "pytorch_model.bin/out.safetensors", "[Errno 17] File exists: '{src}'"),
}


@pytest.mark.parametrize("failure", CLI_FAILURES)
def test_cli_errors_exit_2_with_a_message(tmp_path, capsys, failure):
    make_src, output, message = CLI_FAILURES[failure]
    src = make_src(tmp_path)
    dst = src.parent / output
    assert main(["convert", str(src), "-o", str(dst)]) == 2
    assert capsys.readouterr().err.startswith("error: " + message.format(src=src, dst=dst))
    assert not dst.exists()


# --- peak memory -------------------------------------------------------------------------------

MEMORY_BOUND = 1.3  # peak RSS above an idle interpreter, as a multiple of the input file's size


@pytest.mark.skipif(not convert_memory.STATUS.is_file(), reason="peak RSS is read from /proc/self/status (Linux)")
def test_peak_memory_stays_within_1_3x_the_input(tmp_path):
    """A 256 MiB official-layout SDM converted by the CLI in a child process, to fp16 (the default)
    and to fp32 (the largest output); benchmarks/bench_convert.py reports the same numbers."""
    src = tmp_path / "SDM" / "pytorch_model.bin"
    convert_memory.write_padded_sdm(src, 256)
    _, baseline = convert_memory.run_child([])
    for dtype in ("fp16", "fp32"):
        dst = tmp_path / f"sdm_{dtype}.safetensors"
        _, peak = convert_memory.run_child(["convert", str(src), "-o", str(dst), "--dtype", dtype])
        assert dst.is_file()
        ratio = (peak - baseline) / src.stat().st_size
        assert ratio <= MEMORY_BOUND, f"--dtype {dtype}: peak {(peak - baseline) / 2**20:.0f} MiB above an idle interpreter, {ratio:.2f}x the input"
        dst.unlink()
