"""The evaluation command: job planning, its graphs (built, or from the shipped templates), the job
runner (retry, servers that go away, workers that die, Ctrl-C), resume bookkeeping, CSV / markdown /
plot, and the whole command against small fake ComfyUI servers on 127.0.0.1 (tests/fake_comfy.py:
real HTTP and websocket, real scoring with tiny random models)."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
from PIL import Image

from facediffuser_core.__main__ import main as package_main
from facediffuser_core.commands.comfy_client import ComfyClient, JobError, ServerUnavailable
from facediffuser_core.errors import EvaluationError, FaceDiffuserError
from facediffuser_core.commands.evaluate import (
    score_model,
    Job,
    OutputFolder,
    Settings,
    find_subjects,
    job_graph,
    load_templates,
    main,
    plan_jobs,
    read_prompts,
    run_jobs,
)
from facediffuser_core.commands.report import CSV_FIELDS, REFERENCE_POINTS, SCORE_FIELDS, ImageScore, format_rows, parse_csv, plot_ip_pc, summary_markdown
from fake_comfy import FakeComfy
from paths import CLI, ROOT
from processes import sigint_default
from workflow_format import API_WORKFLOWS

SETTINGS = Settings(images=2, steps=3, cfg=4.5, size=64, seed=7)


# --- planning ---------------------------------------------------------------------------------


def test_plan_single_subject_prompts_use_every_subject_and_pairs_are_combinations():
    prompts = ["a man <|image|> in a park", "a man <|image|> and a woman <|image|> at a cafe"]
    jobs = plan_jobs(prompts, ["carol", "alice", "bob"], images=4, max_combinations=10)
    single = [job for job in jobs if len(job.subjects) == 1]
    pairs = [job for job in jobs if len(job.subjects) == 2]
    assert [job.subjects for job in single] == [("alice",), ("bob",), ("carol",)]
    assert [job.subjects for job in pairs] == [("alice", "bob"), ("alice", "carol"), ("bob", "carol")]
    assert len({job.id for job in jobs}) == 6 and all(job.images == 4 for job in jobs)
    assert jobs[0].image_names() == [f"{jobs[0].id}_{i}.png" for i in range(4)]
    assert plan_jobs(prompts, ["alice", "bob", "carol"], 4, 10) == jobs  # ids are stable


def test_plan_bounds_the_combinations_deterministically():
    names = [f"s{i:02d}" for i in range(15)]
    prompt = ["a man <|image|> and a man <|image|> talking"]
    jobs = plan_jobs(prompt, names, 4, max_combinations=5, seed=1)
    assert len(jobs) == 5 and len({job.subjects for job in jobs}) == 5
    assert all(a < b for a, b in (job.subjects for job in jobs))
    assert plan_jobs(prompt, names, 4, 5, seed=1) == jobs
    assert plan_jobs(prompt, names, 4, 5, seed=2) != jobs
    assert len(plan_jobs(prompt, names, 4, 200)) == 105  # 15 choose 2


def test_plan_refuses_prompts_needing_more_subjects():
    with pytest.raises(EvaluationError, match="needs 2 subjects but only 1 were found"):
        plan_jobs(["a man <|image|> and a man <|image|>"], ["alice"], 4, 10)


def test_read_prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# the paper's prompts\n\na man <|image|> reading\n  a man <|image|> and a man <|image|> talking  \n")
    assert read_prompts(path) == ["a man <|image|> reading", "a man <|image|> and a man <|image|> talking"]
    path.write_text("a man <|image|> reading\na cat on a mat\n")
    with pytest.raises(EvaluationError, match=r"prompts.txt:2: the prompt has 0 <\|image\|> markers; .* 1 to 4 subjects"):
        read_prompts(path)


def test_find_subjects(tmp_path):
    for name, photos in {"bob": ["b.jpg", "a.png"], "alice": ["1.jpeg"], "notes": []}.items():
        (tmp_path / name).mkdir()
        for photo in photos:
            (tmp_path / name / photo).write_bytes(b"")
    (tmp_path / "readme.txt").write_text("")
    with pytest.raises(EvaluationError, match="notes has no photos"):
        find_subjects(tmp_path)
    (tmp_path / "notes").rmdir()
    subjects = find_subjects(tmp_path)
    assert [(s.name, s.photo.name) for s in subjects] == [("alice", "1.jpeg"), ("bob", "a.png")]
    with pytest.raises(EvaluationError, match="no subject folders"):
        find_subjects(tmp_path / "alice")
    (tmp_path / "carol+dave").mkdir()
    with pytest.raises(EvaluationError, match=r"carol\+dave: '\+' separates subjects in the results; rename it"):
        find_subjects(tmp_path)


# --- workflows --------------------------------------------------------------------------------


def nodes_of(graph: dict, class_type: str) -> list[dict]:
    return [node for node in graph.values() if node["class_type"] == class_type]


def loaded_images(graph: dict) -> list[list[str]]:
    """Per person, in marker order, the LoadImage values of the Face-diffuser Subject chain feeding
    Subject Encode's subjects (each Subject's photo inputs in order)."""
    (encode,) = nodes_of(graph, "FaceDiffuserSubjectEncode")
    people, link = [], encode["inputs"]["subjects"]
    while link is not None:
        subject = graph[link[0]]
        assert subject["class_type"] == "FaceDiffuserSubject"
        loads = [graph[subject["inputs"][name][0]] for name in ("images", "images_2", "images_3", "images_4") if name in subject["inputs"]]
        assert all(load["class_type"] == "LoadImage" for load in loads)
        people.insert(0, [load["inputs"]["image"] for load in loads])
        link = subject["inputs"].get("previous_subjects")
    return people


def test_built_graphs_carry_the_job_and_its_settings():
    job = Job("abc_a+b+c", "a man <|image|>, a woman <|image|> and a boy <|image|> at a table", ("a", "b", "c"), 2)
    graph = job_graph(job, ["eval/a.png", "eval/b.png", "eval/c.png"], SETTINGS).nodes
    assert loaded_images(graph) == [["eval/a.png"], ["eval/b.png"], ["eval/c.png"]]  # marker order, one Subject node each
    assert "images" not in nodes_of(graph, "FaceDiffuserSubjectEncode")[0]["inputs"] and not nodes_of(graph, "ImageBatch")  # no [DEPR] node
    assert nodes_of(graph, "FaceDiffuserSubjectEncode")[0]["inputs"]["prompt"] == job.prompt
    (sampler,) = nodes_of(graph, "FaceDiffuserSampler")
    assert {k: sampler["inputs"][k] for k in ("seed", "steps", "cfg")} == {"seed": 7, "steps": 3, "cfg": 4.5}
    assert nodes_of(graph, "EmptyLatentImage")[0]["inputs"] == {"width": 64, "height": 64, "batch_size": 2}
    assert nodes_of(graph, "SaveImage")[0]["inputs"]["filename_prefix"] == "facediffuser_eval/abc_a+b+c"
    assert not nodes_of(graph, "PreviewImage")  # the mask is not needed
    (loader,) = nodes_of(graph, "FaceDiffuserLoader")
    assert (loader["inputs"]["sdm_name"], loader["inputs"]["tdm_name"]) == ("facediffuser_sdm.safetensors", "facediffuser_tdm.safetensors")
    other = job_graph(Job("x", "a man <|image|>", ("a",), 1), ["a.png"], Settings(sdm="SDM/pytorch_model.bin"))
    assert nodes_of(other.nodes, "FaceDiffuserLoader")[0]["inputs"]["sdm_name"] == "SDM/pytorch_model.bin"
    assert not nodes_of(graph, "FaceDiffuserRegions") and "masks" not in nodes_of(graph, "FaceDiffuserSubjectEncode")[0]["inputs"]


def test_layout_columns_generates_each_subject_in_its_own_region():
    job = Job("ab", "a man <|image|> and a woman <|image|> at a table", ("a", "b"), 1)
    graph = job_graph(job, ["a.png", "b.png"], replace(SETTINGS, layout="columns")).nodes
    encode = nodes_of(graph, "FaceDiffuserSubjectEncode")[0]["inputs"]
    assert graph[encode["masks"][0]] == {
        "class_type": "FaceDiffuserRegions", "_meta": {"title": "Face-diffuser Regions"},
        "inputs": {"width": 64, "height": 64, "people": 2, "layout": "columns", "boxes": "", "prompt": job.prompt},
    }  # fmt: skip


def test_layout_is_for_the_built_in_graphs(tmp_path, capsys):
    args = ["--subjects", str(tmp_path), "--prompts", str(tmp_path / "p.txt"), "--server", "127.0.0.1:1", "--out", str(tmp_path / "out")]
    assert main([*args, "--no-score", "--layout", "columns", "--workflow-dir", str(API_WORKFLOWS)]) == 2
    assert "--layout works with the built-in graphs; leave out --workflow-dir" in capsys.readouterr().err


def test_jobs_fill_the_shipped_templates():
    templates = load_templates(API_WORKFLOWS, [1, 2])
    job = Job("abc_alice+bob", "a man <|image|> and a man <|image|> playing chess", ("alice", "bob"), 2)
    graph = job_graph(job, ["eval/alice.png", "eval/bob.png"], SETTINGS, templates).nodes
    original = json.loads((API_WORKFLOWS / "facediffuser_two_subjects.json").read_text())
    assert graph["11"]["inputs"]["image"] == "eval/alice.png" and graph["12"]["inputs"]["image"] == "eval/bob.png"  # marker order
    assert graph["3"]["inputs"]["prompt"] == job.prompt
    assert {k: graph["6"]["inputs"][k] for k in ("seed", "steps", "cfg")} == {"seed": 7, "steps": 3, "cfg": 4.5}
    assert graph["5"]["inputs"] == {"width": 64, "height": 64, "batch_size": 2}
    assert graph["8"]["inputs"]["filename_prefix"] == "facediffuser_eval/abc_alice+bob"
    assert "10" not in graph  # the mask preview is not needed
    assert graph["1"] == original["1"]  # the workflow's model files
    crops = {k for k, node in original.items() if node["class_type"] == "FaceDiffuserFaceCrop"}
    assert len(crops) == 2 and not crops & set(graph)  # bypassed: evaluate uploads its own crops
    # the people: one Face-diffuser Subject node each, chained in marker order, taking the photos straight
    assert [original[k]["class_type"] for k in ("2", "15")] == ["FaceDiffuserSubject"] * 2 and graph["3"]["inputs"]["subjects"] == ["15", 0]
    assert graph["2"]["inputs"] == {"images": ["11", 0], "combine": "average"}
    assert graph["15"]["inputs"] == {"images": ["12", 0], "combine": "average", "previous_subjects": ["2", 0]}
    untouched = {k for k in original if k not in {"2", "3", "5", "6", "8", "10", "11", "12", "15"} | crops}
    assert all(graph[k] == original[k] for k in untouched)
    one = job_graph(Job("x", "a man <|image|>", ("alice",), 1), ["a.png"], Settings(sdm="SDM/pytorch_model.bin"), templates).nodes
    assert one["2"]["inputs"]["image"] == "a.png" and one["1"]["inputs"]["sdm_name"] == "SDM/pytorch_model.bin"


def test_templates_may_batch_faces_with_either_batch_images_node(tmp_path):
    """A template of an earlier release (the shipped ones chain Subject nodes now) may batch its faces into
    Subject Encode's images with ImageBatch (ComfyUI 0.3.75 and later, deprecated in 0.33) or BatchImagesNode
    (0.8): the faces in batch order either way."""
    graph = json.loads((API_WORKFLOWS / "facediffuser_two_subjects.json").read_text())
    (encode,) = [n["inputs"] for n in graph.values() if n["class_type"] == "FaceDiffuserSubjectEncode"]
    for key in [k for k, n in graph.items() if n["class_type"] == "FaceDiffuserSubject"]:
        del graph[key]
    del encode["subjects"]
    batch_id = "batch"
    encode["images"] = [batch_id, 0]
    first, second = ["12", 0], ["11", 0]  # LoadImage 12 first: the batch order decides, not the node ids
    for node in ({"class_type": "ImageBatch", "inputs": {"image1": first, "image2": second}},
                 {"class_type": "BatchImagesNode", "inputs": {"images.image1": second, "images.image0": first}}):  # fmt: skip
        graph[batch_id] = node
        (tmp_path / "facediffuser_two_subjects.json").write_text(json.dumps(graph))
        templates = load_templates(tmp_path, [2])
        filled = job_graph(Job("j", "a man <|image|> and a man <|image|>", ("a", "b"), 1), ["a.png", "b.png"], SETTINGS, templates).nodes
        assert (filled["12"]["inputs"]["image"], filled["11"]["inputs"]["image"]) == ("a.png", "b.png"), node["class_type"]


def test_templates_must_have_the_nodes_the_command_sets(tmp_path):
    for name in ("facediffuser_one_subject.json", "facediffuser_two_subjects.json"):
        graph = json.loads((API_WORKFLOWS / name).read_text())
        if name.startswith("facediffuser_one"):
            del graph["8"]  # no SaveImage
        (tmp_path / name).write_text(json.dumps(graph))
    with pytest.raises(FaceDiffuserError, match=r"facediffuser_one_subject.json: the workflow needs exactly one SaveImage node, it has 0"):
        load_templates(tmp_path, [1, 2])
    assert set(load_templates(tmp_path, [2, 2])) == {2}  # only the templates the prompts need
    with pytest.raises(EvaluationError, match="no workflow .*--workflow-dir"):
        load_templates(tmp_path / "nowhere", [1])
    with pytest.raises(EvaluationError, match="templates for 1 or 2 subjects, not 3; without --workflow-dir the graphs are built for 1 to 4"):
        load_templates(API_WORKFLOWS, [1, 3])


# --- the job runner ---------------------------------------------------------------------------


def jobs_named(*names: str) -> list[Job]:
    return [Job(name, "a man <|image|>", ("s",), 1) for name in names]


def test_runner_retries_a_failed_job_once():
    attempts: dict[str, int] = {}

    def worker(job: Job) -> str:
        attempts[job.id] = attempts.get(job.id, 0) + 1
        if job.id == "flaky" and attempts[job.id] == 1 or job.id == "broken":
            raise JobError(f"{job.id} failed")
        return job.id.upper()

    done = []
    failures = run_jobs(jobs_named("good", "flaky", "broken"), {"w": worker}, lambda job, result, name: done.append((job.id, result, name)))
    assert sorted(done) == [("flaky", "FLAKY", "w"), ("good", "GOOD", "w")]
    assert attempts == {"good": 1, "flaky": 2, "broken": 2}
    assert [(f.job.id, f.error, f.server) for f in failures] == [("broken", "JobError: broken failed", "w")]


def test_runner_spreads_jobs_over_workers_and_drops_unavailable_ones():
    seen: dict[str, list[str]] = {"a": [], "b": [], "down": []}

    def worker(name: str):
        def run(job: Job) -> str:
            if name == "down":
                seen[name].append(job.id)
                raise ServerUnavailable("down cannot be reached")
            time.sleep(0.05)
            seen[name].append(job.id)
            return name

        return run

    done = []
    failures = run_jobs(jobs_named(*"pqrstuvw"), {n: worker(n) for n in seen}, lambda job, result, name: done.append(job.id))
    assert failures == [] and sorted(done) == list("pqrstuvw")
    assert len(seen["down"]) <= 1  # the unreachable server takes at most one job, which is retried elsewhere
    assert seen["a"] and seen["b"] and sorted(seen["a"] + seen["b"]) == list("pqrstuvw")


def test_runner_fails_the_rest_when_no_server_is_left():
    def down(job: Job) -> None:
        raise ServerUnavailable("gone")

    failed = []
    failures = run_jobs(jobs_named("x", "y", "z"), {"only": down}, lambda *args: None, failed.append)
    assert failed == failures and len(failures) == 3
    errors = {f.job.id: f.error for f in failures}
    found_down = next(job for job, error in errors.items() if "failed before" in error)  # the job that found it down
    assert errors.pop(found_down) == "no ComfyUI server left to run it (it failed before: gone)"
    assert set(errors.values()) == {"no ComfyUI server left to run it"}


def test_runner_reports_an_error_after_the_job_without_retrying():
    calls = []

    def score(job: Job, result: str, name: str) -> None:
        if job.id == "bad":
            raise ValueError("cannot score")

    failures = run_jobs(jobs_named("ok", "bad"), {"w": lambda job: calls.append(job.id) or "r"}, score)
    assert sorted(calls) == ["bad", "ok"]
    assert [(f.job.id, f.error) for f in failures] == [("bad", "ValueError: cannot score")]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stop", [SystemExit(3), KeyboardInterrupt()], ids=["SystemExit", "KeyboardInterrupt"])
def test_runner_ends_when_a_worker_dies_of_a_base_exception(stop):
    """It used to wait forever on its queue for the dead worker's result."""
    started = []

    def worker(job: Job) -> str:
        started.append(job.id)
        if job.id == "dies":
            raise stop
        return job.id

    done = []
    with pytest.raises(type(stop)):
        run_jobs(jobs_named("a", "b", "dies", "c", "d"), {"w": worker}, lambda job, result, name: done.append(result))
    assert done == ["a", "b"]  # what finished stays done
    time.sleep(0.5)
    assert started == ["a", "b", "dies"]  # and nothing else is started after it


