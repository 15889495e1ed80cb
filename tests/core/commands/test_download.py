"""The ``download`` command against a fake hub on 127.0.0.1 (tests/fake_hub.py, through HF_ENDPOINT)
serving tiny random official-layout files: download and conversion into the ComfyUI's model folder,
a second run that fetches nothing, a cut-off download resumed with a ranged request (and one stopped
before its rename finished with no request), a corrupted file refused, too little disk space refused
before any byte, and the folders ComfyUI searches. The score
models: a tiny CLIP folder from the hub and random FaceNet weights as a plain web file (the release
file's stand-in, through FACEDIFFUSER_FACENET_URL)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save as safetensors_bytes

from facediffuser_core.commands import download as download_module
from facediffuser_core.__main__ import main
from facediffuser_core.weights.checkpoints import ModelKind
from facediffuser_core.commands.comfy_launch import find_comfyui
from facediffuser_core.errors import FaceDiffuserError
from facediffuser_core.commands.comfy_client import DEFAULT_SDM, DEFAULT_TDM
from facediffuser_core.weights.convert import convert_checkpoint
from facediffuser_core.commands.generate import UsageError, check_models
from facediffuser_core.weights.model_folders import comfyui_model_folders, desktop_app_config
from fake_hub import CLIP_FILES, CLIP_REPO, FACENET_KEY, SDM_KEY, TDM_KEY, download_env, official_hub
from paths import ROOT
from processes import sigint_default

CONTROLNET_KEY = "comfyanonymous/ControlNet-v1-1_fp16_safetensors/control_v11p_sd15_openpose_fp16.safetensors"
FACEDIFFUSER_LICENSE = "license of CodeGoat24/Face-diffuser: non-commercial academic use only"


@pytest.fixture
def hub(official_files, facenet_file, tiny_clip_folder, monkeypatch):
    """The fake hub with the official models' stand-ins (fake_hub.official_hub), in the environment."""
    server = official_hub(official_files, facenet_file, tiny_clip_folder)
    for name, value in download_env(server).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield server
    server.close()


