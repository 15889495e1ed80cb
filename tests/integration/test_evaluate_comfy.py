"""The face nodes and the evaluation command against a real ComfyUI server (--cpu, random SD1.5-sized
models, tiny random scoring models: the numbers are meaningless, the pipeline is real), including a
run killed after its first finished job and resumed, and a run on the shipped API workflows."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from facediffuser_core.commands.evaluate import OutputFolder, Settings, plan_jobs, read_prompts
from harness import ComfyServer, status_message
from models import CLIP, FACENET
from paths import FACES, ROOT

NODES = ["FaceDiffuserFaceCrop", "FaceDiffuserIdentityScore", "FaceDiffuserPromptConsistency"]
SETTINGS = Settings(images=1, steps=2, cfg=5.0, size=64, seed=0)
PROMPTS = "a photo of a man <|image|> in a park\na man <|image|> and a man <|image|> playing chess\n"


def test_face_nodes_register_with_their_model_folders(server):
    info = server.get("/object_info")
    for name in NODES:
        node = info[name]
        assert node["category"] == "Face-diffuser" and node["description"] and node["display_name"].startswith("Face-diffuser ")
        assert all(spec[1].get("tooltip") for spec in node["input"]["required"].values()), name
        assert len(node["output_tooltips"]) == len(node["output"]) and all(node["output_tooltips"])
    assert info["FaceDiffuserIdentityScore"]["output_is_list"] == [True, False, False]
    assert info["FaceDiffuserPromptConsistency"]["output_is_list"] == [True, False]
    assert info["FaceDiffuserIdentityScore"]["input"]["required"]["facenet_name"][1]["options"] == [FACENET]
    assert info["FaceDiffuserPromptConsistency"]["input"]["required"]["clip_name"][1]["options"] == [CLIP]


def face_graph(photo: str, if_no_face: str = "error") -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": photo}},
        "2": {"class_type": "FaceDiffuserFaceCrop", "inputs": {"images": ["1", 0], "face_index": 0, "margin": 0.5, "size": 256, "if_no_face": if_no_face}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
        "4": {"class_type": "FaceDiffuserIdentityScore", "inputs": {"images": ["2", 0], "references": ["1", 0], "facenet_name": FACENET}},
        "5": {"class_type": "FaceDiffuserPromptConsistency", "inputs": {"images": ["2", 0], "prompt": "a man <|image|> in a suit", "clip_name": CLIP}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["2", 2]}},
    }


def test_face_nodes_run_in_a_workflow(server):
    entry = server.run(face_graph("face_1.png"))
    assert entry["status"]["status_str"] == "success", status_message(entry, "execution_error")
    (crop,) = entry["outputs"]["3"]["images"]
    assert Image.open(io.BytesIO(server.view(crop))).size == (256, 256)
    (preview,) = entry["outputs"]["6"]["images"]
    assert Image.open(io.BytesIO(server.view(preview))).size == Image.open(FACES / "man1.jpeg").size
    (identity,) = entry["outputs"]["4"]["text"]
    assert identity.startswith("image 1: IP ") and "(face 1)" in identity and "mean IP of 1 image(s)" in identity
    (consistency,) = entry["outputs"]["5"]["text"]
    assert consistency.startswith("image 1: PC ") and 'for "a man in a suit"' in consistency


def test_a_photo_without_a_face(server):
    entry = server.run(face_graph("blank.png"))
    error = status_message(entry, "execution_error")
    assert entry["status"]["status_str"] == "error" and error["node_type"] == "FaceDiffuserFaceCrop"
    assert "Face-diffuser Face Crop: no face was found in image 1 of 1 (batch index 0)" in error["exception_message"]
    graph = face_graph("blank.png", "pass through")
    del graph["4"]  # the blank reference has no face for the identity score
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "success", status_message(entry, "execution_error")


def queued_jobs(server: ComfyServer) -> list[str]:
    """The job id of every evaluation prompt the server has run (from its SaveImage prefix)."""
    ids = []
    for entry in server.get("/history").values():
        for node in entry["prompt"][2].values():
            prefix = node["inputs"].get("filename_prefix", "") if node["class_type"] == "SaveImage" else ""
            if prefix.startswith("facediffuser_eval/"):
                ids.append(prefix.split("/", 1)[1])
    return ids


def test_evaluation_command_killed_and_resumed(server, facenet_file, tiny_clip_folder, tmp_path):
    subjects = tmp_path / "subjects"
    for name, photo in (("alice", "man1.jpeg"), ("bob", "man2.jpeg")):
        (subjects / name).mkdir(parents=True)
        (subjects / name / photo).write_bytes((FACES / photo).read_bytes())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "facediffuser_core", "evaluate", "--subjects", str(subjects), "--prompts", str(prompts),
        "--server", f"127.0.0.1:{server.port}", "--out", str(out), "--facenet", str(facenet_file), "--clip", str(tiny_clip_folder),
        "--images-per-prompt", "1", "--steps", "2", "--size", "64", "--device", "cpu",
    ]  # fmt: skip
    jobs = plan_jobs(read_prompts(prompts), ["alice", "bob"], 1, 10)
    assert len(jobs) == 3

    log = open(tmp_path / "first.log", "wb")
    first = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    finished: list = []
    while not finished and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.2)
        if (out / "scores.csv").is_file():
            finished = OutputFolder(out, SETTINGS).read_scores()
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    log.close()
    assert finished, (tmp_path / "first.log").read_text(errors="replace")[-3000:]
    done_first = {score.job for score in finished}
    assert len(done_first) < 3, "the run finished before it could be killed"
    images = {s.image: (out / "images" / s.image).stat() for s in finished}

    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    scores = OutputFolder(out, SETTINGS).read_scores()
    assert sorted(s.job for s in scores) == sorted(job.id for job in jobs)  # one row per image, none twice
    for name, stat in images.items():  # finished before the kill: untouched
        now = (out / "images" / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    runs = queued_jobs(server)
    for job in jobs:  # a job finished before the kill was queued once, by the first run only
        assert runs.count(job.id) == 1 if job.id in done_first else runs.count(job.id) >= 1, (job.id, runs)
    for score in scores:
        assert Image.open(out / "images" / score.image).size == (64, 64)
        assert math.isfinite(score.pc) and -1 <= score.pc <= 1 and 0 <= score.ip <= 1
        assert len(score.ip_per_subject) == len(score.subjects)
    summary = (out / "summary.md").read_text()
    assert "| all | 3 |" in summary and "| single-subject | 2 |" in summary and "| multi-subject | 1 |" in summary
    assert Image.open(out / "ip_pc.png").format == "PNG"
    assert (out / "failures.csv").read_text().strip() == "job,prompt,subjects,server,error"
    assert json.loads((out / "settings.json").read_text())["steps"] == 2
    uploaded = {p.name.split("_")[0] for p in (server.base / "input" / "facediffuser_eval").iterdir()}
    assert uploaded == {"alice", "bob"}


def test_evaluation_with_the_shipped_workflows(server, tmp_path):
    (tmp_path / "subjects" / "carol").mkdir(parents=True)
    (tmp_path / "subjects" / "carol" / "photo.jpeg").write_bytes((FACES / "man2.jpeg").read_bytes())
    (tmp_path / "prompts.txt").write_text("a man <|image|> on a bench\n")
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "facediffuser_core", "evaluate", "--subjects", str(tmp_path / "subjects"), "--prompts", str(tmp_path / "prompts.txt"),
        "--server", f"127.0.0.1:{server.port}", "--out", str(out), "--workflow-dir", str(ROOT / "workflows" / "api"),
        "--no-score", "--images-per-prompt", "1", "--steps", "2", "--size", "64",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (job,) = plan_jobs(read_prompts(tmp_path / "prompts.txt"), ["carol"], 1, 10)
    assert Image.open(out / "images" / job.image_names()[0]).size == (64, 64)
    template = json.loads((ROOT / "workflows" / "api" / "facediffuser_one_subject.json").read_text())
    (graph,) = [entry["prompt"][2] for entry in server.get("/history").values() if job.id in json.dumps(entry["prompt"][2])]
    crops = {key for key, node in template.items() if node["class_type"] == "FaceDiffuserFaceCrop"}
    assert crops and set(graph) == set(template) - {"10"} - crops  # the template's nodes, its mask preview dropped, its Face Crop bypassed (evaluate uploads crops)
    assert graph["2"]["inputs"]["image"].startswith("facediffuser_eval/carol_") and graph["8"]["inputs"]["filename_prefix"] == f"facediffuser_eval/{job.id}"