@pytest.mark.timeout(120)
def test_runner_stops_the_other_workers_when_one_dies():
    release = threading.Event()
    started = []

    def worker(name: str):
        def run(job: Job) -> str:
            started.append(job.id)
            if name == "dying":
                raise SystemExit("gone")
            release.wait(30)  # busy with its job while the other one dies
            return job.id

        return run

    with pytest.raises(SystemExit):
        run_jobs(jobs_named(*"pqrst"), {"busy": worker("busy"), "dying": worker("dying")}, lambda *args: None)
    release.set()
    time.sleep(0.5)
    assert len(started) == 2  # the busy worker finished its job and took no other


# --- results bookkeeping and reports ------------------------------------------------------------


def score_of(job: Job, index: int, ip: float = 0.5, pc: float = 0.25, per: tuple = (0.5,)) -> ImageScore:
    return ImageScore(job.id, job.image_names()[index], job.prompt, job.subjects, ip, per, 1, pc, "http://127.0.0.1:1")


def test_csv_round_trip_keeps_commas_and_quotes():
    job = Job("j", 'a man <|image|>, "smiling", at a café', ("alice", "bob"), 1)
    scores = [ImageScore("j", "j_0.png", job.prompt, job.subjects, 0.25, (0.25, 0.75), 2, -0.125, "s", (0.5, None))]
    text = format_rows(scores, header=True)
    assert parse_csv(text) == scores
    row = next(csv.DictReader(io.StringIO(text)))
    assert (row["other_per_subject"], row["separation_per_subject"]) == ("0.500000;", "-0.250000;")  # 0.25 - 0.5; no face: empty
    assert parse_csv(text + "j,j_1.png,truncated") == scores  # a torn last line (no newline) is left out


