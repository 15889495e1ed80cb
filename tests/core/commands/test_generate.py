"""The ``generate`` command without a real ComfyUI: argument and prompt checks (all before any server
starts), reference photos (real MTCNN), the stage progress bar, outputs and exit codes against the
fake server of tests/fake_comfy.py, and the auto-start of a fake ComfyUI folder whose main.py serves
that fake (found from the pack's place through a symlink, stopped with everything it started, on
Ctrl-C too), with --cpu added where torch finds no GPU and the user chose no device."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from PIL import Image

from facediffuser_core.__main__ import exit_code, main
from facediffuser_core.commands.comfy_client import DEFAULT_CONTROLNET, DEFAULT_SDM, DEFAULT_TDM, JobError, ServerUnavailable, build_graph, Generation
from facediffuser_core.commands import comfy_launch
from facediffuser_core.commands.comfy_launch import LocalComfyUI, accelerator_available, device_args, find_comfyui
from facediffuser_core.errors import FaceDiffuserError, FaceNotFoundError, PromptError
from facediffuser_core.faces.detection import load_detector, reference_png
from facediffuser_core.commands.generate import StageProgress, UsageError, check_controlnet, check_photos, check_prompt, parse_faces
from facediffuser_core.method.pose import pose_boxes
from facediffuser_core.method.regions import parse_boxes
from facediffuser_core.weights.model_folders import quote_command
from fake_comfy import FakeComfy
from paths import CLI, FACES, ROOT, TESTS
from processes import gone, sigint_default

MAN1, MAN2 = FACES / "man1.jpeg", FACES / "man2.jpeg"
PACK = "ComfyUI-FaceDiffuser"
NO_DEVICE = "no CUDA, MPS or XPU device found: starting ComfyUI with --cpu (give a device option in --comfyui-args to choose yourself)\n"


def png(colour: tuple[int, int, int], size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGE, MASK = png((200, 30, 30)), png((255, 255, 255))


@pytest.fixture
def gray_photo(tmp_path) -> Path:
    path = tmp_path / "wall.png"
    Image.new("RGB", (200, 160), (128, 128, 128)).save(path)
    return path


# --- arguments and prompt ---------------------------------------------------------------------


def test_faces_are_one_or_more_photos_per_marker(tmp_path):
    assert parse_faces(["a.jpg", " b.jpg , c.jpg "]) == [(Path("a.jpg"),), (Path("b.jpg"), Path("c.jpg"))]
    assert len(parse_faces(["a.jpg,b.jpg,c.jpg,d.jpg"])[0]) == 4  # a Subject node's four photo inputs
    with pytest.raises(UsageError, match=r"--face #2 has 5 photos; give at most 4 photos of one person \(a Face-diffuser Subject node's 4 photo inputs\)"):
        parse_faces(["a.jpg", "a,b,c,d,e"])
    with pytest.raises(UsageError, match=r"--face #1 is empty"):
        parse_faces([" , "])
    with pytest.raises(UsageError, match=rf"--face #2: no such file {tmp_path / 'none.jpg'}"):
        check_photos(parse_faces([str(MAN1), f"{MAN2},{tmp_path / 'none.jpg'}"]))
    check_photos(parse_faces([f"{MAN2},{MAN1}", str(MAN1)]))


def test_prompt_markers_are_checked_against_the_photos():
    check_prompt("a man <|image|> and a woman <|image|> at a cafe", 2)
    with pytest.raises(UsageError, match=r"the prompt has no <\|image\|> marker; put one right after each person's class word"):
        check_prompt("a man at a cafe", 1)
    with pytest.raises(UsageError, match=r"the prompt has 2 <\|image\|> marker\(s\) but --face was given 1 time\(s\); give one --face per marker"):
        check_prompt("a man <|image|> and a woman <|image|>", 1)
    with pytest.raises(PromptError, match=r"<\|image\|> #1 follows ',' instead of a word"):
        check_prompt("a man, <|image|> at a cafe", 1)
    with pytest.raises(PromptError, match="at most 4 subjects"):
        check_prompt(" ".join(["a man <|image|>"] * 5), 5)


def add_models(base: Path) -> Path:
    """Empty files under the default model names in ``base/models/facediffuser`` (the fake server
    loads nothing; generate checks that they are there); returns the folder."""
    folder = base / "models" / "facediffuser"
    folder.mkdir(parents=True)
    for name in (DEFAULT_SDM, DEFAULT_TDM):
        (folder / name).touch()
    return folder


@pytest.fixture
def fake_comfyui(tmp_path) -> Path:
    """A ComfyUI folder with (empty) model files, whose main.py records how it was started, starts a
    child process in its process group, and serves the fake server (``mode.txt``: ``crash`` exits at
    once, ``no-pack`` serves without the Face-diffuser nodes)."""
    root = tmp_path / "ComfyUI"
    (root / "comfy").mkdir(parents=True)
    add_models(root)
    (root / "custom_nodes").mkdir()
    (root / "main.py").write_text(textwrap.dedent(f"""
        import argparse, json, os, pathlib, subprocess, sys, time
        sys.path.insert(0, {str(TESTS)!r})
        here = pathlib.Path(__file__).parent
        mode = (here / "mode.txt").read_text() if (here / "mode.txt").exists() else "serve"
        if mode == "crash":
            print("boom: something is missing", flush=True)
            sys.exit(3)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        (here / "started.json").write_text(json.dumps({{"argv": sys.argv[1:], "pid": os.getpid(), "child": child.pid}}))
        parser = argparse.ArgumentParser()
        parser.add_argument("--port", type=int)
        args, _ = parser.parse_known_args()
        from fake_comfy import FakeComfy
        FakeComfy({IMAGE!r}, mask={MASK!r}, port=args.port, has_pack=mode != "no-pack")
        while True:
            time.sleep(1)
    """))
    return root


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["generate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_usage_errors_stop_before_any_server_starts(fake_comfyui, gray_photo, tmp_path, capsys):
    common = ["-o", str(tmp_path / "out"), "--comfyui", str(fake_comfyui), "--size", "64"]
    cases = [
        (["--face", str(MAN1), "--prompt", "a man <|image|> and a man <|image|>"], "the prompt has 2 <|image|> marker(s) but --face was given 1 time(s)"),
        (["--face", f"{MAN1},{MAN2}", "--face", str(MAN1), "--prompt", "a man <|image|>"], "the prompt has 1 <|image|> marker(s) but --face was given 2 time(s)"),
        (["--face", f"{MAN1},{gray_photo}", "--prompt", "a man <|image|>"], f"--face #1: no face was found in {gray_photo}"),
        (["--face", str(MAN1), "--prompt", "a man <|image|>", "--size", "60"], "must be a multiple of 8 and at least 64 pixels, got 60x60"),
        (["--face", str(MAN1), "--prompt", "a man <|image|>", "--start-merge", "0.7"], "--start-merge / --final: stage fractions must satisfy"),
        (["--face", str(MAN1), "--prompt", "a man <|image|>", "--detail", "--detail-denoise", "1.5"], "--detail-denoise must be between 0 and 1, got 1.5"),
        (["--face", str(gray_photo), "--prompt", "a man <|image|>"], f"--face #1: no face was found in {gray_photo}"),
    ]
    for args, message in cases:
        code, _, err = run_main(capsys, *common, *args)
        assert code == 2 and message in err, err
        assert "starting ComfyUI" not in err
    assert not (fake_comfyui / "started.json").exists()
    assert "use another photo, or --no-crop to use it whole" in err


def test_a_missing_model_is_named_with_the_folders_and_the_download_command(fake_comfyui, tmp_path, capsys):
    """Checked before any server starts, in the folders that ComfyUI will search."""
    (fake_comfyui / "models" / "facediffuser" / DEFAULT_TDM).unlink()
    common = ["--face", str(MAN1), "--prompt", "a man <|image|>", "-o", str(tmp_path / "out"), "--comfyui", str(fake_comfyui)]
    code, _, err = run_main(capsys, *common)
    default = fake_comfyui / "models" / "facediffuser"
    assert code == 2
    assert f"error: no model file {DEFAULT_TDM} in the folders ComfyUI searches for Face-diffuser models ({default}); download it with: {CLI} download --comfyui {fake_comfyui}\n" in err
    desk = tmp_path / "desk"
    add_models(desk)
    (desk / "models" / "facediffuser" / DEFAULT_SDM).unlink()
    (fake_comfyui / "extra_model_paths.yaml").write_text(f"other:\n  base_path: {tmp_path / 'elsewhere'}\n  facediffuser: fd\n")
    code, _, err = run_main(capsys, *common, f"--comfyui-args=--base-directory {desk}", "--sdm", "fastcomposer.safetensors")
    searched = f"{tmp_path / 'elsewhere' / 'fd'}, {desk / 'models' / 'facediffuser'}"
    assert code == 2 and f"no model file fastcomposer.safetensors in the folders ComfyUI searches for Face-diffuser models ({searched}); download it with: {CLI} download --fastcomposer --comfyui {fake_comfyui}\n" in err
    code, _, err = run_main(capsys, *common, f"--comfyui-args=--base-directory {desk}")
    assert code == 2 and f"no model file {DEFAULT_SDM} in the folders ComfyUI searches for Face-diffuser models ({searched}); download it with: {CLI} download --comfyui {fake_comfyui}\n" in err
    (fake_comfyui / "extra_model_paths.yaml").unlink()
    code, _, err = run_main(capsys, *common, f"--comfyui-args=--base-directory {desk}", "--tdm", "mine.safetensors")
    assert code == 2 and f"no model file {DEFAULT_SDM} in the folders ComfyUI searches for Face-diffuser models ({desk / 'models' / 'facediffuser'}); download it with: {CLI} download --to {desk / 'models' / 'facediffuser'}\n" in err
    (desk / "models" / "facediffuser" / DEFAULT_SDM).touch()
    code, _, err = run_main(capsys, *common, f"--comfyui-args=--base-directory {desk}", "--tdm", "mine.safetensors")
    assert code == 2 and f"no model file mine.safetensors in the folders ComfyUI searches for Face-diffuser models ({desk / 'models' / 'facediffuser'}); put it in one of them\n" in err
    assert not (fake_comfyui / "started.json").exists()


def test_no_comfyui_to_start_says_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    with pytest.raises(FaceDiffuserError, match=r"is not inside a ComfyUI/custom_nodes folder; pass --comfyui /path/to/ComfyUI or set COMFYUI_PATH, or use a running one with --server HOST:PORT"):
        find_comfyui(None, {"PWD": str(tmp_path)}, tmp_path / "pack")
    with pytest.raises(FaceDiffuserError, match=rf"--comfyui {tmp_path} is not a ComfyUI folder \(no main.py and comfy/ in it\)"):
        find_comfyui(tmp_path, {}, tmp_path / "pack")
    with pytest.raises(FaceDiffuserError, match=rf"COMFYUI_PATH {tmp_path} is not a ComfyUI folder"):
        find_comfyui(None, {"COMFYUI_PATH": str(tmp_path)}, tmp_path / "pack")


def test_comfyui_is_found_from_the_pack_folder_also_through_a_symlink(fake_comfyui, tmp_path):
    source = tmp_path / "src" / PACK
    source.mkdir(parents=True)
    other = tmp_path / "other"
    (other / "comfy").mkdir(parents=True)
    (other / "main.py").write_text("")
    assert find_comfyui(other, {"COMFYUI_PATH": str(fake_comfyui)}, source) == other  # --comfyui first
    assert find_comfyui(None, {"COMFYUI_PATH": str(other)}, source) == other  # then COMFYUI_PATH
    installed = fake_comfyui / "custom_nodes" / PACK
    installed.mkdir()
    assert find_comfyui(None, {}, installed) == fake_comfyui  # a copy inside custom_nodes
    installed.rmdir()
    installed.symlink_to(source, target_is_directory=True)
    assert find_comfyui(None, {}, installed) == fake_comfyui  # imported through the symlink
    with pytest.raises(FaceDiffuserError):
        find_comfyui(None, {}, source)  # imported from where the link points, with nothing else to go on
    assert find_comfyui(None, {"PWD": str(installed)}, source) == fake_comfyui  # the shell's working directory
    assert find_comfyui(None, {"PWD": str(installed / "sub")}, source) == fake_comfyui


# --- reference photos and progress ------------------------------------------------------------


def test_reference_photos_are_upright_square_face_crops(tmp_path, gray_photo):
    detector = load_detector("cpu")
    upright = np.asarray(Image.open(io.BytesIO(reference_png(MAN1, detector))))
    assert upright.shape == (512, 512, 3)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned; viewers rotate it 90 degrees clockwise
    Image.open(MAN1).transpose(Image.Transpose.ROTATE_90).save(rotated, exif=exif, quality=100)
    turned = np.asarray(Image.open(io.BytesIO(reference_png(rotated, detector)))).astype(float)
    assert np.abs(turned - upright).mean() < 6  # the same crop, up to JPEG loss
    with pytest.raises(FaceNotFoundError, match=f"no face was found in {gray_photo}"):
        reference_png(gray_photo, detector)
    wide = tmp_path / "wide.png"
    Image.new("RGB", (400, 100), (250, 10, 10)).save(wide)
    padded = np.asarray(Image.open(io.BytesIO(reference_png(wide, None, margin=None))))
    assert padded.shape == (512, 512, 3)
    assert padded[:180].max() == 0 and padded[-180:].max() == 0  # zero bands above and below (192 px each)
    assert (np.abs(padded[200:312].astype(int) - [250, 10, 10]) <= 1).all()


def test_progress_names_the_stage_of_each_step():
    graph = build_graph(Generation("a man <|image|>", (("f.png",),), steps=10))
    progress = StageProgress(graph, 10, 0.3, 0.6)
    seen = []
    progress("executing", {"node": "1"})
    seen.append(progress.bar.desc.rstrip(": "))
    for value in range(1, 11):
        progress("progress", {"value": value, "max": 10, "node": graph.sampler})
        seen.append(progress.bar.desc.rstrip(": "))
    progress("progress", {"value": 1, "max": 1, "node": "1"})  # another node's progress: not a sampling step
    progress("executing", {"node": graph.images})  # after sampling the bar keeps its last stage
    assert progress.bar.n == 10 and progress.bar.desc.rstrip(": ") == "subject stage"
    progress.close()
    # 0.3 and 0.6 of 10 steps: scene while index <= 3, fusion while index <= 6 (steps 1-4, 5-7, 8-10)
    assert seen == ["Face-diffuser Loader"] + ["scene stage"] * 4 + ["fusion stage"] * 3 + ["subject stage"] * 3


def test_progress_follows_the_face_detailer_after_sampling():
    graph = build_graph(Generation("a man <|image|>", (("f.png",),), steps=4, detail=0.45))
    progress = StageProgress(graph, 4, 0.3, 0.6)
    for value in range(1, 5):
        progress("progress", {"value": value, "max": 4, "node": graph.sampler})
    assert (progress.bar.n, progress.bar.total) == (4, 4)
    for value in range(1, 9):  # two faces of 4 steps each
        progress("progress", {"value": value, "max": 8, "node": graph.detailer})
        assert (progress.bar.n, progress.bar.total) == (value, 8) and progress.bar.desc.rstrip(": ") == "face detail"
    progress.close()


# --- against a running (fake) server ----------------------------------------------------------


@pytest.fixture
def fake():
    server = FakeComfy(IMAGE, mask=MASK)
    yield server
    server.shutdown()


def test_generate_on_a_running_server(fake, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--face", str(MAN2), "--face", str(MAN1), "--prompt", "a man <|image|> and a man <|image|> playing chess",
            "-o", str(out), "--server", fake.address, "--steps", "10", "--size", "64", "--batch", "2", "--seed", "7", "--negative", "blurry"]  # fmt: skip
    code, stdout, err = run_main(capsys, *args)
    assert code == 0, err
    assert stdout.split() == [str(out / "facediffuser_00001.png"), str(out / "facediffuser_00002.png")]
    assert sorted(p.name for p in out.iterdir()) == ["facediffuser_00001.png", "facediffuser_00001_mask.png", "facediffuser_00002.png", "facediffuser_00002_mask.png"]
    assert (out / "facediffuser_00002.png").read_bytes() == IMAGE and (out / "facediffuser_00002_mask.png").read_bytes() == MASK
    assert err.startswith("seed 7\n") and "10/10" in err  # the bar reached the last step (its stages: test above)
    (graph,) = fake.queued
    loads = [n["inputs"]["image"] for n in graph.values() if n["class_type"] == "LoadImage"]
    assert [re.sub(r"_[0-9a-f]{10}\.png$", "", name) for name in loads] == ["facediffuser/man2", "facediffuser/man1"]  # marker order
    assert [name for _, name in fake.uploads] == [name.split("/")[1] for name in loads]
    sampler = next(n["inputs"] for n in graph.values() if n["class_type"] == "FaceDiffuserSampler")
    assert (sampler["seed"], sampler["steps"], sampler["cfg"], sampler["start_merge"], sampler["final"]) == (7, 10, 5.0, 0.3, 0.6)
    assert next(n["inputs"]["text"] for n in graph.values() if n["class_type"] == "CLIPTextEncode") == "blurry"

    code, stdout, err = run_main(capsys, *args[:-6], "--size", "64")  # again, a random seed: numbered on
    assert code == 0 and stdout.split() == [str(out / "facediffuser_00003.png")]
    seed = int(re.search(r"seed (\d+)", err).group(1))
    assert next(n["inputs"]["seed"] for n in fake.queued[1].values() if n["class_type"] == "FaceDiffuserSampler") == seed


def test_a_running_server_without_the_model_file_is_an_error_before_any_upload(fake, tmp_path, capsys):
    fake.models = ["facediffuser_sdm.safetensors", "other_tdm.safetensors"]
    args = ["--face", str(MAN1), "--prompt", "a man <|image|> in a park", "-o", str(tmp_path / "out"), "--server", fake.address, "--size", "64"]
    code, _, err = run_main(capsys, *args)
    assert code == 2
    assert f"error: http://{fake.address} has no facediffuser_tdm.safetensors in its models/facediffuser (2 file(s) there)" in err
    assert "`python -m facediffuser_core download` in the pack's folder downloads the official models" in err
    assert fake.uploads == [] and fake.queued == [] and not (tmp_path / "out").exists()
    code, _, err = run_main(capsys, *args, "--tdm", "other_tdm.safetensors")
    assert code == 0, err
    (graph,) = fake.queued
    assert next(n["inputs"]["tdm_name"] for n in graph.values() if n["class_type"] == "FaceDiffuserLoader") == "other_tdm.safetensors"


def test_detail_adds_the_face_detailer_between_decoding_and_saving(fake, tmp_path, capsys):
    args = ["--face", str(MAN2), "--face", str(MAN1), "--prompt", "a man <|image|> and a man <|image|> playing chess", "-o", str(tmp_path / "out"),
            "--server", fake.address, "--steps", "6", "--cfg", "4", "--size", "64", "--seed", "7", "--sampler", "euler", "--scheduler", "karras"]  # fmt: skip
    code, _, err = run_main(capsys, *args, "--detail", "--detail-denoise", "0.3")
    assert code == 0, err
    (graph,) = fake.queued
    (detailer_id,) = [key for key, n in graph.items() if n["class_type"] == "FaceDiffuserFaceDetailer"]
    detailer = graph[detailer_id]["inputs"]
    encode = next(n["inputs"] for n in graph.values() if n["class_type"] == "FaceDiffuserSubjectEncode")
    save = next(n["inputs"] for n in graph.values() if n["class_type"] == "SaveImage")
    assert save["images"] == [detailer_id, 0] and graph[detailer["image"][0]]["class_type"] == "VAEDecode"
    assert detailer["subjects"] == encode["subjects"] and detailer["prompt"] == encode["prompt"]  # the same people (Subject chain), in marker order
    assert "images" not in detailer and "images" not in encode
    for name in ("clip", "subject_encoder"):
        assert detailer[name] == encode[name]
    loader = encode["clip"][0]
    assert detailer["sdm"] == [loader, 1] and detailer["vae"] == [loader, 3]
    settings = ("seed", "steps", "cfg", "sampler_name", "scheduler", "denoise", "if_no_face")
    assert tuple(detailer[name] for name in settings) == (7, 6, 4.0, "euler", "karras", 0.3, "pass through")
    code, _, err = run_main(capsys, *args)  # without --detail: no detailer
    assert code == 0, err
    assert not [n for n in fake.queued[1].values() if n["class_type"] == "FaceDiffuserFaceDetailer"]


def test_several_photos_of_a_person_are_each_cropped_uploaded_and_combined(fake, tmp_path, capsys, monkeypatch):
    import facediffuser_core.commands.generate as command

    cropped = []
    crop = command.reference_png
    monkeypatch.setattr(command, "reference_png", lambda photo, *args: cropped.append(photo) or crop(photo, *args))
    out = tmp_path / "out"
    args = ["--face", f"{MAN1},{MAN2}", "--face", str(MAN2), "--prompt", "a man <|image|> and a man <|image|> playing chess",
            "-o", str(out), "--server", fake.address, "--steps", "2", "--size", "64", "--seed", "3", "--combine", "norm average"]  # fmt: skip
    code, _, err = run_main(capsys, *args)
    assert code == 0, err
    (graph,) = fake.queued
    encode = next(n["inputs"] for n in graph.values() if n["class_type"] == "FaceDiffuserSubjectEncode")
    chain, link = [], encode["subjects"]
    while link is not None:  # the Subject nodes, from the last marker's back to the first
        subject = graph[link[0]]["inputs"]
        assert subject["combine"] == "norm average"
        links = [subject[name] for name in ("images", "images_2", "images_3", "images_4") if name in subject]  # one photo per input
        assert all(graph[load[0]]["class_type"] == "LoadImage" for load in links)
        chain.insert(0, [re.sub(r"_[0-9a-f]{10}\.png$", "", graph[load[0]]["inputs"]["image"]) for load in links])
        link = subject.get("previous_subjects")
    assert chain == [["facediffuser/man1", "facediffuser/man2"], ["facediffuser/man2"]]
    names = [name for _, name in fake.uploads]  # every photo's crop uploaded; man2's both times under one name
    assert len(names) == 3 and len(set(names)) == 2
    assert cropped == [MAN1, MAN2]  # man2, given twice, is detected and cropped once


def test_errors_and_exit_codes(fake, tmp_path, capsys):
    fake.fail["broken"] = 1
    common = ["--face", str(MAN1), "-o", str(tmp_path / "out"), "--size", "64", "--steps", "2"]
    code, _, err = run_main(capsys, *common, "--prompt", "a man <|image|>, invalid", "--server", fake.address)
    assert code == 1 and "rejected the workflow (HTTP 400): Prompt outputs failed validation; FaceDiffuserSampler (node 7, 'Face-diffuser Sampler'): Value not in list" in err
    code, _, err = run_main(capsys, *common, "--prompt", "a man <|image|>, broken", "--server", fake.address)
    assert code == 1 and "failed the job: FaceDiffuserSampler (node 7, 'Face-diffuser Sampler'): fake failure (broken)" in err
    code, _, err = run_main(capsys, *common, "--prompt", "a man <|image|>", "--server", "127.0.0.1:1")
    assert code == 2 and "error: http://127.0.0.1:1 cannot be reached" in err
    assert not (tmp_path / "out").exists()
    assert [exit_code(error) for error in (JobError("x"), ServerUnavailable("x"), UsageError("x"), OSError("x"), KeyboardInterrupt())] == [1, 2, 2, 2, 130]


# --- starting ComfyUI -------------------------------------------------------------------------


def test_accelerator_available_asks_torch_for_cuda_mps_and_xpu(monkeypatch):
    import torch

    backends = [torch.cuda, torch.backends.mps] + ([torch.xpu] if hasattr(torch, "xpu") else [])
    for backend in backends:
        monkeypatch.setattr(backend, "is_available", lambda: False)
    assert accelerator_available() is False
    for backend in backends:
        monkeypatch.setattr(backend, "is_available", lambda: True)
        assert accelerator_available() is True
        monkeypatch.setattr(backend, "is_available", lambda: False)
    monkeypatch.delattr(torch, "xpu", raising=False)  # a torch older than its XPU support
    assert accelerator_available() is False


def test_cpu_is_added_without_a_device_unless_the_user_chose_one(monkeypatch):
    monkeypatch.setattr(comfy_launch, "accelerator_available", lambda: False)
    assert device_args([]) == ["--cpu"]
    assert device_args(["--base-directory", "/data/comfy", "--cpu-vae"]) == ["--cpu"]  # no device chosen
    for chosen in (["--cpu"], ["--directml"], ["--cuda-device", "0"], ["--cuda-device=0"], ["--lowvram", "--base-directory", "/d"],
                   ["--oneapi-device-selector", "level_zero:0"], ["--default-device", "1"], ["--gpu-only"]):  # fmt: skip
        assert device_args(chosen) == [], chosen


def test_nothing_is_added_when_torch_finds_a_device(monkeypatch):
    monkeypatch.setattr(comfy_launch, "accelerator_available", lambda: True)
    assert device_args([]) == []
    assert device_args(["--base-directory", "/data/comfy"]) == []


def test_a_comfyui_that_fails_to_start_is_reported_with_its_log(fake_comfyui):
    (fake_comfyui / "mode.txt").write_text("crash")
    crashed = LocalComfyUI(fake_comfyui, startup_timeout=120)
    with pytest.raises(ServerUnavailable, match=rf"exited with code 3 while starting \({re.escape(str(crashed.log))}\):\nboom: something is missing"):
        with crashed:
            pass
    assert crashed.log.read_text() == "boom: something is missing\n"  # kept after an error
    crashed.log.unlink()
    (fake_comfyui / "mode.txt").write_text("no-pack")
    launcher = LocalComfyUI(fake_comfyui, startup_timeout=120)
    with pytest.raises(ServerUnavailable, match="has no Face-diffuser nodes: install the pack in its custom_nodes folder"):
        with launcher:
            pass
    started = json.loads((fake_comfyui / "started.json").read_text())
    assert gone(started["pid"], started["child"]) and launcher.log.is_file()
    launcher.log.unlink()


def without(module, name: str) -> types.ModuleType:
    """A copy of ``module`` lacking ``name``, as Windows' ``os`` lacks ``killpg`` and its ``signal`` ``SIGKILL``."""
    copy = types.ModuleType(module.__name__)
    copy.__dict__.update({key: value for key, value in vars(module).items() if key != name})
    return copy


