"""``python -m facediffuser_core generate`` against the real ComfyUI (--cpu, random SD1.5-sized models,
64 px, 3 steps: the pictures are noise, the pipeline is real): started by the command (--comfyui)
and a running one (--server, the suite's server), one, two and four faces, two photos of one person,
a batch, a photo without a face, usage errors before any start, Ctrl-C while sampling, the
workflow a PNG carries re-queued on another server giving the same picture, and a missing model whose
error names the ``download`` command that, run as printed against a fake hub, fills the folder.

The tests that start a ComfyUI have the suite's server unload its models first (``quiet_servers``):
one loaded SD1.5-sized set at a time. The ComfyUI they start runs as the suite's servers do."""

from __future__ import annotations

import contextlib
import filecmp
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_suite import quiet_servers
from fake_hub import FakeHub
from harness import LOW_MEMORY_ENV, SERVER_ARGS, make_base_directory
from paths import CLI, FACES, ROOT
from processes import gone, sigint_default

MAN1, MAN2 = FACES / "man1.jpeg", FACES / "man2.jpeg"
SMALL = ["--size", "64", "--steps", "3"]  # 0.3 / 0.6 of 3 steps: two scene steps, one fusion step
COMMAND_ENV = {**os.environ, **LOW_MEMORY_ENV, "CUDA_VISIBLE_DEVICES": ""}  # no GPU for the command, as on CI


@pytest.fixture(scope="module")
def base(model_files, tmp_path_factory) -> Path:
    """A --base-directory with the pack and the converted models, for the ComfyUI the command starts."""
    models = {"facediffuser_sdm.safetensors": model_files.sdm, "facediffuser_tdm.safetensors": model_files.tdm}
    return make_base_directory(tmp_path_factory.mktemp("generate-base"), models, [])


def auto_start(comfyui_path: Path, base: Path, starts: bool = True) -> list[str]:
    """generate's arguments to start ``comfyui_path`` on ``base``, once the suite's server is quiet
    (``starts``; a run that must stop before any ComfyUI starts leaves the server's models loaded for
    the next test). No device option: generate adds --cpu itself where torch finds no GPU (the
    subprocess sees none)."""
    if starts:
        quiet_servers()
    return ["--comfyui", str(comfyui_path), f"--comfyui-args=--base-directory {base} {' '.join(SERVER_ARGS)}"]


def generate(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "facediffuser_core", "generate", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=COMMAND_ENV)


def generate_here(*args: str) -> subprocess.CompletedProcess:
    """The same command as :func:`generate` (``python -m facediffuser_core``'s ``main``), run in this
    process, for the tests that compare the pictures of several --server runs: a new interpreter spends
    about 5 s of each run importing torch and facenet-pytorch (whose torchvision imports torch._dynamo)
    before it crops a face. The other tests run it as a subprocess, as users do."""
    from facediffuser_core.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["generate", *args])
    return subprocess.CompletedProcess(["generate", *args], code, out.getvalue(), err.getvalue())


def started_pid(stderr: str) -> int:
    return int(re.search(r"ComfyUI is up \(pid (\d+)\)", stderr).group(1))