GOOD_ROW = "j,j_1.png,a man,alice+bob,2,0.5,0.5;0.25,2,0.25,s,0.125;,0.375;"
BAD_ROWS = {
    "too few fields": ("j,j_1.png,a man,alice,1,0.5,0.5,1,0.25", "it has 9 fields, a score has 12 (job, image, "),
    "too many fields": (GOOD_ROW + ",extra", "it has 13 fields, a score has 12"),
    "others disagree": (GOOD_ROW.replace("0.125;,", "0.125,"), "its other_per_subject ('0.125') does not have one value per subject ('alice+bob')"),
    "other not a number": (GOOD_ROW.replace("0.125;,", "near;,"), "its other_per_subject is 'near', not a number"),
    "not a number": (GOOD_ROW.replace(",0.5,", ",high,", 1), "its ip is 'high', not a number"),
    "not a count": (GOOD_ROW.replace(",2,0.25", ",two,0.25"), "its faces is 'two', not a whole number"),
    "negative count": (GOOD_ROW.replace(",2,0.25", ",-1,0.25"), "its faces is -1: a count of faces cannot be negative"),
    "subjects disagree": (
        GOOD_ROW.replace("0.5;0.25", "0.5"),
        "its subjects ('alice+bob'), num_subjects ('2') and ip_per_subject ('0.5') do not count the same number of subjects",
    ),
    "empty image": (GOOD_ROW.replace("j_1.png", ""), "its image is empty"),
}