@pytest.fixture
def comfyui(tmp_path) -> Path:
    root = tmp_path / "ComfyUI"
    (root / "comfy").mkdir(parents=True)
    (root / "main.py").write_text("")
    return root


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["download", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def reference(source: Path, tmp_path: Path, kind: ModelKind) -> Path:
    """``source`` converted by the pack's converter, as ``convert`` writes it."""
    return convert_checkpoint(source, tmp_path / "reference" / f"{kind.value}.safetensors", progress=False, kind=kind).dst


def assert_same_model(written: Path, expected: Path) -> None:
    actual, wanted = load_file(written), load_file(expected)
    assert actual.keys() == wanted.keys() and len(actual) > 10
    assert all(actual[name].dtype == wanted[name].dtype and actual[name].equal(wanted[name]) for name in wanted)
    with safe_open(str(written), "pt") as a, safe_open(str(expected), "pt") as b:
        assert a.metadata() == b.metadata()


def model_files(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()) if folder.exists() else []


def test_download_converts_the_official_files_into_the_comfyuis_model_folder(hub, comfyui, official_files, tmp_path, capsys):
    code, out, err = run(capsys, "--comfyui", str(comfyui))
    assert code == 0, err
    folder = comfyui / "models" / "facediffuser"
    assert model_files(folder) == ["facediffuser_sdm.safetensors", "facediffuser_tdm.safetensors"]
    assert_same_model(folder / "facediffuser_sdm.safetensors", reference(official_files["SDM"], tmp_path, ModelKind.SDM))
    assert_same_model(folder / "facediffuser_tdm.safetensors", reference(official_files["TDM"], tmp_path, ModelKind.TDM))
    assert not (comfyui / "models" / ".facediffuser-download").exists()  # the .bin files were removed, and the staging folder
    lines = out.splitlines()
    assert lines.index(f"{FACEDIFFUSER_LICENSE} (https://github.com/CodeGoat24/Face-diffuser#-license)") < lines.index(
        f"downloading SDM/pytorch_model.bin of CodeGoat24/Face-diffuser ({official_files['SDM'].stat().st_size / 1e9:.2f} GB)"
    )
    assert out.count(FACEDIFFUSER_LICENSE) == 2  # before each download
    assert lines[-1] == f"the models are in {folder}"


def test_the_command_generate_names_for_missing_models_fixes_it(hub, comfyui, capsys):
    with pytest.raises(UsageError, match="download it with: ") as missing:
        check_models([DEFAULT_SDM, DEFAULT_TDM], comfyui, explicit=True, comfyui_args=[])
    command = str(missing.value).split("download it with: ")[1].split()
    assert command[:3] == [sys.executable, str(ROOT / "cli.py"), "download"]  # the interpreter that runs, not `python` on PATH
    assert main(command[2:]) == 0, capsys.readouterr().err
    check_models([DEFAULT_SDM, DEFAULT_TDM], comfyui, explicit=True, comfyui_args=[])  # generate now finds both


def test_cli_py_runs_the_commands_from_any_folder_in_isolated_mode(tmp_path):
    """``python -I PACK/cli.py``: isolated mode, where neither the working directory nor the script's
    folder is on sys.path (as for the Windows portable build's python_embeded with its ._pth file)."""
    result = subprocess.run([sys.executable, "-I", str(ROOT / "cli.py"), "download", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--keep-original" in result.stdout


def test_a_second_run_fetches_nothing_and_says_so(hub, tmp_path, capsys):
    assert run(capsys, "--to", str(tmp_path / "models"))[0] == 0
    hub.requests.clear()
    code, out, _ = run(capsys, "--to", str(tmp_path / "models"))
    assert code == 0 and hub.requests == []
    for name in ("facediffuser_sdm.safetensors", "facediffuser_tdm.safetensors"):
        assert f"{tmp_path / 'models' / name} is already there: nothing to download" in out
    assert "downloading" not in out


def test_a_cut_download_resumes_with_a_ranged_request_and_ends_byte_identical(hub, official_files, tmp_path, capsys):
    folder = tmp_path / "models"
    size = len(hub.files[SDM_KEY])
    hub.cut[SDM_KEY] = size - 1000  # past huggingface_hub's first 10 MB chunk, which it writes before the cut
    code, _, err = run(capsys, "--to", str(folder))
    assert code == 2 and "error: the download of SDM/pytorch_model.bin of CodeGoat24/Face-diffuser stopped" in err
    assert "run the command again to resume it" in err
    assert model_files(folder) == []  # nothing under a final name
    (partial,) = (tmp_path / ".models-download").rglob("*.incomplete")
    have = partial.stat().st_size
    assert 0 < have < size
    hub.requests.clear()
    code, out, err = run(capsys, "--to", str(folder), "--keep-original")
    assert code == 0, err
    assert [request[2] for request in hub.byte_requests() if "/SDM/" in request[1]] == [f"bytes={have}-"]
    assert f"resuming at {have / 1e9:.2f} GB" in out
    assert (folder / "SDM" / "pytorch_model.bin").read_bytes() == official_files["SDM"].read_bytes()
    assert (folder / "TDM" / "pytorch_model.bin").read_bytes() == official_files["TDM"].read_bytes()
    assert_same_model(folder / "facediffuser_sdm.safetensors", reference(official_files["SDM"], tmp_path, ModelKind.SDM))


def test_ctrl_c_stops_with_130_and_the_next_run_resumes(hub, official_files, tmp_path, capsys):
    folder = tmp_path / "models"
    size = len(hub.files[SDM_KEY])
    hub.hold[SDM_KEY] = size - 1000  # huggingface_hub writes its first 10 MB chunk, then waits for the rest
    command = [sys.executable, "-m", "facediffuser_core", "download", "--to", str(folder)]
    process = subprocess.Popen(command, cwd=ROOT, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)
    deadline = time.monotonic() + 120
    while not any(path.stat().st_size for path in tmp_path.rglob("*.incomplete")) and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(subprocess.signal.SIGINT)
    out, err = process.communicate(timeout=60)
    hub.release.set()
    assert process.returncode == 130, err
    assert "interrupted: nothing half-written is left in the model folder; run the command again to resume the download" in out
    assert model_files(folder) == []
    (partial,) = tmp_path.rglob("*.incomplete")
    have = partial.stat().st_size
    hub.requests.clear()
    code, _, err = run(capsys, "--to", str(folder))
    assert code == 0, err
    assert [request[2] for request in hub.byte_requests() if "/SDM/" in request[1]] == [f"bytes={have}-"]
    assert_same_model(folder / "facediffuser_sdm.safetensors", reference(official_files["SDM"], tmp_path, ModelKind.SDM))


def test_an_unreachable_hub_is_an_error_naming_hf_endpoint(hub, tmp_path, capsys, monkeypatch):
    hub.close()
    code, _, err = run(capsys, "--to", str(tmp_path / "models"))
    assert code == 2 and "error: cannot reach SDM/pytorch_model.bin of CodeGoat24/Face-diffuser on the hub" in err
    assert "(HF_ENDPOINT for a mirror, HF_TOKEN for a token)" in err and not (tmp_path / "models").exists()


def test_the_hub_files_go_with_the_token_and_the_release_file_without(hub, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    assert run(capsys, "--to", str(tmp_path / "models"), "--facediffuser")[0] == 0
    assert run(capsys, "--to", str(tmp_path / "facenet"), "--facenet")[0] == 0
    for key in ("SDM/pytorch_model.bin", "TDM/pytorch_model.bin"):
        assert hub.authorization[f"/CodeGoat24/Face-diffuser/resolve/main/{key}"] == "Bearer hf_test_token"
    assert hub.authorization[f"/{FACENET_KEY}"] is None  # GitHub's file: the hub's token is not sent elsewhere


def test_a_corrupted_file_is_refused_removed_and_never_converted(hub, tmp_path, capsys):
    folder = tmp_path / "models"
    good = hub.files[TDM_KEY]
    hub.served[TDM_KEY] = good[:100] + bytes(255 - byte for byte in good[100:200]) + good[200:]  # same size, other bytes
    code, _, err = run(capsys, "--to", str(folder))
    assert code == 2
    assert "error: TDM/pytorch_model.bin of CodeGoat24/Face-diffuser has SHA-256 " in err
    assert "the hub reports" in err and "it was removed and nothing was converted" in err
    assert model_files(folder) == ["facediffuser_sdm.safetensors"]  # the SDM came first and was fine
    staged = tmp_path / ".models-download"
    assert not [path for path in staged.rglob("*.bin")]
    hub.served.clear()
    code, out, _ = run(capsys, "--to", str(folder))
    assert code == 0 and "facediffuser_sdm.safetensors is already there" in out
    assert model_files(folder) == ["facediffuser_sdm.safetensors", "facediffuser_tdm.safetensors"]


def test_too_little_disk_space_is_refused_before_any_byte(hub, official_files, tmp_path, capsys, monkeypatch):
    free = 10**6
    monkeypatch.setattr(download_module, "free_bytes", lambda path: free)
    code, _, err = run(capsys, "--to", str(tmp_path / "models"))
    sdm, tdm = (official_files[kind].stat().st_size for kind in ("SDM", "TDM"))
    assert code == 2
    assert f"not enough free space: 2 model(s) to download and convert need {max(sdm + sdm // 2, sdm // 2 + tdm + tdm // 2) / 1e9:.2f} GB" in err
    assert f"({(sdm + tdm) / 1e9:.2f} GB still to download" in err and f"has {free / 1e9:.2f} GB free" in err
    assert "pass --to DIR on a disk with room" in err
    assert hub.byte_requests("GET") == [] and len(hub.byte_requests("HEAD")) == 2
    assert not (tmp_path / "models").exists() and not (tmp_path / ".models-download").exists()


def test_space_needed_counts_partial_downloads_and_kept_originals():
    fetch = download_module._Fetch
    fetches = [fetch("sdm", download_module.MODELS["sdm"], 1000, "e", 400), fetch("tdm", download_module.MODELS["tdm"], 800, "e", 0)]
    assert download_module.space_needed(fetches, "fp16", keep=False) == max(600 + 500, 500 + 800 + 400)
    assert download_module.space_needed(fetches, "fp16", keep=True) == 600 + 500 + 800 + 400
    assert download_module.space_needed(fetches, "fp32", keep=False) == max(600 + 1000, 1000 + 800 + 800)


def test_fastcomposer_is_its_own_flag_with_its_license(hub, tmp_path, capsys):
    code, out, err = run(capsys, "--to", str(tmp_path / "models"), "--fastcomposer")
    assert code == 0, err
    assert model_files(tmp_path / "models") == ["fastcomposer.safetensors"]
    with safe_open(str(tmp_path / "models" / "fastcomposer.safetensors"), "pt") as written:
        assert written.metadata()["facediffuser_kind"] == "FastComposer"
    assert "license of mit-han-lab/fastcomposer: MIT license" in out and "CodeGoat24" not in out
    code, out, _ = run(capsys, "--to", str(tmp_path / "models"), "--facediffuser", "--fastcomposer")
    assert code == 0 and "fastcomposer.safetensors is already there" in out
    assert model_files(tmp_path / "models") == ["facediffuser_sdm.safetensors", "facediffuser_tdm.safetensors", "fastcomposer.safetensors"]


def test_a_file_under_the_final_name_that_is_not_safetensors_is_an_error(hub, tmp_path, capsys):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "facediffuser_sdm.safetensors").write_bytes(b"not a model")
    code, _, err = run(capsys, "--to", str(tmp_path / "models"))
    assert code == 2 and "facediffuser_sdm.safetensors exists but is not a readable safetensors file" in err
    assert "remove it and run the command again" in err and hub.requests == []


def test_the_folder_from_extra_model_paths_yaml_is_where_it_downloads(hub, comfyui, tmp_path, capsys):
    (comfyui / "extra_model_paths.yaml").write_text("mine:\n  base_path: /data/models\n  facediffuser: |\n    fd\n    fd2\n")
    assert comfyui_model_folders(comfyui) == [Path("/data/models/fd"), Path("/data/models/fd2"), comfyui / "models" / "facediffuser"]
    (comfyui / "extra_model_paths.yaml").write_text(f"mine:\n  base_path: {tmp_path / 'shared'}\n  facediffuser: facediffuser\n")
    code, out, err = run(capsys, "--comfyui", str(comfyui))
    assert code == 0, err
    assert model_files(tmp_path / "shared" / "facediffuser") == ["facediffuser_sdm.safetensors", "facediffuser_tdm.safetensors"]
    assert not (comfyui / "models").exists()


def test_in_the_desktop_apps_user_folder_it_downloads_into_that_folders_models(hub, tmp_path, capsys, monkeypatch):
    """The desktop app's user folder holds custom_nodes and models but no ComfyUI code: download fills
    its models (and a folder its extra_model_paths.yaml names); generate says how to run there."""
    user = tmp_path / "Documents" / "ComfyUI"
    pack = user / "custom_nodes" / "ComfyUI-FaceDiffuser"
    pack.mkdir(parents=True)
    (user / "models").mkdir()
    (user / "extra_model_paths.yaml").write_text(f"desk:\n  base_path: {tmp_path / 'shared'}\n  facenet: facenet\n")
    monkeypatch.setattr(download_module, "PACK", pack)
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.delenv("PWD", raising=False)
    monkeypatch.setattr(download_module, "desktop_app_config", lambda: tmp_path / "no-app-settings" / "extra_models_config.yaml")
    code, out, err = run(capsys, "--facediffuser", "--facenet")
    assert code == 0, err
    assert f"this pack is in the ComfyUI user folder {user}: downloading into its model folders\n" in out
    assert model_files(user / "models" / "facediffuser") == ["facediffuser_sdm.safetensors", "facediffuser_tdm.safetensors"]
    assert model_files(tmp_path / "shared" / "facenet") == ["20180402-114759-vggface2.pt"]
    with pytest.raises(FaceDiffuserError, match=rf"this pack is in {re.escape(str(user))}, a ComfyUI user folder without ComfyUI's code .*--server 127.0.0.1:8000"):
        find_comfyui(environ={}, pack=pack)


def test_in_the_desktop_app_its_own_model_folders_come_first(hub, tmp_path, capsys, monkeypatch):
    """The app starts its ComfyUI with --extra-model-paths-config <its settings>/extra_models_config.yaml:
    a default section there is searched first, so download fills that folder."""
    user = tmp_path / "Documents" / "ComfyUI"
    pack = user / "custom_nodes" / "ComfyUI-FaceDiffuser"
    pack.mkdir(parents=True)
    (user / "models").mkdir()
    config = tmp_path / "AppData" / "Roaming" / "ComfyUI" / "extra_models_config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(f"comfyui_desktop:\n  is_default: true\n  base_path: {tmp_path / 'D'}\n  facediffuser: models/fd\n")
    monkeypatch.setattr(download_module, "PACK", pack)
    monkeypatch.setattr(download_module, "desktop_app_config", lambda: config)
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.delenv("PWD", raising=False)
    code, out, err = run(capsys, "--facediffuser")
    assert code == 0, err
    assert f"this pack is in the ComfyUI user folder {user}: downloading into its model folders (and those of {config})" in out
    assert model_files(tmp_path / "D" / "models" / "fd") == ["facediffuser_sdm.safetensors", "facediffuser_tdm.safetensors"]
    assert not (user / "models" / "facediffuser").exists()


def test_the_desktop_apps_settings_folder_on_each_platform(tmp_path):
    home = tmp_path / "home"
    assert desktop_app_config("win32", {"APPDATA": str(tmp_path / "Roaming")}, home) == tmp_path / "Roaming" / "ComfyUI" / "extra_models_config.yaml"
    assert desktop_app_config("win32", {}, home) == home / "AppData" / "Roaming" / "ComfyUI" / "extra_models_config.yaml"
    assert desktop_app_config("darwin", {"XDG_CONFIG_HOME": "/x"}, home) == home / "Library" / "Application Support" / "ComfyUI" / "extra_models_config.yaml"
    assert desktop_app_config("linux", {"XDG_CONFIG_HOME": str(tmp_path / "cfg")}, home) == tmp_path / "cfg" / "ComfyUI" / "extra_models_config.yaml"
    assert desktop_app_config("linux", {}, home) == home / ".config" / "ComfyUI" / "extra_models_config.yaml"


def test_model_folders_follow_comfyuis_rules(comfyui, tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text("a:\n  facediffuser: rel\nb:\n  is_default: true\n  checkpoints: x\n  facediffuser: /first\n")
    (comfyui / "extra_model_paths.yaml").write_text("c:\n  base_path: base\n  facediffuser: fd\n")
    folders = comfyui_model_folders(comfyui, ["--cpu", "--base-directory", str(tmp_path / "desk"), "--extra-model-paths-config", str(other)])
    assert folders == [Path("/first"), comfyui / "base" / "fd", tmp_path / "rel", tmp_path / "desk" / "models" / "facediffuser"]
    assert comfyui_model_folders(comfyui, [], "checkpoints") == [comfyui / "models" / "checkpoints"]


def test_scores_puts_facenet_and_the_clip_folder_where_the_score_nodes_look(hub, comfyui, facenet_file, tiny_clip_folder, capsys):
    from facediffuser_core.faces.consistency import load_clip
    from facediffuser_core.faces.identity import load_facenet

    code, out, err = run(capsys, "--comfyui", str(comfyui), "--scores")
    assert code == 0, err
    models = comfyui / "models"
    assert model_files(models / "facenet") == ["20180402-114759-vggface2.pt"]
    assert (models / "facenet" / "20180402-114759-vggface2.pt").read_bytes() == facenet_file.read_bytes()
    clip = models / "clip_eval" / "clip-vit-large-patch14"
    assert model_files(models / "clip_eval") == sorted(f"clip-vit-large-patch14/{name}" for name in CLIP_FILES)
    assert all((clip / name).read_bytes() == (tiny_clip_folder / name).read_bytes() for name in CLIP_FILES)
    assert not (models / "facediffuser").exists() and not list(models.glob(".*-download"))  # staging folders removed
    assert load_facenet(models / "facenet" / "20180402-114759-vggface2.pt").training is False
    assert load_clip(clip / "model.safetensors").tokenizer("a man")["input_ids"][0] == 49406  # the folder loads, tokenizer included
    assert "license of timesler/facenet-pytorch: MIT license" in out and "license of openai/clip-vit-large-patch14: MIT license" in out
    assert [request[1] for request in hub.byte_requests()][0] == f"/{FACENET_KEY}"  # the web file, by its URL
    hub.requests.clear()
    code, out, _ = run(capsys, "--comfyui", str(comfyui), "--all")
    assert code == 0 and f"{clip / 'model.safetensors'} is already there" in out and "20180402-114759-vggface2.pt is already there" in out
    assert not any(CLIP_REPO in request[1] or FACENET_KEY in request[1] for request in hub.requests)


def test_a_cut_facenet_download_resumes_with_a_ranged_request(hub, facenet_file, tmp_path, capsys):
    folder = tmp_path / "facenet"
    size = len(hub.files[FACENET_KEY])
    hub.cut[FACENET_KEY] = size // 2
    code, _, err = run(capsys, "--to", str(folder), "--facenet")
    assert code == 2 and f"the download of 20180402-114759-vggface2.pt of timesler/facenet-pytorch stopped" in err
    assert model_files(folder) == []
    (partial,) = (tmp_path / ".facenet-download").glob("*.incomplete")
    have = partial.stat().st_size
    assert 0 < have <= size // 2  # whole pieces of what came before the cut
    hub.requests.clear()
    code, out, err = run(capsys, "--to", str(folder), "--facenet")
    assert code == 0, err
    assert f"resuming at {have / 1e9:.2f} GB" in out
    assert [request[2] for request in hub.byte_requests()] == [f"bytes={have}-"]
    assert (folder / "20180402-114759-vggface2.pt").read_bytes() == facenet_file.read_bytes()


def test_a_facenet_download_stopped_before_its_rename_is_finished_without_a_request(hub, facenet_file, tmp_path, capsys):
    """Every byte already in the staging folder's .incomplete file (a run stopped between the last
    byte and the rename): the next run renames, checks and stores it, and fetches no byte."""
    folder = tmp_path / "facenet"
    staging = tmp_path / ".facenet-download"
    staging.mkdir()
    (staging / "20180402-114759-vggface2.pt.incomplete").write_bytes(facenet_file.read_bytes())
    code, out, err = run(capsys, "--to", str(folder), "--facenet")
    assert code == 0, err
    assert hub.byte_requests() == []  # only the HEAD that reads the size
    assert model_files(folder) == ["20180402-114759-vggface2.pt"] and not staging.exists()
    assert (folder / "20180402-114759-vggface2.pt").read_bytes() == facenet_file.read_bytes()


def test_a_facenet_file_that_does_not_load_is_refused_and_removed(hub, tmp_path, capsys):
    good = hub.files[FACENET_KEY]
    hub.served[FACENET_KEY] = bytes(len(good))  # the advertised size, no SHA-256 to check: the load check catches it
    code, _, err = run(capsys, "--to", str(tmp_path / "facenet"), "--facenet")
    assert code == 2 and "20180402-114759-vggface2.pt of timesler/facenet-pytorch was downloaded but does not load" in err
    assert "it was removed: run the command again" in err
    assert model_files(tmp_path / "facenet") == [] and model_files(tmp_path / ".facenet-download") == []


def test_to_names_one_folder_so_models_of_several_folders_are_refused(hub, tmp_path, capsys):
    code, _, err = run(capsys, "--to", str(tmp_path / "models"), "--scores")
    assert code == 2 and "--to names one folder, but these models go in 2 (clip_eval, facenet)" in err
    assert hub.requests == [] and not (tmp_path / "models").exists()


def test_space_needed_of_a_model_stored_as_published_is_its_download():
    fetch = download_module._Fetch
    clip, sdm = download_module.MODELS["clip"], download_module.MODELS["sdm"]
    assert download_module.space_needed([fetch("clip", clip, 1000, "e", 300)], "fp16", keep=False) == 700
    assert download_module.space_needed([fetch("clip", clip, 1000, "e", 0), fetch("sdm", sdm, 800, "e", 0)], "fp16", keep=False) == 1000 + 800 + 400


def test_controlnet_openpose_goes_into_comfyuis_controlnet_folder_as_published(hub, comfyui, tmp_path, capsys):
    """The fp16 OpenPose ControlNet, stored as published (no conversion) in models/controlnet where the
    Load ControlNet Model node lists it, with its license printed; a second run fetches nothing."""
    data = safetensors_bytes({"control_model.zero_convs.0.0.weight": torch.ones(4, 4, 1, 1, dtype=torch.float16)})
    hub.files[CONTROLNET_KEY] = data
    code, out, err = run(capsys, "--comfyui", str(comfyui), "--controlnet", "openpose")
    assert code == 0, err
    assert "license of comfyanonymous/ControlNet-v1-1_fp16_safetensors: OpenRAIL license" in out and "CodeGoat24" not in out
    models = comfyui / "models"
    assert model_files(models) == ["controlnet/control_v11p_sd15_openpose_fp16.safetensors"]  # nothing of Face-diffuser's, no staging left
    assert (models / "controlnet" / "control_v11p_sd15_openpose_fp16.safetensors").read_bytes() == data
    hub.requests.clear()
    code, out, _ = run(capsys, "--comfyui", str(comfyui), "--controlnet", "openpose")
    assert code == 0 and "control_v11p_sd15_openpose_fp16.safetensors is already there" in out and hub.requests == []


def test_a_controlnet_that_is_not_safetensors_is_refused_and_removed(hub, tmp_path, capsys):
    hub.files[CONTROLNET_KEY] = b"\0" * 64
    code, _, err = run(capsys, "--to", str(tmp_path / "controlnet"), "--controlnet", "openpose")
    assert code == 2 and "control_v11p_sd15_openpose_fp16.safetensors of comfyanonymous/ControlNet-v1-1_fp16_safetensors was downloaded but does not load" in err
    assert model_files(tmp_path / "controlnet") == []
