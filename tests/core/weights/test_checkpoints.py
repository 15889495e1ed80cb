"""Reading, classifying and splitting official SDM / TDM checkpoints, and refusing everything else."""

from __future__ import annotations

import builtins
import errno
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from safetensors.torch import save_file

import factories
from facediffuser_core.weights import checkpoints
from facediffuser_core.weights.checkpoints import (
    ModelKind,
    load_checkpoint,
    read_state_dict,
    resolve_checkpoint_path,
    split_checkpoint,
)
from facediffuser_core.errors import CheckpointError
from malicious import CodeRunningPickle
from paths import ROOT

KINDS = ("SDM", "TDM")
SEEDS = {"SDM": 0, "TDM": 1}  # the seeds tests/conftest.py's official_files are built with
ATTN2_TO_K = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"


def save(path: Path, state: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def named(path: Path) -> str:
    """A regex matching an error message that starts with ``path``."""
    return "^" + re.escape(str(path))


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


@pytest.fixture(scope="module")
def official_state() -> dict[str, dict[str, torch.Tensor]]:
    """The state dicts the ``official_files`` were saved from."""
    return {kind: factories.official_state_dict(kind, "tiny", SEEDS[kind]) for kind in KINDS}


@pytest.fixture
def tdm_state(official_state) -> dict[str, torch.Tensor]:
    """A fresh copy of the TDM's state dict, for tests that damage it."""
    return dict(official_state["TDM"])


# --- reading -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_reads_official_file_with_its_dtype_mix(official_files, official_state, kind):
    state = read_state_dict(official_files[kind])
    assert_same_tensors(state, official_state[kind])
    dtypes = {t.dtype for t in state.values()}
    assert {torch.float32, torch.bfloat16, torch.int64} <= dtypes  # nothing was cast on reading


def test_folder_holding_official_file_is_accepted(official_files):
    folder = official_files["SDM"].parent
    assert resolve_checkpoint_path(folder) == official_files["SDM"]
    assert load_checkpoint(folder).path == official_files["SDM"]


WRITERS: dict[str, Callable[[Path, dict[str, torch.Tensor]], None]] = {
    "zip pickle": lambda path, state: torch.save(state, path),
    "legacy pickle": lambda path, state: torch.save(state, path, _use_new_zipfile_serialization=False),
    "state_dict wrapper": lambda path, state: torch.save({"state_dict": state}, path),
    "safetensors": lambda path, state: save_file(state, str(path), metadata={"format": "pt"}),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_reads_every_supported_layout(tmp_path, official_state, writer):
    path = tmp_path / ("model.safetensors" if writer == "safetensors" else "model.bin")
    WRITERS[writer](path, official_state["TDM"])
    checkpoint = load_checkpoint(path, expect=ModelKind.TDM)
    assert_same_tensors(read_state_dict(path), official_state["TDM"])
    assert checkpoint.path == path


# --- splitting ---------------------------------------------------------------------------------

def architecture_state_dicts(kind: str) -> dict[str, dict[str, torch.Tensor]]:
    """State dicts of the real architectures the official file of ``kind`` was built from."""
    seed = SEEDS[kind]
    components = {
        "unet": factories.unet("tiny", seed).state_dict(),
        "text_encoder": factories.text_encoder("tiny", seed + 1).state_dict(),
        "vae": factories.vae("tiny", seed + 2).state_dict(),
    }
    if kind == "SDM":
        components["subject_encoder"] = factories.subject_encoder("tiny", seed + 3).state_dict()
    return components


@pytest.mark.parametrize("kind", KINDS)
def test_split_gives_the_architectures_state_dicts(official_files, kind):
    checkpoint = load_checkpoint(official_files[kind], expect=ModelKind(kind))
    assert checkpoint.kind is ModelKind(kind)
    assert checkpoint.cross_attention_dim == factories.TINY_WIDTH
    expected = architecture_state_dicts(kind)
    if kind == "TDM":
        assert checkpoint.subject_encoder is None
    for component, reference in expected.items():
        actual = getattr(checkpoint, component)
        assert set(actual) == set(reference), component  # exactly the keys a strict load needs
        for key, tensor in reference.items():
            assert torch.equal(actual[key], tensor.to(actual[key].dtype)), (component, key)
    assert checkpoint.unet["conv_in.weight"].dtype == torch.float32
    assert checkpoint.text_encoder["text_model.final_layer_norm.weight"].dtype == torch.bfloat16


def test_split_shares_tensors_and_drops_derived_buffers(official_state):
    state = official_state["SDM"]
    checkpoint = split_checkpoint(state, "SDM.bin")
    assert checkpoint.unet["conv_in.weight"].data_ptr() == state["unet.conv_in.weight"].data_ptr()
    fc1 = "postfuse_module.mlp1.fc1.weight"
    assert checkpoint.subject_encoder[fc1].data_ptr() == state[fc1].data_ptr()
    for component in (checkpoint.text_encoder, checkpoint.subject_encoder):
        assert not [key for key in component if key.endswith("position_ids")]


def test_text_encoder_with_text_model_level_is_not_prefixed_twice(tdm_state):
    state = {k.replace("text_encoder.", "text_encoder.text_model.", 1): v for k, v in tdm_state.items()}
    checkpoint = split_checkpoint(state, "TDM.bin")
    assert set(checkpoint.text_encoder) == set(factories.text_encoder().state_dict())


# --- refusals ----------------------------------------------------------------------------------

MALICIOUS_WRITERS: dict[str, Callable[[Path, object], None]] = {
    "torch.save zip": lambda path, obj: torch.save(obj, path),
    "torch.save legacy": lambda path, obj: torch.save(obj, path, _use_new_zipfile_serialization=False),
    "pickle protocol 2": lambda path, obj: path.write_bytes(pickle.dumps(obj, protocol=2)),
    "pickle protocol 5": lambda path, obj: path.write_bytes(pickle.dumps(obj, protocol=5)),
}


def test_malicious_payload_really_runs_code(tmp_path):
    """Control for the refusal test below: plain unpickling does create the marker."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(CodeRunningPickle(marker)))
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", MALICIOUS_WRITERS)
def test_malicious_pickle_is_refused_and_never_run(tmp_path, tdm_state, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "pytorch_model.bin"
    MALICIOUS_WRITERS[writer](path, {"unet.extra": CodeRunningPickle(marker), **tdm_state})
    with pytest.raises(CheckpointError, match=named(path) + " was refused: .*never done") as error:
        load_checkpoint(path)
    assert not marker.exists()
    if writer != "pickle protocol 5":  # protocol 5 opcodes are refused before the global is seen
        assert re.search(r"would run code \((builtins\.)?exec\)", str(error.value))


def test_non_checkpoint_bytes_are_refused_as_corrupt(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(CheckpointError, match=named(path) + " was refused: weights-only loading cannot read it .*corrupt"):
        read_state_dict(path)


TRUNCATABLE = {
    "zip pickle": ("pytorch_model.bin", WRITERS["zip pickle"]),
    "legacy pickle": ("pytorch_model.bin", WRITERS["legacy pickle"]),
    "safetensors": ("model.safetensors", WRITERS["safetensors"]),
}


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.0], ids=["half", "most", "empty"])
@pytest.mark.parametrize("layout", TRUNCATABLE)
def test_truncated_file_is_a_clear_error(tmp_path, tdm_state, layout, keep):
    name, write = TRUNCATABLE[layout]
    path = tmp_path / name
    write(path, tdm_state)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    size = int(len(data) * keep)
    with pytest.raises(CheckpointError, match=named(path) + rf" could not be read \(.*\); the file \({size} bytes\) is probably truncated"):
        load_checkpoint(path)


# --- read errors name their real cause --------------------------------------------------------

# The OS's error for each failure, injected where read_state_dict opens the file (for both formats):
# a test run as root reads any file, and a file cannot be made to vanish or fail I/O on cue.
OS_ERRORS: dict[str, tuple[Callable[[Path], OSError], str]] = {
    "missing": (
        lambda path: FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path)),
        r": no such file \(it was removed or moved while it was being read\)$",
    ),
    "permission": (
        lambda path: PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path)),
        r" cannot be read: permission denied \(PermissionError: \[Errno 13\] .*\); make the file readable by the user",
    ),
    "disk": (
        lambda path: OSError(errno.EIO, os.strerror(errno.EIO), str(path)),
        r" could not be read \(OSError: \[Errno 5\] .*\): the disk or file system failed; check it",
    ),
}


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
@pytest.mark.parametrize("failure", OS_ERRORS)
def test_an_os_error_is_named_for_what_it_is(tmp_path, tdm_state, monkeypatch, failure, name):
    path = tmp_path / name
    (WRITERS["safetensors"] if name.endswith(".safetensors") else WRITERS["zip pickle"])(path, tdm_state)
    make_error, message = OS_ERRORS[failure]
    raised = make_error(path)

    def fail_on_the_checkpoint(file, *args, **kwargs):
        if Path(file) == path:
            raise raised
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "open", fail_on_the_checkpoint, raising=False)
    with pytest.raises(CheckpointError, match=named(path) + message) as error:
        read_state_dict(path)
    assert error.value.__cause__ is raised
    assert "truncated" not in str(error.value)


READ_CHILD = """
import resource, sys
from facediffuser_core.weights.checkpoints import read_state_dict
from facediffuser_core.errors import CheckpointError

if sys.argv[1:]:  # limit the address space to this many bytes more than this process holds now
    size = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (size + int(sys.argv[1]),) * 2)
for path in sys.stdin.read().splitlines():
    try:
        read_state_dict(path)
        print("read")
    except CheckpointError as error:
        print(f"{type(error.__cause__).__name__} | {error}")
"""


def read_in_child(paths: list[Path], headroom: Optional[int] = None, command: tuple[str, ...] = ()) -> list[str]:
    """Per path, ``<cause type> | <error>`` from read_state_dict in a fresh process (``headroom``:
    bytes of address space it may add; ``command``: a prefix such as setpriv). The paths go
    through stdin."""
    argv = [*command, sys.executable, "-c", READ_CHILD, *([str(headroom)] if headroom else [])]
    done = subprocess.run(argv, input="\n".join(map(str, paths)), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == len(paths), done.stdout
    return done.stdout.splitlines()


def without_root_file_access() -> tuple[str, ...]:
    """A command prefix under which this user cannot read a file it has no permission for: none
    for a normal user; for root, setpriv dropping the capabilities that bypass permissions."""
    if os.geteuid() != 0:
        return ()
    drop = "-dac_override,-dac_read_search"
    command = ("setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}")
    if shutil.which("setpriv") is None or subprocess.run([*command, "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root, which reads any file, and setpriv cannot drop that capability here")
    return command


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="file permissions are POSIX's")
def test_an_unreadable_file_is_a_permission_error(tmp_path, tdm_state):
    """For real: safetensors alone would report the refused open as FileNotFoundError."""
    paths = [tmp_path / "model.safetensors", tmp_path / "pytorch_model.bin"]
    WRITERS["safetensors"](paths[0], tdm_state)
    WRITERS["zip pickle"](paths[1], tdm_state)
    for path in paths:
        path.chmod(0)
    for path, line in zip(paths, read_in_child(paths, command=without_root_file_access())):
        assert line.startswith(f"PermissionError | {path} cannot be read: permission denied"), line


def corrupt_size_field(path: Path) -> None:
    """A legacy pickle of 100000 floats whose stored element count says 2**31 - 1: reading it
    allocates far more than the file holds."""
    torch.save({"unet.weight": torch.zeros(100_000)}, path, _use_new_zipfile_serialization=False)
    count = b"J" + struct.pack("<i", 100_000)  # pickle BININT
    data = path.read_bytes()
    assert count in data
    path.write_bytes(data.replace(count, b"J" + struct.pack("<i", 2**31 - 1)))


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="the address-space limit is read from /proc (Linux)")
def test_out_of_memory_is_named_and_a_corrupt_size_is_not(tmp_path):
    """Each file is read in a process whose address space has 16 MiB to spare: the 64 MiB files do
    not fit (torch 2.x fails its mmap, or its allocator, safetensors raises MemoryError), and the
    corrupt file's impossible allocation is named as corruption, not as a lack of memory."""
    state = {"unet.weight": torch.zeros(16 * 2**20)}
    paths = []
    for layout in ("zip pickle", "legacy pickle", "safetensors"):
        path = tmp_path / layout.replace(" ", "_") / ("model.safetensors" if layout == "safetensors" else "pytorch_model.bin")
        path.parent.mkdir()
        WRITERS[layout](path, state)
        paths.append(path)
    corrupt = tmp_path / "corrupt.bin"
    corrupt_size_field(corrupt)
    lines = read_in_child([*paths, corrupt], headroom=16 * 2**20)
    for path, line in zip(paths, lines[:3]):
        assert re.search(re.escape(f"| {path} could not be loaded: out of memory (") + ".*" + re.escape(
            f"Loading takes about the file's size ({path.stat().st_size} bytes) of free memory"), line), line
    assert re.search(re.escape(f"| {corrupt} could not be read (") + ".*" + re.escape(
        f"the file ({corrupt.stat().st_size} bytes) is probably truncated or corrupt"), lines[3]), lines[3]


@pytest.mark.parametrize(
    ("content", "found"),
    [
        ([torch.zeros(2)], "found a list"),
        ({"unet.conv_in.weight": torch.zeros(2), "global_step": 7}, "found 'global_step': a int"),
    ],
    ids=["list", "non-tensor value"],
)
def test_file_without_a_tensor_dict_is_refused(tmp_path, content, found):
    path = save(tmp_path / "model.bin", content)
    with pytest.raises(CheckpointError, match=named(path) + rf" does not hold a dict of tensors \({found}"):
        read_state_dict(path)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("missing.bin", "no such file"),
        ("notes.txt", "unsupported file type '.txt'"),
    ],
)
def test_missing_or_unsupported_file(tmp_path, path, message):
    target = tmp_path / path
    if target.suffix == ".txt":
        target.write_text("hello")
    with pytest.raises(CheckpointError, match=named(target) + ".*" + re.escape(message)):
        load_checkpoint(target)