def test_the_server_gets_a_process_group_of_its_own_on_every_platform():
    windows = comfy_launch.start_options("win32")
    assert windows == {"creationflags": 0x200}  # CREATE_NEW_PROCESS_GROUP: no preexec_fn or session, which Windows lacks
    assert getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200) == 0x200
    assert comfy_launch.start_options("darwin") == {"start_new_session": True, "preexec_fn": None}
    linux = comfy_launch.start_options("linux")
    assert linux["start_new_session"] is True and callable(linux["preexec_fn"])  # the parent-death guard


def test_commands_are_quoted_and_split_for_the_platforms_shell():
    python, folder = r"C:\ComfyUI_windows_portable\python_embeded\python.exe", r"C:\My Models\facediffuser"
    args = [python, "-m", "facediffuser_core", "download", "--to", folder]
    windows = quote_command(args, "win32")
    assert windows == rf'{python} -m facediffuser_core download --to "{folder}"'
    assert comfy_launch.split_command(windows, "win32") == args  # backslashes are path separators there
    assert comfy_launch.split_command(r'--base-directory C:\desk\comfy --lowvram', "win32") == ["--base-directory", r"C:\desk\comfy", "--lowvram"]
    posix = quote_command(["/opt/my python/bin/python", "-m", "x", "--to", "/data/it's"], "linux")
    assert comfy_launch.split_command(posix, "linux") == ["/opt/my python/bin/python", "-m", "x", "--to", "/data/it's"]