@pytest.mark.parametrize("bad", BAD_ROWS)
def test_a_bad_row_before_the_last_line_is_an_error_naming_it(bad):
    row, problem = BAD_ROWS[bad]
    good = format_rows([score_of(Job("j", "p", ("s",), 3), index) for index in range(3)], header=True).splitlines(keepends=True)
    text = "".join([*good[:2], row + "\n", *good[2:]])
    with pytest.raises(EvaluationError, match=r"^out/scores.csv, line 3: " + re.escape(problem) + ".*fix that line"):
        parse_csv(text, "out/scores.csv")
    with pytest.raises(EvaluationError, match=r"^out/scores.csv, line 3: "):
        parse_csv(text + "j,j_9.png,torn", "out/scores.csv")  # a torn last line does not excuse it


def test_scores_written_before_separation_are_read_and_resume_rewrites_them(tmp_path):
    settings = Settings(images=1)
    out = OutputFolder(tmp_path, settings)
    job = Job("ab", "p", ("alice", "bob"), 1)
    old = ",".join(SCORE_FIELDS) + "\nab,ab_0.png,p,alice+bob,2,0.4,0.4;0.6,2,0.2,s\n"
    out.scores.write_text(old)
    (score,) = out.read_scores()
    assert score.ip_per_subject == (0.4, 0.6) and score.other_per_subject == (None, None) and score.separation_per_subject == (None, None)
    assert out.resume([job]) == {"ab"}
    assert out.scores.read_text() == format_rows([score], header=True)  # now in today's format, appendable
    assert out.scores.read_text().splitlines()[1].endswith(",s,;,;")


def test_another_header_is_an_error():
    with pytest.raises(EvaluationError, match=r"^s.csv, line 1: the header is 'job,image,ip', a scores file's is 'job,image,prompt,"):
        parse_csv("job,image,ip\nj,j_0.png,0.5\n", "s.csv")


def test_only_a_torn_last_line_is_left_out():
    assert parse_csv("") == [] and parse_csv("job,ima") == []  # killed while writing the header
    row = GOOD_ROW + "\n"
    header = ",".join(CSV_FIELDS) + "\n"
    assert len(parse_csv(header + row + row[:-1])) == 1  # even a torn line that would parse
    assert len(parse_csv(header + row + "\n" + row)) == 2  # a blank line holds no score


def write_rows(out: OutputFolder, jobs: Sequence[Job]) -> None:
    out.append([score_of(job, index) for job in jobs for index in range(job.images)])