def port_closed(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def pixels(data_or_path) -> np.ndarray:
    image = Image.open(io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path)
    return np.asarray(image.convert("RGB"))


def embedded_graph(path: Path) -> dict:
    return json.loads(Image.open(path).info["prompt"])


def nodes_of(graph: dict, class_type: str) -> list[dict]:
    return [node for node in graph.values() if node["class_type"] == class_type]


def people(graph: dict, link: list) -> list[dict]:
    """The Face-diffuser Subject nodes chained into ``link`` (a subjects input), in marker order."""
    chain = []
    while link is not None:
        node = graph[link[0]]
        assert node["class_type"] == "FaceDiffuserSubject", node
        chain.insert(0, node)
        link = node["inputs"].get("previous_subjects")
    return chain


def photos(graph: dict, subject: dict) -> list[str]:
    """The uploaded photo names of one Subject node, in input order (images, images_2...), as the people's file stems."""
    return [graph[subject["inputs"][name][0]]["inputs"]["image"].split("_")[0] for name in ("images", "images_2", "images_3", "images_4") if name in subject["inputs"]]


def check_no_deprecated_node(graph: dict, server) -> None:
    """No node of the graph generate built is one this ComfyUI marks deprecated (the web UI's [DEPR]
    badge when the PNG is dropped on the canvas); ImageBatch, which 0.33 marks, on no host."""
    info = server.get("/object_info")
    used = {node["class_type"] for node in graph.values()}
    assert used <= set(info) and not sorted(kind for kind in used if info[kind].get("deprecated"))
    assert "ImageBatch" not in used


def check_outputs(out: Path, count: int) -> list[Path]:
    """The images and masks of one run: 64 px RGB pictures, masks only black and white."""
    images = sorted(out.glob("facediffuser_?????.png"))
    assert [p.name for p in images] == [f"facediffuser_{n:05d}.png" for n in range(1, count + 1)]
    for image in images:
        assert pixels(image).shape == (64, 64, 3)
        mask = pixels(image.with_name(f"{image.stem}_mask.png"))
        assert mask.shape == (64, 64, 3) and set(np.unique(mask)) <= {0, 255}
    return images


def test_two_faces_batch_two_on_a_running_server(server, tmp_path):
    out = tmp_path / "out"
    result = generate(
        "--face", str(MAN1), "--face", str(MAN2), "--prompt", "a man <|image|> and a man <|image|> playing chess",
        "-o", str(out), *SMALL, "--batch", "2", "--seed", "11", "--server", f"127.0.0.1:{server.port}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = check_outputs(out, 2)
    assert not np.array_equal(pixels(first), pixels(second))  # each batch item has its own noise
    graph = embedded_graph(first)
    (encode,) = nodes_of(graph, "FaceDiffuserSubjectEncode")
    chain = people(graph, encode["inputs"]["subjects"])
    assert [photos(graph, subject) for subject in chain] == [["facediffuser/man1"], ["facediffuser/man2"]]  # marker order
    assert [subject["_meta"]["title"] for subject in chain] == ["Person of the 1st <|image|>", "Person of the 2nd <|image|>"]
    check_no_deprecated_node(graph, server)
    assert nodes_of(graph, "EmptyLatentImage")[0]["inputs"]["batch_size"] == 2


def test_detail_runs_the_face_detailer_on_the_sampled_picture(server, tmp_path):
    """The random test models draw no face, so the detailer passes the picture through (its face
    re-rendering is tested in-process, test_comfy_detailer.py): the same picture as without --detail,
    from a graph that holds the detailer with the job's people and settings."""
    common = ["--face", str(MAN1), "--face", str(MAN2), "--prompt", "a man <|image|> and a man <|image|> playing chess", *SMALL, "--seed", "5", "--server", f"127.0.0.1:{server.port}"]
    result = generate_here(*common, "-o", str(tmp_path / "detailed"), "--detail", "--detail-denoise", "0.35")
    assert result.returncode == 0, result.stderr[-3000:]
    (detailed,) = check_outputs(tmp_path / "detailed", 1)
    assert generate_here(*common, "-o", str(tmp_path / "plain")).returncode == 0
    (plain,) = check_outputs(tmp_path / "plain", 1)
    assert np.array_equal(pixels(detailed), pixels(plain))
    graph = embedded_graph(detailed)
    (detailer,) = nodes_of(graph, "FaceDiffuserFaceDetailer")
    (encode,) = nodes_of(graph, "FaceDiffuserSubjectEncode")
    assert detailer["inputs"]["subjects"] == encode["inputs"]["subjects"] and detailer["inputs"]["denoise"] == 0.35
    assert [photos(graph, subject) for subject in people(graph, detailer["inputs"]["subjects"])] == [["facediffuser/man1"], ["facediffuser/man2"]]
    check_no_deprecated_node(graph, server)
    assert (detailer["inputs"]["seed"], detailer["inputs"]["steps"]) == (5, 3)


def test_several_photos_of_one_person(server, tmp_path):
    def picture(face: str, name: str) -> np.ndarray:
        subject_stage_only = ["--start-merge", "0", "--final", "0"]  # every step on the SDM: the faces count most
        result = generate_here("--face", face, "--prompt", "a man <|image|> on a bench", "-o", str(tmp_path / name), *SMALL, *subject_stage_only, "--seed", "4", "--server", f"127.0.0.1:{server.port}")
        assert result.returncode == 0, result.stderr[-3000:]
        (image,) = check_outputs(tmp_path / name, 1)
        return pixels(image)

    alone, twice, both = picture(str(MAN1), "alone"), picture(f"{MAN1},{MAN1}", "twice"), picture(f"{MAN1},{MAN2}", "both")
    # The random test models respond weakly to one word's embedding (a different face moves channel
    # values by about one level), so what is compared is how many of them move: the average of a
    # photo's embedding with itself is that embedding (up to the batched encoder's float rounding),
    # while a second, different photo changes the picture far more widely.
    rounding = int((twice != alone).sum())
    assert np.abs(twice.astype(int) - alone.astype(int)).max() <= 1 and rounding <= 16
    assert (both != alone).sum() > 10 * max(rounding, 1)
    graph = embedded_graph(next((tmp_path / "both").glob("*[0-9].png")))
    (subject,) = nodes_of(graph, "FaceDiffuserSubject")
    assert photos(graph, subject) == ["facediffuser/man1", "facediffuser/man2"]  # one photo input each, in --face order
    check_no_deprecated_node(graph, server)


def test_four_faces_chain_four_subject_nodes(server, tmp_path):
    out = tmp_path / "out"
    prompt = "a man <|image|>, a man <|image|>, a man <|image|> and a man <|image|> on a bench"
    faces = [arg for photo in (MAN1, MAN2, MAN2, MAN1) for arg in ("--face", str(photo))]
    result = generate(*faces, "--prompt", prompt, "-o", str(out), *SMALL, "--seed", "2", "--server", f"127.0.0.1:{server.port}")
    assert result.returncode == 0, result.stderr[-3000:]
    (image,) = check_outputs(out, 1)
    graph = embedded_graph(image)
    (encode,) = nodes_of(graph, "FaceDiffuserSubjectEncode")
    chain = people(graph, encode["inputs"]["subjects"])
    assert [photos(graph, subject) for subject in chain] == [["facediffuser/man1"], ["facediffuser/man2"], ["facediffuser/man2"], ["facediffuser/man1"]]
    assert len(nodes_of(graph, "FaceDiffuserSubject")) == 4
    check_no_deprecated_node(graph, server)


def test_regions_from_names_columns_and_a_mask_image(server, tmp_path):
    """--region and --layout on the real server: regions that cover the whole picture are no regions
    (bit-identical picture), columns change it; a mask image with a named region (each person's mask on
    their own Subject node) gives the columns' picture. The second person has two photos in every run,
    so the columns run is also the one that shows columns with several photos of a person running
    through ComfyUI's own nodes (four runs; that case had a fifth run of its own)."""
    common = ["--face", str(MAN1), "--face", f"{MAN2},{MAN2}", "--prompt", "a man <|image|> and a man <|image|> playing chess", *SMALL, "--start-merge", "0", "--final", "0", "--seed", "8", "--server", f"127.0.0.1:{server.port}"]

    def picture(name: str, *args: str) -> np.ndarray:
        result = generate_here(*common, *args, "-o", str(tmp_path / name))
        assert result.returncode == 0, result.stderr[-3000:]
        (image,) = check_outputs(tmp_path / name, 1)
        return pixels(image)

    plain, whole, columns = picture("plain"), picture("whole", "--region", "1/1", "--region", "1/1"), picture("columns", "--layout", "columns")
    assert np.array_equal(whole, plain) and not np.array_equal(columns, plain)
    graph = embedded_graph(next((tmp_path / "columns").glob("*[0-9].png")))
    (encode,) = nodes_of(graph, "FaceDiffuserSubjectEncode")
    assert graph[encode["inputs"]["masks"][0]]["inputs"]["layout"] == "columns" and len(nodes_of(graph, "FaceDiffuserRegions")) == 1
    assert [photos(graph, subject) for subject in people(graph, encode["inputs"]["subjects"])] == [["facediffuser/man1"], ["facediffuser/man2", "facediffuser/man2"]]
    check_no_deprecated_node(graph, server)
    mask = tmp_path / "left.png"
    left = Image.new("L", (64, 64), 0)
    left.paste(255, (0, 0, 32, 64))
    left.save(mask)
    assert np.array_equal(picture("mixed", "--region", str(mask), "--region", "right"), columns)  # the same two halves
    graph = embedded_graph(next((tmp_path / "mixed").glob("*[0-9].png")))
    (encode,) = nodes_of(graph, "FaceDiffuserSubjectEncode")
    first, second = people(graph, encode["inputs"]["subjects"])
    assert "masks" not in encode["inputs"] and graph[first["inputs"]["mask"][0]]["class_type"] == "ImageToMask"
    assert graph[graph[first["inputs"]["mask"][0]]["inputs"]["image"][0]]["inputs"]["image"].startswith("facediffuser/region1")  # the mask image: marker 1's
    assert graph[second["inputs"]["mask"][0]]["inputs"]["boxes"] == "0.5,0,1,1"  # right: marker 2's
    check_no_deprecated_node(graph, server)


def test_into_puts_each_person_into_their_box_of_the_photo_and_keeps_the_rest(server, tmp_path):
    """--into on the real server: people in the left and right thirds of the drawn park (scaled to 64
    px wide); the middle third is the park's, pixel for pixel (up to the 8-bit rounding of the scaled
    park), in every run; swapping the first person's photo changes the first person's third more than
    the second person's, and nothing in the middle."""
    park = ROOT / "workflows" / "inputs" / "photo_park.png"
    subject_stage_only = ["--start-merge", "0", "--final", "0"]  # every step on the SDM, as in the regions test above: the faces count most
    common = ["--prompt", "a man <|image|> and a man <|image|> standing in a park", *SMALL, *subject_stage_only, "--seed", "5", "--server", f"127.0.0.1:{server.port}"]
    common += ["--into", str(park), "--region", "1/3", "--region", "3/3"]

    def picture(name: str, first: Path) -> np.ndarray:
        result = generate_here("--face", str(first), "--face", str(MAN2), *common, "-o", str(tmp_path / name))
        assert result.returncode == 0, result.stderr[-3000:]
        (image,) = check_outputs(tmp_path / name, 1)
        return pixels(image).astype(np.int16)

    ours, swapped = picture("ours", MAN1), picture("swapped", MAN2)
    scaled = np.asarray(Image.open(park).convert("RGB").resize((64, 64), Image.LANCZOS), dtype=np.int16)
    middle, first, second = slice(22, 42), slice(0, 21), slice(43, 64)  # pixel centres inside 1/3 .. 2/3, 0 .. 1/3, 2/3 .. 1
    for result in (ours, swapped):
        assert np.abs(result[:, middle] - scaled[:, middle]).max() <= 1
        assert np.abs(result[:, first] - scaled[:, first]).mean() > 5  # a person was painted there
    change = np.abs(ours - swapped)
    assert change[:, middle].max() == 0
    assert change[:, first].mean() > change[:, second].mean()
    graph = embedded_graph(next((tmp_path / "ours").glob("*[0-9].png")))
    assert len(nodes_of(graph, "ImageCompositeMasked")) == 1 and not nodes_of(graph, "EmptyLatentImage")
    check_no_deprecated_node(graph, server)


def test_a_photo_without_a_face(comfyui_path, base, server, tmp_path):
    wall = tmp_path / "wall.png"
    Image.new("RGB", (300, 240), (128, 128, 128)).save(wall)
    common = ["--face", str(wall), "--prompt", "a man <|image|> in a park", "-o", str(tmp_path / "out"), *SMALL]
    result = generate(*common, *auto_start(comfyui_path, base, starts=False))
    assert result.returncode == 2 and f"error: --face #1: no face was found in {wall}" in result.stderr
    assert "use another photo, or --no-crop to use it whole" in result.stderr and "starting ComfyUI" not in result.stderr
    result = generate(*common, "--no-crop", "--server", f"127.0.0.1:{server.port}")
    assert result.returncode == 0, result.stderr[-3000:]
    check_outputs(tmp_path / "out", 1)


def test_marker_photo_mismatch_stops_before_any_server_starts(comfyui_path, base, tmp_path):
    result = generate("--face", str(MAN1), "--prompt", "a man <|image|> and a man <|image|>", "-o", str(tmp_path / "out"), *SMALL, *auto_start(comfyui_path, base, starts=False), timeout=300)
    assert result.returncode == 2
    assert "error: the prompt has 2 <|image|> marker(s) but --face was given 1 time(s)" in result.stderr
    assert "starting ComfyUI" not in result.stderr and not (tmp_path / "out").exists()


def test_ctrl_c_while_sampling_stops_the_comfyui_it_started(comfyui_path, base, tmp_path):
    command = [sys.executable, "-m", "facediffuser_core", "generate", "--face", str(MAN1), "--prompt", "a man <|image|> in a park",
               "-o", str(tmp_path / "out"), "--size", "64", "--steps", "40", *auto_start(comfyui_path, base)]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=sigint_default, env=COMMAND_ENV)
    stderr = bytearray()
    reader = threading.Thread(target=lambda: [stderr.extend(chunk) for chunk in iter(lambda: process.stderr.read1(4096), b"")], daemon=True)
    reader.start()
    deadline = time.monotonic() + 900
    while b"scene stage" not in stderr and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert b"scene stage" in stderr, stderr.decode(errors="replace")[-3000:]  # sampling has begun
    process.send_signal(signal.SIGINT)
    process.wait(120)
    reader.join(10)
    text = stderr.decode(errors="replace")
    assert process.returncode == 130, text[-3000:]
    assert "interrupted: nothing was saved; the ComfyUI started for it was stopped" in text
    pid, port = started_pid(text), int(re.search(r"on 127\.0\.0\.1:(\d+)", text).group(1))
    assert gone(pid) and port_closed(port)
    with pytest.raises(ProcessLookupError):  # nothing is left in its process group either
        os.killpg(pid, 0)
    assert not (tmp_path / "out").exists()


def test_a_missing_model_is_downloaded_as_told_then_generate_starts_comfyui_on_it_and_its_png_requeues_elsewhere(comfyui_path, model_files, server, tmp_path, request):
    """The SDM is missing from the ComfyUI's --base-directory: generate names the download command;
    run as printed (the fake hub serves the suite's SD1.5-sized official SDM file), it downloads and
    converts only the SDM (the TDM is there) into that folder. generate then starts that ComfyUI, runs
    on it and stops it; the PNG's embedded workflow, queued on another ComfyUI that never ran it,
    gives the same picture."""
    base = make_base_directory(tmp_path / "base", {"facediffuser_tdm.safetensors": model_files.tdm}, [])
    out = tmp_path / "out"
    args = ["--face", str(MAN1), "--prompt", "a photo of a man <|image|> in a park", "-o", str(out), *SMALL, "--seed", "5"]
    missing = generate(*args, *auto_start(comfyui_path, base, starts=False), timeout=300)
    folder = base / "models" / "facediffuser"
    assert missing.returncode == 2 and "error: no model file facediffuser_sdm.safetensors in the folders ComfyUI searches" in missing.stderr
    assert f"({folder}); download it with: {CLI} download --to {folder}\n" in missing.stderr
    assert "starting ComfyUI" not in missing.stderr
    command = shlex.split(missing.stderr.split("download it with: ")[1].strip())
    hub = FakeHub({"CodeGoat24/Face-diffuser/SDM/pytorch_model.bin": model_files.sdm_official})
    try:
        env = {**COMMAND_ENV, "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        fetched = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    finally:
        hub.close()
    request.addfinalizer(lambda: shutil.rmtree(base / "models"))  # GBs: not kept until the session ends
    assert fetched.returncode == 0, fetched.stderr[-3000:]
    assert f"{folder / 'facediffuser_tdm.safetensors'} is already there: nothing to download" in fetched.stdout
    assert [request[1] for request in hub.byte_requests()] == ["/CodeGoat24/Face-diffuser/resolve/main/SDM/pytorch_model.bin"]
    assert sorted(path.name for path in folder.iterdir()) == ["facediffuser_sdm.safetensors", "facediffuser_tdm.safetensors"]
    assert filecmp.cmp(folder / "facediffuser_sdm.safetensors", model_files.sdm, shallow=False)  # the converter's file, byte for byte
    assert not (base / "models" / ".facediffuser-download").exists()
    result = generate(*args, *auto_start(comfyui_path, base))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "seed 5" in result.stderr and "fusion stage" in result.stderr and "ComfyUI stopped" in result.stderr
    assert result.stderr.count("no CUDA, MPS or XPU device found: starting ComfyUI with --cpu") == 1
    pid, port = started_pid(result.stderr), int(re.search(r"on 127\.0\.0\.1:(\d+)", result.stderr).group(1))
    assert gone(pid) and port_closed(port)
    (image,) = check_outputs(out, 1)
    assert result.stdout.split() == [str(image)]

    graph = embedded_graph(image)  # the API workflow ComfyUI wrote into the PNG, as the canvas reads it
    (load,) = nodes_of(graph, "LoadImage")
    uploaded = base / "input" / load["inputs"]["image"]
    assert uploaded.parent.name == "facediffuser" and Image.open(uploaded).size == (512, 512)  # the face crop
    assert nodes_of(graph, "FaceDiffuserSampler")[0]["inputs"]["seed"] == 5
    (server.base / "input" / "facediffuser").mkdir(exist_ok=True)
    shutil.copy(uploaded, server.base / "input" / "facediffuser" / uploaded.name)
    entry = server.run(graph)  # another ComfyUI process, which never ran it: no cache
    assert entry["status"]["status_str"] == "success", entry["status"]
    (save_id,) = [key for key, node in graph.items() if node["class_type"] == "SaveImage"]
    (again,) = entry["outputs"][save_id]["images"]
    assert np.array_equal(pixels(server.view(again)), pixels(image))