def test_folder_without_official_file(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=named(tmp_path) + r" is a folder without pytorch_model.bin; it holds \['model.ckpt'\]"):
        load_checkpoint(tmp_path)


SINGLE_FILE_CHECKPOINTS = {
    "SDXL": (
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
            "model.diffusion_model.label_emb.0.0.weight": torch.zeros(1280, 2816),
            "conditioner.embedders.1.model.token_embedding.weight": torch.zeros(8, 1280),
            "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3),
        },
        "an SDXL checkpoint",
    ),
    "SD1.5": (
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(8, 768),
            "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3),
        },
        r"a single-file Stable Diffusion checkpoint \(model.diffusion_model.\*\)",
    ),
}


@pytest.mark.parametrize("family", SINGLE_FILE_CHECKPOINTS)
@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "state_dict wrapper"])
def test_single_file_sd_checkpoints_are_named(tmp_path, family, wrapped):
    state, found = SINGLE_FILE_CHECKPOINTS[family]
    path = save(tmp_path / "model.ckpt", {"state_dict": state} if wrapped else state)
    with pytest.raises(CheckpointError, match=named(path) + f" is {found}, not a Face-diffuser SDM or TDM"):
        load_checkpoint(path)


def test_sdxl_shaped_unet_is_refused_with_both_widths(tmp_path, tdm_state):
    for key in [k for k in tdm_state if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]:
        tdm_state[key] = torch.zeros(tdm_state[key].shape[0], 2048)
    path = save(tmp_path / "pytorch_model.bin", tdm_state)
    width = factories.TINY_WIDTH
    message = rf".*cross-attention width is 2048 \(SDXL-shaped\) but the text encoder's is {width}"
    with pytest.raises(CheckpointError, match=named(path) + message):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("kind", "removed"),
    [
        ("TDM", "text_encoder."),
        ("TDM", "vae."),
        ("SDM", "postfuse_module."),
        ("SDM", "image_encoder.visual_projection."),
        ("SDM", "image_encoder.vision_model."),
    ],
)
def test_missing_component_is_named(tmp_path, official_state, kind, removed):
    state = {k: v for k, v in official_state[kind].items() if not k.startswith(removed)}
    path = save(tmp_path / "pytorch_model.bin", state)
    with pytest.raises(CheckpointError, match=named(path) + rf" is incomplete: it lacks {re.escape(removed)}\* \(found \["):
        load_checkpoint(path)