def test_resume_keeps_finished_jobs_and_drops_the_rest(tmp_path):
    out = OutputFolder(tmp_path, SETTINGS)
    finished, partial, images_gone = (Job(name, "a man <|image|>", ("s",), 2) for name in ("finished", "partial", "images-gone"))
    for job in (finished, partial):
        for name in job.image_names():
            out.image_path(name).write_bytes(b"png")
    foreign = ImageScore("old", "old_0.png", "p", ("s",), 0.1, (0.1,), 1, 0.1, "s")  # a job no longer planned
    out.append([score_of(finished, 0), score_of(finished, 1), score_of(partial, 0), score_of(images_gone, 0), score_of(images_gone, 1), foreign])
    with open(out.scores, "a") as file:
        file.write("finished,finished_1.png,a man")  # a killed write: no newline
    # scored jobs stay finished even when their images were deleted: their rows are results
    assert out.resume([finished, partial, images_gone]) == {"finished", "images-gone"}
    kept = [(s.job, s.image) for s in out.read_scores()]
    assert kept == [("finished", "finished_0.png"), ("finished", "finished_1.png"), ("images-gone", "images-gone_0.png"), ("images-gone", "images-gone_1.png"), ("old", "old_0.png")]
    assert out.scores.read_text().endswith("\n")
    out.append([score_of(partial, 0)])
    assert out.read_scores()[-1] == score_of(partial, 0)


def test_a_bad_row_stops_resume_and_the_file_keeps_every_row(tmp_path):
    out = OutputFolder(tmp_path, SETTINGS)
    first, second = Job("first", "p", ("s",), 2), Job("second", "p", ("s",), 2)
    write_rows(out, [first])
    with open(out.scores, "a") as file:
        file.write(GOOD_ROW.replace(",0.5,", ",,", 1) + "\n")  # an edited row with its ip deleted
    write_rows(out, [second])
    before = out.scores.read_bytes()
    with pytest.raises(EvaluationError, match=re.escape(f"{out.scores}, line 4: its ip is '', not a number")):
        out.resume([first, second])
    assert out.scores.read_bytes() == before


def test_a_write_killed_inside_a_character_is_a_torn_line(tmp_path):
    out = OutputFolder(tmp_path, SETTINGS)
    job = Job("j", "a man <|image|> at a café", ("s",), 1)
    write_rows(out, [job])
    row = format_rows([ImageScore("k", "k_0.png", "at a café", ("s",), 0.1, (0.1,), 1, 0.1, "s")], header=False).encode()
    with open(out.scores, "ab") as file:
        file.write(row[: row.index("é".encode()) + 1])  # half of the two-byte é
    assert out.resume([job]) == {"j"}
    assert out.scores.read_bytes() == format_rows([score_of(job, 0)], header=True).encode()


def test_bytes_that_are_not_utf8_are_an_error_naming_the_line(tmp_path):
    out = OutputFolder(tmp_path, SETTINGS)
    write_rows(out, [Job("j", "p", ("s",), 2)])
    lines = out.scores.read_bytes().splitlines(keepends=True)
    out.scores.write_bytes(lines[0] + lines[1].replace(b"p", b"\xff") + lines[2])
    with pytest.raises(EvaluationError, match=re.escape(f"{out.scores}, line 2: it is not UTF-8 text (invalid start byte)")):
        out.read_scores()


def test_an_output_folder_keeps_its_settings(tmp_path):
    OutputFolder(tmp_path, SETTINGS)
    OutputFolder(tmp_path, SETTINGS)
    with pytest.raises(EvaluationError, match=r"holds an evaluation with other settings \(steps 3 -> 50\); use another --out"):
        OutputFolder(tmp_path, Settings(images=2, steps=50, cfg=4.5, size=64, seed=7))


def test_summary_means_by_hand():
    single_a, single_b = Job("a", "p1", ("alice",), 2), Job("b", "p1", ("bob",), 1)
    pair = Job("ab", "p2", ("alice", "bob"), 1)
    scores = [
        score_of(single_a, 0, ip=0.6, pc=0.20, per=(0.6,)),
        score_of(single_a, 1, ip=0.4, pc=0.30, per=(0.4,)),
        score_of(single_b, 0, ip=0.5, pc=0.25, per=(0.5,)),
        score_of(pair, 0, ip=0.0, pc=0.10, per=(-0.2, 0.7)),
    ]
    text = summary_markdown(scores)
    assert "| all | 4 | 0.3750 | 0.2125 |" in text
    assert "| single-subject | 3 | 0.5000 | 0.2500 |" in text
    assert "| multi-subject | 1 | 0.0000 | 0.1000 |" in text
    assert "| alice | 3 | 0.3333 | 0.2000 |" in text  # (0.6 + 0.4 + max(-0.2, 0)) / 3
    assert "| bob | 2 | 0.6000 | 0.1750 |" in text
    assert "FastComposer (paper, single subject): IP 0.514, PC 0.243" in text
    assert "Separation" not in text  # no face with another person scored


def test_summary_separation_by_hand():
    pair, trio = Job("ab", "p2", ("alice", "bob"), 2), Job("abc", "p3", ("alice", "bob", "carol"), 1)
    scores = [
        score_of(Job("a", "p1", ("alice",), 1), 0, per=(0.9,)),  # one person: no separation
        replace(score_of(pair, 0, per=(0.6, 0.5)), other_per_subject=(0.2, 0.1)),
        replace(score_of(pair, 1, per=(0.3, 0.0)), other_per_subject=(0.4, None)),  # bob's face missing
        replace(score_of(trio, 0, per=(0.5, 0.7, 0.2)), other_per_subject=(0.1, 0.3, 0.6)),
    ]
    text = summary_markdown(scores)
    own = {"alice": [0.6, 0.3, 0.5], "bob": [0.5, 0.7], "carol": [0.2]}
    other = {"alice": [0.2, 0.4, 0.1], "bob": [0.1, 0.3], "carol": [0.6]}
    def line(name, owns, others):
        return f"| {name} | {len(owns)} | {np.mean(owns):.4f} | {np.mean(others):.4f} | {np.mean(np.subtract(owns, others)):.4f} |"
    assert line("all", sum(own.values(), []), sum(other.values(), [])) in text
    for name in own:
        assert line(name, own[name], other[name]) in text
    assert "| all | 6 | 0.4667 | 0.2833 | 0.1833 |" in text  # the same, worked by hand


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    job = Job("a", "p", ("alice",), 2)
    plot_ip_pc([score_of(job, 0), score_of(job, 1, ip=0.7, pc=0.3)], tmp_path / "ip_pc.png")
    image = Image.open(tmp_path / "ip_pc.png")
    assert image.format == "PNG" and image.size[0] > 300
    assert REFERENCE_POINTS["FastComposer (paper, single subject)"] == (0.514, 0.243)


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    from facediffuser_core.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MissingDependencyError, match="pip install matplotlib"):
        plot_ip_pc([], tmp_path / "x.png")