def test_stop_ends_the_process_tree_where_windows_lacks_killpg_and_sigkill(fake_comfyui, monkeypatch):
    """With the platform faked as Windows (the launcher sees no os.killpg and no signal.SIGKILL; psutil,
    the portable layer, keeps its own platform's calls), stopping the server ends it and the child it
    started: psutil's tree walk, not the POSIX process group, does it."""
    launcher = LocalComfyUI(fake_comfyui, startup_timeout=120)
    with launcher:
        started = json.loads((fake_comfyui / "started.json").read_text())
        assert [process.pid for process in comfy_launch.process_tree(started["pid"])] == [started["pid"], started["child"]]
        monkeypatch.setattr(sys, "platform", "win32")
        monkeypatch.setattr(comfy_launch, "os", without(os, "killpg"))
        monkeypatch.setattr(comfy_launch, "signal", without(signal, "SIGKILL"))
    assert gone(started["pid"], started["child"]) and launcher.process.returncode is not None


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(tmp_path):
    script = "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
             "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)']); " \
             "print(child.pid, flush=True); time.sleep(600)"  # fmt: skip
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, **comfy_launch.start_options())
    child = int(process.stdout.readline())
    started = time.monotonic()
    comfy_launch.end_process_tree(process.pid, grace=1.0)
    process.wait(10)
    assert gone(process.pid, child) and time.monotonic() - started >= 1.0