MALFORMED: dict[str, tuple[Callable[[str], bool], dict[str, torch.Tensor], str]] = {
    # name: (keys to drop, tensors to add, error message)
    "no unet": (lambda k: k.startswith("unet."), {}, r"has no Face-diffuser components \(no unet.\* keys\); found \['text_encoder.\*', 'vae.\*'\]"),
    "not diffusers layout": (lambda k: k == "unet.conv_in.weight", {}, r"the UNet is not in diffusers layout \(no unet.conv_in.weight\)"),
    "inpainting unet": (lambda k: False, {"unet.conv_in.weight": torch.zeros(32, 9, 3, 3)}, "the UNet takes 9 latent channels; SD1.5 UNets take 4"),
    "no cross-attention": (lambda k: "attn2" in k, {}, r"the UNet has no cross-attention \(attn2\) layers"),
    "no token embedding": (lambda k: "token_embedding" in k, {}, "the text encoder has no token embedding"),
}


@pytest.mark.parametrize("damage", MALFORMED)
def test_malformed_unet_or_text_encoder_is_named(tmp_path, tdm_state, damage):
    drop, extra, message = MALFORMED[damage]
    path = save(tmp_path / "pytorch_model.bin", {**{k: v for k, v in tdm_state.items() if not drop(k)}, **extra})
    with pytest.raises(CheckpointError, match=named(path) + ".*" + message):
        load_checkpoint(path)


@pytest.mark.parametrize(("given", "expected"), [("TDM", "SDM"), ("SDM", "TDM")])
def test_swapped_models_are_reported(official_files, given, expected):
    found = ModelKind(given).description
    with pytest.raises(CheckpointError, match=named(official_files[given]) + rf" is a {re.escape(found)}, .*{expected}\).*swapped"):
        load_checkpoint(official_files[given], expect=ModelKind(expected))