def test_help_works_without_comfyui():
    result = subprocess.run([sys.executable, "-m", "facediffuser_core", "evaluate", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "--server HOST:PORT" in result.stdout, result.stderr


# --- the command against fake ComfyUI servers ---------------------------------------------------


@pytest.fixture(scope="module")
def generated_png(face_photos) -> bytes:
    """What the fake servers 'generate': a 128x128 image of man1's face."""
    buffer = io.BytesIO()
    face_photos[0].crop((400, 110, 720, 430)).resize((128, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def subjects_dir(tmp_path, face_photos) -> Path:
    for name, photo in (("alice", face_photos[0]), ("bob", face_photos[1])):
        (tmp_path / "subjects" / name).mkdir(parents=True)
        small = photo.copy()
        small.thumbnail((400, 400))
        small.save(tmp_path / "subjects" / name / "photo.jpg")
    return tmp_path / "subjects"


PROMPTS = """# single subject
a photo of a man <|image|> in a park
a man <|image|> and a man <|image|> playing chess, flaky
a man <|image|> on a beach, broken
"""


def run_command(out: Path, subjects: Path, prompts: Path, servers: list[FakeComfy], facenet_file: Path, clip_folder: Path) -> int:
    args = ["--subjects", str(subjects), "--prompts", str(prompts), "--out", str(out), "--facenet", str(facenet_file), "--clip", str(clip_folder)]
    args += ["--images-per-prompt", "2", "--steps", "3", "--cfg", "4.5", "--size", "64", "--seed", "7", "--device", "cpu"]
    for server in servers:
        args += ["--server", server.address]
    return main(args)


def test_command_end_to_end_with_retry_failures_and_resume(tmp_path, subjects_dir, generated_png, facenet_file, tiny_clip_folder, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    out = tmp_path / "out"
    servers = [FakeComfy(generated_png, {"flaky": 1, "broken": 99}), FakeComfy(generated_png, {})]
    servers[1].fail, servers[1].lock = servers[0].fail, servers[0].lock  # one failure budget for both servers

    assert run_command(out, subjects_dir, prompts, servers, facenet_file, tiny_clip_folder) == 1
    report = capsys.readouterr()
    queued = [graph for server in servers for graph in server.queued]
    assert all(server.queued for server in servers)  # both servers got jobs
    prompts_queued = [next(n["inputs"]["prompt"] for n in g.values() if n["class_type"] == "FaceDiffuserSubjectEncode") for g in queued]
    assert sum("flaky" in p for p in prompts_queued) == 2  # failed once, retried once
    assert sum("broken" in p for p in prompts_queued) == 4  # two jobs, each tried twice
    assert sum("park" in p for p in prompts_queued) == 2

    jobs = plan_jobs(read_prompts(prompts), ["alice", "bob"], 2, 10)
    good = [job for job in jobs if "broken" not in job.prompt]
    scores = OutputFolder(out, Settings(images=2, steps=3, cfg=4.5, size=64, seed=7)).read_scores()
    assert sorted((s.job, s.image) for s in scores) == sorted((job.id, name) for job in good for name in job.image_names())
    assert all((out / "images" / s.image).read_bytes() == generated_png for s in scores)
    with open(out / "failures.csv", newline="") as file:
        failed = list(csv.DictReader(file))
    assert sorted(row["job"] for row in failed) == sorted(job.id for job in jobs if "broken" in job.prompt)
    assert all("FaceDiffuserSampler (node 7, 'Face-diffuser Sampler'): fake failure (broken)" in row["error"] for row in failed)
    assert "2 job(s) failed" in report.err and "fake failure (broken)" in report.err

    pair = next(g for g in queued if "flaky" in json.dumps(g))
    uploads = {name for server in servers for _, name in server.uploads}
    (alice,), (bob,) = loaded_images(pair)
    assert alice.startswith("facediffuser_eval/alice_") and bob.startswith("facediffuser_eval/bob_")
    assert {alice.split("/")[1], bob.split("/")[1]} <= uploads
    assert nodes_of(pair, "EmptyLatentImage")[0]["inputs"] == {"width": 64, "height": 64, "batch_size": 2}
    assert nodes_of(pair, "FaceDiffuserSampler")[0]["inputs"]["steps"] == 3

    summary = (out / "summary.md").read_text()
    assert "| single-subject | 4 |" in summary and "| multi-subject | 2 |" in summary and summary in report.out
    assert Image.open(out / "ip_pc.png").format == "PNG"

    # the scores themselves: recomputed here from the downloaded image with the core functions
    from facediffuser_core.faces.consistency import load_clip, prompt_consistency
    from facediffuser_core.faces.detection import load_detector, pil_to_image
    from facediffuser_core.faces.identity import load_facenet, reference_embeddings, score_identity

    row = next(s for s in scores if s.subjects == ("alice", "bob"))
    image = Image.open(out / "images" / row.image).convert("RGB")
    clip = load_clip(tiny_clip_folder)
    assert row.pc == pytest.approx(float(prompt_consistency(clip.model, clip.tokenizer, pil_to_image([image]), row.prompt)[0]), abs=1e-5)
    facenet, detector = load_facenet(facenet_file), load_detector("cpu")
    references = reference_embeddings(facenet, detector, [Image.open(subjects_dir / n / "photo.jpg").convert("RGB") for n in row.subjects])
    identity = score_identity(facenet, detector, references, image)
    assert row.ip == pytest.approx(identity.score, abs=1e-5) and row.faces == len(identity.faces) == 1
    assert row.ip_per_subject == pytest.approx([m.similarity for m in identity.matches], abs=1e-5)
    assert min(row.ip_per_subject) == 0.0  # one face for two subjects
    # its separation, in float64 from the embeddings: the face's cosine to its own person minus to the other one
    from facediffuser_core.faces.detection import detect
    from facediffuser_core.faces.identity import embed_faces, face_tensors

    face = embed_faces(facenet, face_tensors(detector, image, detect(detector, image)[:1]))[0].double().numpy()
    refs = references.double().numpy()
    cosines = refs @ face / (np.linalg.norm(refs, axis=1) * np.linalg.norm(face))
    own = int(np.argmax(cosines))  # one face: it is matched to the person it is nearest to
    assert row.other_per_subject[1 - own] is None and row.other_per_subject[own] == pytest.approx(cosines[1 - own], abs=1e-5)
    assert row.separation_per_subject[own] == pytest.approx(cosines[own] - cosines[1 - own], abs=1e-5)
    means = f"| {cosines[own]:.4f} | {cosines[1 - own]:.4f} | {cosines[own] - cosines[1 - own]:.4f} |"  # every pair image is the same picture
    assert "Separation" in summary and any(line.startswith("| all | ") and line.endswith(means) for line in summary.splitlines())

    # resume: finished jobs are not queued again, the failed ones are retried
    before = {server.address: len(server.queued) for server in servers}
    rows_before = (out / "scores.csv").read_text()
    assert run_command(out, subjects_dir, prompts, servers, facenet_file, tiny_clip_folder) == 1
    new = [g for server in servers for g in server.queued[before[server.address] :]]
    assert len(new) == 4 and all("broken" in json.dumps(g) for g in new)
    assert (out / "scores.csv").read_text() == rows_before

    servers[0].fail["broken"] = 0  # fixed: the third run completes everything
    assert run_command(out, subjects_dir, prompts, servers, facenet_file, tiny_clip_folder) == 0
    scores = OutputFolder(out, Settings(images=2, steps=3, cfg=4.5, size=64, seed=7)).read_scores()
    assert len(scores) == 2 * len(jobs) and len({(s.job, s.image) for s in scores}) == len(scores)
    assert (out / "failures.csv").read_text().strip() == "job,prompt,subjects,server,error"
    for server in servers:
        server.shutdown()


def test_images_downloaded_before_a_kill_are_scored_without_generating(tmp_path, subjects_dir, generated_png, facenet_file, tiny_clip_folder):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a man <|image|> in a park\n")
    out = tmp_path / "out"
    out_folder = OutputFolder(out, Settings(images=2, steps=3, cfg=4.5, size=64, seed=7))
    (job, _) = plan_jobs(read_prompts(prompts), ["alice", "bob"], 2, 10)
    for name in job.image_names():
        out_folder.image_path(name).write_bytes(generated_png)
    server = FakeComfy(generated_png, {})
    assert run_command(out, subjects_dir, prompts, [server], facenet_file, tiny_clip_folder) == 0
    assert len(server.queued) == 1 and "bob" in json.dumps(server.queued[0])  # only the other subject's job
    assert {s.job for s in out_folder.read_scores()} == {job.id, job.id.replace("alice", "bob")}
    server.shutdown()


def test_evaluate_is_a_subcommand_with_the_modules_options(capsys):
    with pytest.raises(SystemExit):
        package_main(["--help"])
    assert "{generate,download,convert,evaluate}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        package_main(["evaluate", "--help"])
    subcommand = capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    module = capsys.readouterr().out
    assert subcommand.split("options:")[1] == module.split("options:")[1]  # every option, as the module entry has it


def test_no_score_only_generates_and_a_later_run_scores(tmp_path, subjects_dir, generated_png, facenet_file, tiny_clip_folder):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a man <|image|> in a park\n")
    out = tmp_path / "out"
    server = FakeComfy(generated_png, {})
    common = ["--subjects", str(subjects_dir), "--prompts", str(prompts), "--out", str(out), "--server", server.address]
    common += ["--images-per-prompt", "2", "--steps", "3", "--cfg", "4.5", "--size", "64", "--seed", "7", "--device", "cpu"]
    assert main([*common, "--no-score"]) == 0
    assert len(server.queued) == 2 and len(list((out / "images").glob("*.png"))) == 4
    assert not (out / "scores.csv").exists() and not (out / "summary.md").exists()
    assert main([*common, "--no-score"]) == 0 and len(server.queued) == 2  # nothing left to generate
    # the same command as a subcommand of python -m facediffuser_core (and the facediffuser script)
    assert package_main(["evaluate", *common, "--facenet", str(facenet_file), "--clip", str(tiny_clip_folder)]) == 0
    assert len(server.queued) == 2  # scored from the images on disk
    assert len(OutputFolder(out, SETTINGS).read_scores()) == 4 and (out / "summary.md").is_file()
    server.shutdown()


@pytest.mark.timeout(900)
def test_ctrl_c_keeps_finished_jobs_cancels_the_running_one_and_says_how_to_resume(tmp_path, subjects_dir, generated_png):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a man <|image|> in a park\na man <|image|> waiting, hang\n")
    out = tmp_path / "out"
    server = FakeComfy(generated_png)
    args = ["--subjects", str(subjects_dir), "--prompts", str(prompts), "--out", str(out), "--server", server.address, "--no-score", "--images-per-prompt", "2", "--size", "64"]
    command = subprocess.Popen(
        [sys.executable, "-m", "facediffuser_core", "evaluate", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default
    )
    deadline = time.monotonic() + 600
    while not any("hang" in json.dumps(graph) for graph in server.queued) and command.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert command.poll() is None, command.communicate()
    hung = f"p{len(server.queued) - 1}-{server.server_address[1]}"  # its prompt id
    command.send_signal(signal.SIGINT)
    _, err = command.communicate(timeout=60)
    assert command.returncode == 130, err
    assert f"stopped (KeyboardInterrupt): every finished job is kept in {out}; run the same command again to resume" in err
    assert ("/queue", {"delete": [hung]}) in server.cancelled and ("/interrupt", {"prompt_id": hung}) in server.cancelled

    jobs = plan_jobs(read_prompts(prompts), ["alice", "bob"], 2, 10)
    park = [job for job in jobs if "park" in job.prompt]
    assert all((out / "images" / name).read_bytes() == generated_png for job in park for name in job.image_names())
    server.hang = False
    queued_before = len(server.queued)
    assert main(args) == 0  # the resumed run does the rest only
    assert len(server.queued) == queued_before + 2 and all("hang" in json.dumps(graph) for graph in server.queued[queued_before:])
    assert all((out / "images" / name).is_file() for job in jobs for name in job.image_names())
    server.shutdown()


def test_missing_score_models_are_named_with_the_download_command_and_found_where_it_puts_them(
    tmp_path, subjects_dir, generated_png, facenet_file, tiny_clip_folder, capsys, monkeypatch
):
    comfyui = tmp_path / "ComfyUI"
    (comfyui / "comfy").mkdir(parents=True)
    (comfyui / "main.py").write_text("")
    monkeypatch.setenv("COMFYUI_PATH", str(comfyui))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a man <|image|> in a park\n")
    server = FakeComfy(generated_png, {})
    args = ["--subjects", str(subjects_dir), "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--server", server.address]
    args += ["--images-per-prompt", "1", "--steps", "3", "--size", "64", "--device", "cpu"]
    models = comfyui / "models"
    assert main(args) == 2
    assert (
        f"error: scoring needs 20180402-114759-vggface2.pt, which is not in {models / 'facenet'}: download it with "
        f"`{CLI} download --facenet --comfyui {comfyui}`, or give --facenet PATH (or --no-score to only generate)"
    ) in capsys.readouterr().err
    (models / "facenet").mkdir(parents=True)
    shutil.copy(facenet_file, models / "facenet" / "20180402-114759-vggface2.pt")  # where download --scores puts them
    assert main(args) == 2
    assert f"error: scoring needs clip-vit-large-patch14/model.safetensors, which is not in {models / 'clip_eval'}: download it with " in capsys.readouterr().err
    shutil.copytree(tiny_clip_folder, models / "clip_eval" / "clip-vit-large-patch14")
    assert main(args) == 0, capsys.readouterr().err
    assert len(parse_csv((tmp_path / "out" / "scores.csv").read_text())) == 2 and server.queued  # one job per subject, generated and scored with the found models
    server.shutdown()


def test_a_server_without_the_models_takes_no_jobs_and_says_which_file_is_missing(tmp_path, subjects_dir, generated_png, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a man <|image|> in a park\n")
    bare, ready = FakeComfy(generated_png, {}), FakeComfy(generated_png, {})
    bare.models = ["facediffuser_tdm.safetensors"]

    def evaluate(out: str, *servers: FakeComfy) -> int:
        args = ["--subjects", str(subjects_dir), "--prompts", str(prompts), "--out", str(tmp_path / out), "--no-score"]
        args += ["--images-per-prompt", "1", "--steps", "3", "--size", "64"]
        return main(args + [option for server in servers for option in ("--server", server.address)])

    assert evaluate("out", bare, ready) == 0, capsys.readouterr().err
    assert bare.queued == [] and len(ready.queued) == 2  # the bare server's job went to the other one
    ready.shutdown()
    bare.models = []
    assert evaluate("alone", bare) == 1
    err = capsys.readouterr().err
    assert f"http://{bare.address} has no facediffuser_sdm.safetensors or facediffuser_tdm.safetensors in its models/facediffuser (0 file(s) there)" in err
    assert "`python -m facediffuser_core download` in the pack's folder downloads the official models" in err and bare.queued == []
    bare.shutdown()


def test_a_score_model_path_that_does_not_exist_names_the_download(tmp_path):
    with pytest.raises(EvaluationError, match=rf"--clip .*nope: no such file or folder; `{re.escape(CLI)} download --scores` downloads"):
        score_model(tmp_path / "nope", "clip_eval", "clip-vit-large-patch14/model.safetensors", "clip", None)
    with pytest.raises(EvaluationError, match=rf"no ComfyUI was found to look in: download it with `{re.escape(CLI)} download --facenet --comfyui /path/to/ComfyUI`"):
        score_model(None, "facenet", "20180402-114759-vggface2.pt", "facenet", None)


def test_command_stops_on_a_bad_row_and_keeps_the_scores(tmp_path, subjects_dir, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a man <|image|>\n")
    out = tmp_path / "out"
    folder = OutputFolder(out, SETTINGS)
    (alice, bob) = plan_jobs(read_prompts(prompts), ["alice", "bob"], 2, 10)
    write_rows(folder, [alice])
    with open(folder.scores, "a") as file:
        file.write("j,j_1.png,a man,alice,1,0.5,0.5,1.5,0.25,s,,\n")  # faces: 1.5
    write_rows(folder, [bob])
    before = folder.scores.read_bytes()
    args = ["--subjects", str(subjects_dir), "--prompts", str(prompts), "--out", str(out), "--server", "127.0.0.1:1", "--no-score"]
    args += ["--images-per-prompt", "2", "--steps", "3", "--cfg", "4.5", "--size", "64", "--seed", "7"]
    assert main(args) == 2
    assert f"error: {folder.scores}, line 4: its faces is '1.5', not a whole number" in capsys.readouterr().err
    assert folder.scores.read_bytes() == before


def test_client_reports_an_unreachable_server():
    with pytest.raises(ServerUnavailable, match=r"http://127.0.0.1:1 cannot be reached"):
        ComfyClient("127.0.0.1:1", timeout=5).check()