def generate_command(fake_comfyui: Path, out: Path, prompt: str, comfyui_args: Optional[str] = "--cpu --base-directory {desk}") -> tuple[list[str], dict, Path]:
    """``python -m facediffuser_core generate`` run from inside ComfyUI/custom_nodes/<pack>, a symlink to
    this repository, as a user's shell would (``PWD`` set), with no COMFYUI_PATH and no CUDA device
    visible (``CUDA_VISIBLE_DEVICES`` empty, as on a machine without the NVIDIA driver). ``{desk}`` in
    ``comfyui_args``: a base directory with the models, as the desktop app's. ``--no-crop``: these tests
    are about starting and stopping ComfyUI; the face crop (MTCNN, whose import alone takes the
    subprocess about 5 s) is tested in-process above."""
    desk = fake_comfyui.parent / "desk"
    add_models(desk)
    installed = fake_comfyui / "custom_nodes" / PACK
    installed.symlink_to(ROOT, target_is_directory=True)
    env = {key: value for key, value in os.environ.items() if key != "COMFYUI_PATH"}
    env["PWD"], env["CUDA_VISIBLE_DEVICES"] = str(installed), ""
    command = [sys.executable, "-m", "facediffuser_core", "generate", "--face", str(MAN1), "--prompt", prompt, "-o", str(out),
               "--size", "64", "--steps", "3", "--no-crop", "--startup-timeout", "300"]  # fmt: skip
    if comfyui_args is not None:
        command.append(f"--comfyui-args={comfyui_args.format(desk=desk)}")
    return command, env, installed


def test_auto_start_finds_the_comfyui_the_pack_is_in_and_stops_it(fake_comfyui, tmp_path):
    command, env, installed = generate_command(fake_comfyui, tmp_path / "out", "a man <|image|> on a boat")
    result = subprocess.run(command, cwd=installed, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    started = json.loads((fake_comfyui / "started.json").read_text())
    assert started["argv"][:5] == ["--listen", "127.0.0.1", "--port", started["argv"][3], "--disable-auto-launch"]
    assert started["argv"][5:] == ["--cpu", "--base-directory", str(fake_comfyui.parent / "desk")]  # the user's --cpu, not a second one
    assert "no CUDA, MPS or XPU device found" not in result.stderr
    assert f"starting ComfyUI from {fake_comfyui} on 127.0.0.1:{started['argv'][3]}" in result.stderr
    assert f"ComfyUI is up (pid {started['pid']})" in result.stderr and "ComfyUI stopped" in result.stderr
    assert (tmp_path / "out" / "facediffuser_00001.png").read_bytes() == IMAGE
    assert gone(started["pid"], started["child"])  # nothing left running


@pytest.mark.skipif(sys.platform == "darwin", reason="MPS cannot be hidden from torch")
def test_without_a_gpu_the_comfyui_it_starts_gets_cpu(fake_comfyui, tmp_path):
    command, env, installed = generate_command(fake_comfyui, tmp_path / "out", "a man <|image|> on a boat", comfyui_args=None)
    result = subprocess.run(command, cwd=installed, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    started = json.loads((fake_comfyui / "started.json").read_text())
    assert started["argv"][5:] == ["--cpu"]
    assert result.stderr.count(NO_DEVICE) == 1
    assert result.stderr.index(NO_DEVICE) < result.stderr.index("starting ComfyUI from")  # said before it starts
    assert (tmp_path / "out" / "facediffuser_00001.png").read_bytes() == IMAGE


def test_ctrl_c_stops_the_comfyui_it_started(fake_comfyui, tmp_path):
    command, env, installed = generate_command(fake_comfyui, tmp_path / "out", "a man <|image|>, hang")
    process = subprocess.Popen(command, cwd=installed, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)
    deadline = time.monotonic() + 300
    while not (fake_comfyui / "started.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    started = json.loads((fake_comfyui / "started.json").read_text())
    time.sleep(3)  # up, and the job queued (it never finishes)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "interrupted: nothing was saved; the ComfyUI started for it was stopped" in err
    assert gone(started["pid"], started["child"])
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_killed_command_does_not_leave_its_comfyui_running(fake_comfyui, tmp_path):
    command, env, installed = generate_command(fake_comfyui, tmp_path / "out", "a man <|image|>, hang")
    process = subprocess.Popen(command, cwd=installed, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (fake_comfyui / "started.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    started = json.loads((fake_comfyui / "started.json").read_text())
    process.kill()  # SIGKILL: no finally runs in the command
    process.wait()
    try:
        assert gone(started["pid"])  # ComfyUI itself (its own children are its business)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(started["pid"], signal.SIGKILL)  # the fake's child, and the fake if it survived


# --- regions: who goes where --------------------------------------------------------------------


TWO_MEN = ["--face", str(MAN2), "--face", str(MAN1), "--prompt", "a man <|image|> and a man <|image|> playing chess"]


def node_inputs(graph: dict, link: list) -> dict:
    return graph[link[0]]["inputs"]


def regions_run(fake, tmp_path, capsys, *args: str) -> dict:
    code, _, err = run_main(capsys, *args, "-o", str(tmp_path / "out"), "--server", fake.address, "--steps", "2", "--size", "64", "--width", "96", "--seed", "1")
    assert code == 0, err
    return fake.queued[-1]


def test_layout_columns_feeds_one_regions_node_into_subject_encode(fake, tmp_path, capsys):
    graph = regions_run(fake, tmp_path, capsys, *TWO_MEN, "--layout", "columns")
    encode = next(n["inputs"] for n in graph.values() if n["class_type"] == "FaceDiffuserSubjectEncode")
    assert graph[encode["masks"][0]]["class_type"] == "FaceDiffuserRegions" and encode["masks"][1] == 0
    regions = node_inputs(graph, encode["masks"])
    assert regions == {"width": 96, "height": 64, "people": 2, "layout": "columns", "boxes": "", "prompt": encode["prompt"]}
    assert [n["class_type"] for n in graph.values()].count("FaceDiffuserRegions") == 1
    # without regions the graph is the one it always was: no masks input, no region nodes
    plain = regions_run(fake, tmp_path, capsys, *TWO_MEN)
    assert {n["class_type"] for n in plain.values()}.isdisjoint({"FaceDiffuserRegions", "ImageToMask"})
    assert "masks" not in next(n["inputs"] for n in plain.values() if n["class_type"] == "FaceDiffuserSubjectEncode")


def test_named_regions_become_the_boxes_of_one_regions_node(fake, tmp_path, capsys):
    graph = regions_run(fake, tmp_path, capsys, *TWO_MEN, "--region", "right", "--region", "1/3")
    encode = next(n["inputs"] for n in graph.values() if n["class_type"] == "FaceDiffuserSubjectEncode")
    regions = node_inputs(graph, encode["masks"])
    assert (regions["layout"], regions["people"], regions["width"], regions["height"]) == ("boxes", 2, 96, 64)
    boxes = parse_boxes(regions["boxes"])
    assert boxes[0] == (0.5, 0.0, 1.0, 1.0) and boxes[1] == pytest.approx((0.0, 0.0, 1 / 3, 1.0), abs=1e-9)  # marker order


def test_a_mask_image_region_goes_on_its_persons_subject_node_with_the_named_ones(fake, tmp_path, capsys):
    """With a mask image among the regions each person's mask goes on their own Subject node (nothing
    is batched: no Batch Images, which ComfyUI 0.33 marks deprecated); Subject Encode stacks the
    people's masks, so a mask image of another size than a named region's (the picture's) is resized
    to the picture's size."""
    mask = Image.new("L", (48, 32), 0)
    mask.paste(255, (0, 0, 24, 32))  # the left half
    path = tmp_path / "left.png"
    mask.save(path)
    graph = regions_run(fake, tmp_path, capsys, *TWO_MEN, "--region", str(path), "--region", "right")
    expected = io.BytesIO()
    mask.convert("RGB").resize((96, 64), Image.BILINEAR).save(expected, format="PNG")
    uploaded = [name for _, name in fake.uploads if name.startswith("region1_")]
    assert uploaded == [f"region1_{hashlib.sha1(expected.getvalue()).hexdigest()[:10]}.png"]
    assert not [n for n in graph.values() if n["class_type"] == "ImageBatch"]
    encode = next(n["inputs"] for n in graph.values() if n["class_type"] == "FaceDiffuserSubjectEncode")
    assert "masks" not in encode
    second = node_inputs(graph, encode["subjects"])
    first = node_inputs(graph, second["previous_subjects"])
    assert "previous_subjects" not in first
    to_mask = graph[first["mask"][0]]  # marker 1: the mask image, its red channel
    assert to_mask["class_type"] == "ImageToMask" and to_mask["inputs"]["channel"] == "red"
    load = graph[to_mask["inputs"]["image"][0]]
    assert load["class_type"] == "LoadImage" and load["inputs"]["image"] == f"facediffuser/{uploaded[0]}"
    regions = node_inputs(graph, second["mask"])  # marker 2: right
    assert (regions["people"], regions["layout"], parse_boxes(regions["boxes"]), regions["width"], regions["height"]) == (1, "boxes", [(0.5, 0.0, 1.0, 1.0)], 96, 64)


def test_mask_images_of_one_size_are_uploaded_as_they_are(fake, tmp_path, capsys):
    """Masks of one size (none of them the picture's) need no resizing: each is uploaded as it is."""
    paths = []
    for number, box in enumerate(((0, 0, 24, 32), (24, 0, 48, 32)), start=1):
        mask = Image.new("L", (48, 32), 0)
        mask.paste(255, box)
        paths.append(tmp_path / f"m{number}.png")
        mask.save(paths[-1])
    regions_run(fake, tmp_path, capsys, *TWO_MEN, "--region", str(paths[0]), "--region", str(paths[1]))
    for number, path in enumerate(paths, start=1):
        expected = io.BytesIO()
        Image.open(path).convert("RGB").save(expected, format="PNG")
        assert [name for _, name in fake.uploads if name.startswith(f"region{number}_")] == [f"region{number}_{hashlib.sha1(expected.getvalue()).hexdigest()[:10]}.png"]


def test_several_photos_of_a_person_take_the_regions_as_one_photo_each_does(fake, tmp_path, capsys):
    """Columns with several photos of a person: one Regions node into Subject Encode's masks, as with
    one photo each (and the shipped regions workflow), each person's photos on their own Subject node."""
    args = ["--face", f"{MAN1},{MAN2}", "--face", str(MAN2), "--prompt", "a man <|image|> and a man <|image|> playing chess"]
    graph = regions_run(fake, tmp_path, capsys, *args, "--layout", "columns")
    encode = next(n["inputs"] for n in graph.values() if n["class_type"] == "FaceDiffuserSubjectEncode")
    regions = node_inputs(graph, encode["masks"])
    assert (regions["people"], regions["layout"], regions["width"], regions["height"]) == (2, "columns", 96, 64)
    second = node_inputs(graph, encode["subjects"])
    first = node_inputs(graph, second["previous_subjects"])
    assert "mask" not in first and "mask" not in second
    assert ("images_2" in first, "images_2" in second) == (True, False)


def test_region_usage_errors_stop_before_anything_is_uploaded(fake, tmp_path, capsys):
    black, wide = tmp_path / "black.png", tmp_path / "wide.png"
    Image.new("RGB", (96, 64), 0).save(black)
    Image.new("RGB", (128, 32), (255, 255, 255)).save(wide)
    (tmp_path / "notes.png").write_text("not an image")
    cases = [  # each whole message: what is wrong with which --region, and the fix
        (["--region", "left"], "--region was given 1 time(s) but --face 2 time(s); give one --region per --face, in marker order (or --layout columns for all)"),
        (["--region", "left", "--region", "right", "--layout", "columns"], "give --region once per --face or --layout for all of them, not both"),
        (
            ["--region", "left", "--region", "top"],
            "--region #2: 'top' is none of left, right, centre, n/N (e.g. 2/3) and no such mask image file; give one of those names or the path of a mask image, white where the person goes",
        ),
        (["--region", "3/2", "--region", "left"], "--region #1: region '3/2' asks for column 3 of 2; n/N takes 1 <= n <= N, e.g. 2/3 for the middle of three"),
        (["--region", str(black), "--region", "left"], f"--region #1: the mask image {black} is black everywhere; paint the person's region white"),
        (["--region", "left", "--region", str(wide)], f"--region #2: the mask image {wide} is 128x32 but the picture is 96x64; give a mask of the picture's aspect ratio"),
        (["--region", "left", "--region", str(tmp_path / "notes.png")], f"--region #2: {tmp_path / 'notes.png'} is not an image ("),
    ]
    for args, message in cases:
        code, _, err = run_main(capsys, *TWO_MEN, *args, "-o", str(tmp_path / "out"), "--server", fake.address, "--size", "64", "--width", "96")
        assert code == 2 and message in err, err
    assert "); give a mask image, white where the person goes" in err  # the unreadable file's fix, after PIL's reason
    assert fake.uploads == [] and fake.queued == []
    with pytest.raises(SystemExit) as stop:
        run_main(capsys, *TWO_MEN, "--layout", "rows", "-o", str(tmp_path / "out"), "--server", fake.address)
    assert stop.value.code == 2 and "invalid choice: 'rows'" in capsys.readouterr().err
# --- a pose ControlNet ------------------------------------------------------------------------

POSE = ROOT / "workflows" / "inputs" / "pose_two_people.png"


def test_pose_puts_the_controlnet_on_every_conditioning_of_the_sampler(fake, tmp_path, capsys):
    args = ["--face", str(MAN2), "--face", str(MAN1), "--prompt", "a man <|image|> and a man <|image|> playing chess",
            "-o", str(tmp_path / "out"), "--server", fake.address, "--steps", "4", "--size", "64", "--seed", "7"]  # fmt: skip
    code, _, err = run_main(capsys, *args, "--pose", str(POSE), "--controlnet", "my_pose.safetensors", "--control-strength", "0.8")
    assert code == 0, err
    (graph,) = fake.queued
    (apply_id,) = [key for key, node in graph.items() if node["class_type"] == "FaceDiffuserApplyControlNet"]
    control = graph[apply_id]["inputs"]
    (encode_id,) = [key for key, node in graph.items() if node["class_type"] == "FaceDiffuserSubjectEncode"]
    (negative_id,) = [key for key, node in graph.items() if node["class_type"] == "CLIPTextEncode"]
    assert (control["text"], control["subject"], control["negative"]) == ([encode_id, 0], [encode_id, 1], [negative_id, 0])
    assert (control["strength"], control["start_percent"], control["end_percent"]) == (0.8, 0.0, 1.0)
    assert graph[control["control_net"][0]] | {"_meta": None} == {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "my_pose.safetensors"}, "_meta": None}
    pose = graph[control["image"][0]]["inputs"]["image"]
    assert re.fullmatch(r"facediffuser/pose_two_people_[0-9a-f]{10}\.png", pose) and ("facediffuser", pose.split("/")[1]) in fake.uploads
    sampler = next(node["inputs"] for node in graph.values() if node["class_type"] == "FaceDiffuserSampler")
    assert (sampler["text"], sampler["subject"], sampler["negative"]) == ([apply_id, 0], [apply_id, 1], [apply_id, 2])
    regions = node_inputs(graph, graph[encode_id]["inputs"]["masks"])  # each face's region from the pose
    boxes = parse_boxes(regions["boxes"])
    assert (regions["people"], regions["layout"]) == (2, "boxes") and boxes == pose_boxes(np.asarray(Image.open(POSE).convert("RGB"), np.float32) / 255, 2)
    assert boxes[0][2] <= 0.5 <= boxes[1][0]  # the shipped pose: one person in each half, the first --face on the left
    code, _, err = run_main(capsys, *args)  # without --pose: no ControlNet, the graph as before
    assert code == 0, err
    assert build_graph(Generation("a man <|image|>", (("a.png",),))).nodes == build_graph(Generation("a man <|image|>", (("a.png",),), controlnet="x")).nodes
    assert not [node for node in fake.queued[1].values() if node["class_type"] in ("FaceDiffuserApplyControlNet", "ControlNetLoader")]


def test_the_pose_is_uploaded_as_an_rgb_png(fake, tmp_path, capsys):
    Image.new("RGBA", (40, 30), (10, 200, 30, 128)).save(tmp_path / "pose.webp")
    code, _, err = run_main(capsys, *TWO_MEN, "--layout", "columns", "--pose", str(tmp_path / "pose.webp"), "-o", str(tmp_path / "out"), "--server", fake.address, "--size", "64")
    assert code == 0, err
    expected = io.BytesIO()
    Image.open(tmp_path / "pose.webp").convert("RGB").save(expected, format="PNG")  # uploads are named by their bytes' hash
    assert [name for _, name in fake.uploads if name.startswith("pose_")] == [f"pose_{hashlib.sha1(expected.getvalue()).hexdigest()[:10]}.png"]


def test_a_region_or_layout_wins_over_the_pose(fake, tmp_path, capsys):
    for given, expected in ((["--region", "right", "--region", "left"], "0.5,0,1,1; 0,0,0.5,1"), (["--layout", "columns"], "")):
        graph = regions_run(fake, tmp_path, capsys, *TWO_MEN, *given, "--pose", str(POSE))
        encode = next(n["inputs"] for n in graph.values() if n["class_type"] == "FaceDiffuserSubjectEncode")
        assert node_inputs(graph, encode["masks"])["boxes"] == expected


def test_pose_usage_errors_and_a_missing_controlnet_stop_before_any_server_starts(fake_comfyui, tmp_path, capsys):
    common = [*TWO_MEN, "-o", str(tmp_path / "out"), "--comfyui", str(fake_comfyui), "--size", "64"]
    code, _, err = run_main(capsys, *common, "--pose", str(tmp_path / "none.png"))
    assert code == 2 and f"--pose: no such file {tmp_path / 'none.png'}" in err
    (tmp_path / "notes.png").write_text("not an image")
    code, _, err = run_main(capsys, *common, "--pose", str(tmp_path / "notes.png"))
    assert code == 2 and f"--pose: {tmp_path / 'notes.png'} is not an image (" in err and "give a pose image (an OpenPose render" in err and "Traceback" not in err
    one = ["--face", str(MAN1), "--prompt", "a man <|image|>", *common[len(TWO_MEN):]]
    code, _, err = run_main(capsys, *one, "--pose", str(POSE))
    assert code == 2 and "--pose: the pose image has 2 skeleton(s) for 1 people (one per <|image|> marker)" in err and "or give --region once per --face, or --layout columns" in err
    code, _, err = run_main(capsys, *common, "--pose", str(POSE), "--control-strength", "11")
    assert code == 2 and "--control-strength must be between 0 and 10, got 11.0" in err
    code, _, err = run_main(capsys, *common, "--pose", str(POSE))
    folder = fake_comfyui / "models" / "controlnet"
    assert code == 2
    assert f"--controlnet: no file {DEFAULT_CONTROLNET} in the folders ComfyUI searches for ControlNets ({folder}); download it with: {CLI} download --controlnet openpose --comfyui {fake_comfyui}\n" in err
    code, _, err = run_main(capsys, *common, "--pose", str(POSE), "--controlnet", "depth.safetensors")
    assert code == 2 and f"no file depth.safetensors in the folders ComfyUI searches for ControlNets ({folder}); put it in one of them\n" in err
    assert not (fake_comfyui / "started.json").exists()
    folder.mkdir()
    (folder / DEFAULT_CONTROLNET).touch()
    check_controlnet(DEFAULT_CONTROLNET, fake_comfyui, explicit=True, comfyui_args=[])  # there: no error


# --- into your own picture ----------------------------------------------------------------------

PARK = ROOT / "workflows" / "inputs" / "photo_park.png"


def test_into_builds_the_into_a_photo_template_graph(fake, tmp_path, capsys):
    """--into: the template's graph (workflows/api/facediffuser_into_a_photo.json) with the job's
    settings: the photo scaled to --width wide, its latent sizing the regions and, through the
    regions' union, the noise mask; the result composited over the scaled photo."""
    photo = tmp_path / "street.jpg"
    Image.new("RGB", (300, 200), (90, 120, 150)).save(photo)
    graph = regions_run(fake, tmp_path, capsys, *TWO_MEN, "--region", "1/3", "--region", "3/3", "--into", str(photo))
    assert "EmptyLatentImage" not in {n["class_type"] for n in graph.values()}
    (load_id,) = [key for key, n in graph.items() if n["class_type"] == "LoadImage" and n["_meta"]["title"] == "Your picture"]
    assert re.fullmatch(r"facediffuser/street_[0-9a-f]{10}\.png", graph[load_id]["inputs"]["image"])
    expected = io.BytesIO()
    Image.open(photo).convert("RGB").save(expected, format="PNG")  # uploaded as PNG, whole: the graph scales it
    assert ("facediffuser", f"street_{hashlib.sha1(expected.getvalue()).hexdigest()[:10]}.png") in fake.uploads
    (scale_id,) = [key for key, n in graph.items() if n["class_type"] == "ImageScale"]
    assert graph[scale_id]["inputs"] == {"image": [load_id, 0], "upscale_method": "lanczos", "width": 96, "height": 0, "crop": "disabled"}
    (encode_id,) = [key for key, n in graph.items() if n["class_type"] == "VAEEncode"]
    encode = next(n["inputs"] for n in graph.values() if n["class_type"] == "FaceDiffuserSubjectEncode")
    regions = node_inputs(graph, encode["masks"])
    assert regions["size_from"] == [encode_id, 0] and regions["layout"] == "boxes" and (regions["width"], regions["height"]) == (96, 64)
    (union_id,) = [key for key, n in graph.items() if n["class_type"] == "FaceDiffuserRegionsUnion"]
    assert graph[union_id]["inputs"] == {"masks": encode["masks"]}
    sampler = next(n["inputs"] for n in graph.values() if n["class_type"] == "FaceDiffuserSampler")
    assert node_inputs(graph, sampler["latent_image"]) == {"samples": [encode_id, 0], "mask": [union_id, 0]} and sampler["denoise"] == 1.0
    save = next(n["inputs"] for n in graph.values() if n["class_type"] == "SaveImage")
    composite = graph[save["images"][0]]
    assert composite["class_type"] == "ImageCompositeMasked" and composite["inputs"]["destination"] == [scale_id, 0] and composite["inputs"]["mask"] == [union_id, 0]
    assert graph[composite["inputs"]["source"][0]]["class_type"] == "VAEDecode"
    # the shipped template is this graph: the same node types, wired the same way
    template = json.loads((ROOT / "workflows" / "api" / "facediffuser_into_a_photo.json").read_text())
    kinds = lambda g: sorted(n["class_type"] for n in g.values() if n["class_type"] not in ("PreviewImage", "MaskToImage", "FaceDiffuserFaceCrop"))  # noqa: E731
    assert kinds(graph) == kinds(template)


def test_into_usage_errors_stop_before_anything_is_uploaded(fake, tmp_path, capsys):
    mask = tmp_path / "mask.png"
    Image.new("RGB", (96, 96), (255, 255, 255)).save(mask)  # the park's shape: a usable mask image, but not with --into
    flat = tmp_path / "flat.png"
    Image.new("RGB", (400, 100), 0).save(flat)
    into = ["--into", str(PARK)]
    cases = [
        (into, "--into repaints only where the people go: give each --face's place as a box (--region left, right, centre or n/N, once per --face), --layout columns or --pose; mask images are not taken with --into"),
        ([*into, "--region", str(mask), "--region", "right"], "mask images are not taken with --into"),
        ([*into, "--layout", "columns", "--height", "64"], "--into takes the picture's aspect ratio: give its width with --width (or --size), not --height"),
        ([*into, "--layout", "columns", "--batch", "2"], "--into makes one picture from your photo; leave out --batch (got 2) and change --seed for another"),
        (["--into", str(tmp_path / "none.jpg"), "--layout", "columns"], f"--into: no such file {tmp_path / 'none.jpg'}"),
        (["--into", str(flat), "--layout", "columns"], f"--into: {flat} is 400x100, 24 pixels high at 96 wide; give a picture at least 64 pixels high at that width (or a larger --width)"),
    ]
    for args, message in cases:
        code, _, err = run_main(capsys, *TWO_MEN, *args, "-o", str(tmp_path / "out"), "--server", fake.address, "--width", "96")
        assert code == 2 and message in err, err
    assert fake.uploads == [] and fake.queued == []


def test_without_into_the_graph_is_unchanged():
    job = Generation("a man <|image|> and a man <|image|>", (("a.png",), ("b.png",)), layout="columns")
    nodes = build_graph(job).nodes
    assert "size_from" not in next(n["inputs"] for n in nodes.values() if n["class_type"] == "FaceDiffuserRegions")
    assert not {n["class_type"] for n in nodes.values()} & {"VAEEncode", "SetLatentNoiseMask", "FaceDiffuserRegionsUnion", "ImageCompositeMasked", "ImageScale"}
    with pytest.raises(FaceDiffuserError, match="putting people into a picture needs their regions as columns or boxes"):
        build_graph(Generation("a man <|image|>", (("a.png",),), into="park.png"))
