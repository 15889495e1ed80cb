"""``python -m facediffuser_core evaluate``: generate with Face-diffuser on ComfyUI servers and score
Identity Preservation (IP) and Prompt Consistency (PC) as the paper does (FastComposer's protocol).

Each prompt with k ``<|image|>`` markers is run with k distinct subjects: every subject for
single-subject prompts, subject combinations (at most ``--max-combinations``) for multi-subject ones.
A job (one prompt with its subjects, 1 to 4) queues the Face-diffuser graph (built in code, or a
``--workflow-dir`` template) with the subjects' reference photos through ComfyUI's HTTP API, on
whichever ``--server`` is free, and downloads its images.
The output folder holds ``images/``, ``scores.csv`` (one row per image, appended as jobs finish; with
several subjects, each face's separation: its similarity to its own person minus to the best other one),
``failures.csv``, ``summary.md`` (means) and ``ip_pc.png``. Running the command again on the same
folder skips finished jobs; a failed job is retried once; Ctrl-C keeps what has finished.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import io
import itertools
import json
import os
import queue
import random
import re
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, TypeVar

import torch
from PIL import Image
from tqdm import tqdm

from ..errors import EvaluationError, FaceDiffuserError, FaceNotFoundError
from ..faces.detection import DEFAULT_MARGIN, load_detector, open_photo, pil_to_image, reference_png
from ..faces.identity import FACENET_WEIGHTS, load_facenet, reference_embeddings, score_identity
from ..method.prompt import MARKER, MAX_SUBJECTS
from ..method.regions import WHOLE_LAYOUTS
from ..weights.model_folders import CLIP_EVAL_FOLDER, FACENET_FOLDER, comfyui_model_folders, download_command_line, find_model
from .comfy_client import DEFAULT_SDM, DEFAULT_TDM, ComfyClient, Generation, JobError, JobGraph, ServerUnavailable, build_graph, fill_template
from .comfy_launch import find_comfyui
from .download import DEFAULT_CLIP_EVAL
from .report import SUBJECT_SEPARATOR, ImageScore, format_rows, parse_csv, plot_ip_pc, summary_markdown, unreadable_line

__all__ = [
    "TEMPLATES",
    "Subject",
    "Job",
    "Settings",
    "Failure",
    "find_subjects",
    "read_prompts",
    "plan_jobs",
    "load_templates",
    "job_graph",
    "run_jobs",
    "OutputFolder",
    "main",
]

TEMPLATES = {1: "facediffuser_one_subject.json", 2: "facediffuser_two_subjects.json"}  # --workflow-dir files by subject count
PHOTO_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
UPLOAD_FOLDER = "facediffuser_eval"  # in ComfyUI's input/ (reference photos) and output/ (images)
Result = TypeVar("Result")


@dataclass(frozen=True)
class Subject:
    """A subject folder: its name and its reference photo (the first photo by file name)."""

    name: str
    photo: Path


@dataclass(frozen=True)
class Job:
    """One prompt with its subjects (in marker order); ``id`` is stable across runs."""

    id: str
    prompt: str
    subjects: tuple[str, ...]
    images: int

    def image_names(self) -> list[str]:
        return [f"{self.id}_{index}.png" for index in range(self.images)]


@dataclass(frozen=True)
class Settings:
    """Everything that changes the generated images; an output folder keeps one set."""

    images: int = 4
    steps: int = 50
    cfg: float = 5.0
    size: int = 512
    seed: int = 0
    sdm: Optional[str] = None  # model file names on the servers; None keeps the workflow's
    tdm: Optional[str] = None
    crop_margin: Optional[float] = DEFAULT_MARGIN  # None: upload the photos uncropped
    layout: Optional[str] = None  # "columns": each subject in a region of its own, side by side in marker order


@dataclass(frozen=True)
class Failure:
    job: Job
    error: str
    server: str


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "subject"


def find_subjects(folder: Path) -> list[Subject]:
    """One subject per sub-folder of ``folder`` that holds photos, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(f"--subjects {folder} is not a folder; give a folder with one folder of photos per subject")
    subjects = []
    for directory in sorted(p for p in folder.iterdir() if p.is_dir()):
        photos = sorted(p for p in directory.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
        if SUBJECT_SEPARATOR in directory.name:
            raise EvaluationError(f"subject folder {directory}: '{SUBJECT_SEPARATOR}' separates subjects in the results; rename it")
        if not photos:
            raise EvaluationError(f"subject folder {directory} has no photos ({', '.join(sorted(PHOTO_SUFFIXES))})")
        subjects.append(Subject(directory.name, photos[0]))
    if not subjects:
        raise EvaluationError(f"--subjects {folder} has no subject folders; put each subject's photos in a folder of its own")
    slugs = [_slug(s.name) for s in subjects]
    clash = next((name for name in slugs if slugs.count(name) > 1), None)
    if clash:
        raise EvaluationError(f"two subject folders map to the name '{clash}'; rename one (letters, digits, _ . -)")
    return subjects


def read_prompts(path: Path) -> list[str]:
    """The prompts of a text file, one per line; blank lines and lines starting with # are skipped.
    Each needs 1 to 4 ``<|image|>`` markers."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"--prompts {path}: no such file")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        prompt = line.strip()
        if not prompt or prompt.startswith("#"):
            continue
        count = prompt.count(MARKER)
        if not 1 <= count <= MAX_SUBJECTS:
            raise EvaluationError(
                f"{path}:{number}: the prompt has {count} {MARKER} markers; the evaluation runs prompts with "
                f"1 to {MAX_SUBJECTS} subjects, e.g. 'a man {MARKER} reading a book'"
            )
        prompts.append(prompt)
    if not prompts:
        raise EvaluationError(f"--prompts {path} has no prompts")
    return prompts


def plan_jobs(prompts: Sequence[str], subjects: Sequence[str], images: int, max_combinations: int, seed: int = 0) -> list[Job]:
    """A job per prompt and subject group: every subject for one-marker prompts; for k markers, the
    combinations of k subjects (in name order), a deterministic sample of ``max_combinations`` if more."""
    jobs: dict[str, Job] = {}
    names = sorted(subjects)
    for prompt in prompts:
        count = prompt.count(MARKER)
        if count > len(names):
            raise EvaluationError(f"the prompt '{prompt}' needs {count} subjects but only {len(names)} were found")
        groups = list(itertools.combinations(names, count))
        if count > 1 and len(groups) > max_combinations:
            groups = sorted(random.Random(f"{seed}:{prompt}").sample(groups, max_combinations))
        digest = hashlib.sha1(prompt.encode()).hexdigest()[:8]
        for group in groups:
            job = Job(f"{digest}_{SUBJECT_SEPARATOR.join(_slug(name) for name in group)}", prompt, group, images)
            jobs.setdefault(job.id, job)
    return list(jobs.values())


def load_templates(folder: Path, counts: Sequence[int]) -> dict[int, dict]:
    """``--workflow-dir``: the API workflows for the subject counts the prompts use (files named as in
    :data:`TEMPLATES`), each checked by filling it once."""
    templates = {}
    for count in sorted(set(counts)):
        if count not in TEMPLATES:
            raise EvaluationError(
                f"--workflow-dir has templates for {' or '.join(map(str, TEMPLATES))} subjects, not {count}; "
                "without --workflow-dir the graphs are built for 1 to 4 subjects"
            )
        path = Path(folder) / TEMPLATES[count]
        if not path.is_file():
            raise EvaluationError(f"no workflow {path}; point --workflow-dir at a folder with {TEMPLATES[count]}")
        templates[count] = json.loads(path.read_text())
        job_graph(Job("probe", "", ("s",) * count, 1), ["x.png"] * count, Settings(), templates, str(path))
    return templates


def job_graph(job: Job, faces: Sequence[str], settings: Settings, templates: Optional[Mapping[int, dict]] = None, source: str = "") -> JobGraph:
    """The job's graph: built in code, or filled into ``templates[subject count]``; faces are the
    uploaded photos in marker order, images are saved under ``facediffuser_eval/<job id>``."""
    generation = Generation(
        job.prompt, tuple((face,) for face in faces), seed=settings.seed, steps=settings.steps, cfg=settings.cfg, width=settings.size,
        height=settings.size, batch=settings.images, sdm=settings.sdm, tdm=settings.tdm,
        filename_prefix=f"{UPLOAD_FOLDER}/{job.id}", subject_mask=False, layout=settings.layout,
    )  # fmt: skip
    if templates is None:
        return build_graph(generation)
    return fill_template(templates[len(faces)], generation, source or TEMPLATES[len(faces)])


def run_jobs(
    jobs: Sequence[Job],
    workers: Mapping[str, Callable[[Job], Result]],
    on_done: Callable[[Job, Result, str], None],
    on_failure: Callable[[Failure], None] = lambda failure: None,
    retries: int = 1,
) -> list[Failure]:
    """Run every job on one of ``workers`` (name -> function, one thread each, each taking the next
    job when free) and call ``on_done(job, result, worker)`` in this thread as results arrive.

    A job that raises is queued again, ``retries`` times. A worker that raises
    :class:`ServerUnavailable` takes no more jobs; when none is left, the remaining jobs fail.
    An error in ``on_done`` fails the job without a retry. Returns the failures.

    A worker that dies of a BaseException (SystemExit, KeyboardInterrupt) ends the run: it is
    raised here, as is Ctrl-C in this thread; the other workers take no further job, and results
    already passed to ``on_done`` stay done.
    """
    todo: queue.Queue = queue.Queue()
    results: queue.Queue = queue.Queue()
    stopping = threading.Event()
    for job in jobs:
        todo.put((job, 0))

    def work(name: str, function: Callable[[Job], Result]) -> None:
        try:
            while (item := todo.get()) is not None and not stopping.is_set():
                job, attempt = item
                try:
                    results.put(("done", job, attempt, function(job), name))
                except ServerUnavailable as error:
                    results.put(("failed", job, attempt, str(error), name))
                    results.put(("retired", None, 0, str(error), name))
                    return
                except Exception as error:  # a failed job must not stop the others
                    results.put(("failed", job, attempt, f"{type(error).__name__}: {error}", name))
        except BaseException as error:  # the main loop must hear of it, or it waits forever
            results.put(("stopped", None, 0, error, name))

    threads = [threading.Thread(target=work, args=item, daemon=True, name=f"server {item[0]}") for item in workers.items()]
    for thread in threads:
        thread.start()
    failures: list[Failure] = []
    errors: dict[str, str] = {}  # job id -> its last error, for jobs waiting for a retry

    def fail(failure: Failure) -> None:
        failures.append(failure)
        on_failure(failure)

    outstanding, live = len(jobs), len(threads)
    try:
        while outstanding and live:
            kind, job, attempt, payload, name = results.get()
            if kind == "stopped":
                raise payload
            if kind == "retired":
                live -= 1
            elif kind == "done":
                outstanding -= 1
                try:
                    on_done(job, payload, name)
                except Exception as error:  # e.g. scoring: its failure must not lose the other results
                    fail(Failure(job, f"{type(error).__name__}: {error}", name))
            elif attempt < retries:
                errors[job.id] = payload
                todo.put((job, attempt + 1))
            else:
                outstanding -= 1
                fail(Failure(job, payload, name))
        while outstanding:  # every worker retired: nothing can run the rest
            job, _ = todo.get_nowait()
            outstanding -= 1
            earlier = f" (it failed before: {errors[job.id]})" if job.id in errors else ""
            fail(Failure(job, f"no ComfyUI server left to run it{earlier}", ""))
    finally:
        stopping.set()
        for _ in threads:
            todo.put(None)
    return failures


class OutputFolder:
    """``out/``: ``images/<job>_<i>.png``, ``scores.csv``, ``failures.csv``, ``summary.md``,
    ``ip_pc.png`` and ``settings.json`` (an output folder holds one evaluation's settings)."""

    def __init__(self, path: Path, settings: Settings) -> None:
        self.path = Path(path)
        self.images = self.path / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self.scores = self.path / "scores.csv"
        self._check_settings(settings)

    def _check_settings(self, settings: Settings) -> None:
        file = self.path / "settings.json"
        wanted = asdict(settings)
        if file.is_file():
            saved = json.loads(file.read_text())
            changed = {key: (saved.get(key), value) for key, value in wanted.items() if saved.get(key) != value}
            if changed:
                listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items())
                raise EvaluationError(f"{self.path} holds an evaluation with other settings ({listed}); use another --out folder")
        else:
            file.write_text(json.dumps(wanted, indent=2) + "\n")

    def image_path(self, name: str) -> Path:
        return self.images / name

    def has_images(self, job: Job) -> bool:
        return all(self.image_path(name).is_file() for name in job.image_names())

    def read_scores(self) -> list[ImageScore]:
        """The rows in scores.csv; only a last line without its newline (a killed write) is left
        out, any other unreadable row raises :class:`EvaluationError` naming its line."""
        if not self.scores.is_file():
            return []
        data = self.scores.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]  # a killed write may also end inside a character
        try:
            text = complete.decode("utf-8")
        except UnicodeDecodeError as error:
            line = complete[: error.start].count(b"\n") + 1
            raise unreadable_line(str(self.scores), line, f"it is not UTF-8 text ({error.reason})") from None
        return parse_csv(text, str(self.scores))

    def resume(self, jobs: Sequence[Job]) -> set[str]:
        """The ids of finished jobs: those with a row for each of their images. Rows of unfinished
        jobs and a half-written last line are removed, so appending continues cleanly; the rows of
        finished jobs (and of jobs no longer planned) are always kept."""
        scores = self.read_scores()
        planned = {job.id: job for job in jobs}
        rows: dict[str, set[str]] = {}
        for score in scores:
            rows.setdefault(score.job, set()).add(score.image)
        finished = {job_id for job_id, job in planned.items() if rows.get(job_id) == set(job.image_names())}
        keep = format_rows([s for s in scores if s.job in finished or s.job not in planned], header=True).encode()
        if self.scores.is_file() and keep != self.scores.read_bytes():
            _write_atomic(self.scores, keep)
        return finished

    def append(self, scores: Sequence[ImageScore]) -> None:
        """Add rows and flush them to disk, so a killed run keeps every finished job."""
        header = not self.scores.is_file()
        with open(self.scores, "a", encoding="utf-8", newline="") as file:
            file.write(format_rows(scores, header))
            file.flush()
            os.fsync(file.fileno())

    def write_failures(self, failures: Sequence[Failure]) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["job", "prompt", "subjects", "server", "error"])
        for failure in failures:
            writer.writerow([failure.job.id, failure.job.prompt, SUBJECT_SEPARATOR.join(failure.job.subjects), failure.server, failure.error])
        _write_atomic(self.path / "failures.csv", buffer.getvalue().encode())


def _write_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary file and rename it, so a killed run never leaves half a file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def reference_uploads(subjects: Sequence[Subject], margin: Optional[float], detector) -> dict[str, tuple[str, bytes]]:
    """Per subject, the upload file stem and PNG bytes of its reference: the largest face cropped
    square with ``margin`` (as the Face-diffuser Face Crop node does), or the whole photo padded to a
    square when margin is None."""
    uploads = {}
    for subject in subjects:
        try:
            uploads[subject.name] = (_slug(subject.name), reference_png(subject.photo, detector, margin))
        except FaceNotFoundError as error:
            raise EvaluationError(f"subject {subject.name}: {error}; use another photo or --no-crop") from None
    return uploads


class ServerWorker:
    """Runs jobs on one ComfyUI server: checks it has the pack and the models (a server without them
    takes no jobs), uploads the references it needs (once), queues the job's graph, waits for it and
    saves the images into the output folder."""

    def __init__(self, client: ComfyClient, templates: Optional[Mapping[int, dict]], settings: Settings, uploads: Mapping[str, tuple[str, bytes]], out: OutputFolder, timeout: float) -> None:
        self.client, self.templates, self.settings = client, templates, settings
        self.uploads, self.out, self.timeout = uploads, out, timeout
        self.uploaded: dict[str, str] = {}
        self.checked = False

    def model_files(self) -> list[str]:
        """The SDM and TDM names the jobs use (a template's own are checked when it is queued)."""
        sdm, tdm = self.settings.sdm, self.settings.tdm
        if not self.templates:
            sdm, tdm = sdm or DEFAULT_SDM, tdm or DEFAULT_TDM
        return [name for name in (sdm, tdm) if name]

    def __call__(self, job: Job) -> list[Path]:
        if not self.checked:
            self.client.check()
            self.client.check_models(self.model_files())
            self.checked = True
        for subject in job.subjects:
            if subject not in self.uploaded:
                self.uploaded[subject] = self.client.upload(*self.uploads[subject], UPLOAD_FOLDER)
        graph = job_graph(job, [self.uploaded[s] for s in job.subjects], self.settings, self.templates)
        images = self.client.images(self.client.run(graph.nodes, self.timeout), graph.images)
        if len(images) != job.images:
            raise JobError(f"{self.client} saved {len(images)} images for the job, expected {job.images}")
        for name, data in zip(job.image_names(), images):
            _write_atomic(self.out.image_path(name), data)
        return [self.out.image_path(name) for name in job.image_names()]


class Scorer:
    """IP and PC of generated images, with each subject's reference embedding computed once."""

    def __init__(self, facenet_path: Path, clip_path: Path, clip_tokenizer: Optional[Path], device: str, subjects: Sequence[Subject], detector) -> None:
        from ..faces.consistency import load_clip  # transformers: imported only when scoring

        self.detector = detector
        self.facenet = load_facenet(facenet_path).to(device)
        self.clip = load_clip(clip_path, clip_tokenizer)
        self.clip.model.to(device)
        self.references = {}
        for subject in subjects:
            try:
                (self.references[subject.name],) = reference_embeddings(self.facenet, detector, [open_photo(subject.photo)])
            except FaceNotFoundError:
                raise EvaluationError(f"subject {subject.name}: no face was found in its reference photo {subject.photo}") from None

    def score(self, job: Job, paths: Sequence[Path], server: str) -> list[ImageScore]:
        from ..faces.consistency import prompt_consistency

        images = [Image.open(path).convert("RGB") for path in paths]
        references = torch.stack([self.references[name] for name in job.subjects])
        pcs = prompt_consistency(self.clip.model, self.clip.tokenizer, pil_to_image(images), job.prompt)
        scores = []
        for path, image, pc in zip(paths, images, pcs.tolist()):
            identity = score_identity(self.facenet, self.detector, references, image)
            per_subject = tuple(match.similarity for match in identity.matches)
            others = tuple(match.other for match in identity.matches)
            scores.append(ImageScore(job.id, path.name, job.prompt, job.subjects, identity.score, per_subject, len(identity.faces), pc, server, others))
        return scores


DESCRIPTION = (
    "Generate images with Face-diffuser on one or more ComfyUI servers and score Identity Preservation "
    "(FaceNet) and Prompt Consistency (CLIP ViT-L/14) as the paper does. Run it again on the same --out "
    "folder to resume."
)
EPILOG = "The paper's protocol: 15 subjects x 30-40 prompts x 4 images, 50 steps, guidance 5."


def _parser() -> argparse.ArgumentParser:
    """The parser of ``python -m facediffuser_core evaluate`` on its own (the subcommand adds the same arguments)."""
    parser = argparse.ArgumentParser(prog="python -m facediffuser_core evaluate", description=DESCRIPTION, epilog=EPILOG)
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subjects", type=Path, required=True, help="folder with one folder of photos per subject (the first photo by name is the reference)")
    parser.add_argument("--prompts", type=Path, required=True, help="text file, one prompt per line with <|image|> after each subject's class word (1 to 4 subjects)")
    parser.add_argument("--server", action="append", required=True, metavar="HOST:PORT", help="a ComfyUI server with this pack and the models; repeat to spread the jobs over several")
    parser.add_argument("--out", type=Path, required=True, help="output folder (images, scores.csv, summary.md, ip_pc.png); reuse it to resume")
    parser.add_argument("--facenet", type=Path, help=f"FaceNet VGGFace2 weights (default: {FACENET_WEIGHTS} in the ComfyUI's models/{FACENET_FOLDER}, where `download --scores` puts it)")
    parser.add_argument("--clip", type=Path, help=f"CLIP ViT-L/14: the Hugging Face folder of openai/clip-vit-large-patch14, or a .safetensors inside it (default: {DEFAULT_CLIP_EVAL} in the ComfyUI's models/{CLIP_EVAL_FOLDER}, where `download --scores` puts it)")
    parser.add_argument("--comfyui", type=Path, metavar="PATH", help="the ComfyUI whose model folders hold the score models (default: $COMFYUI_PATH, else the ComfyUI this pack is installed in)")
    parser.add_argument("--clip-tokenizer", type=Path, help="folder with CLIP's vocab.json and merges.txt, for a --clip file that is not inside its model folder")
    parser.add_argument("--images-per-prompt", type=int, default=4, help="images per job, one batch (default 4)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    parser.add_argument("--cfg", type=float, default=5.0, help="guidance scale (default 5)")
    parser.add_argument("--size", type=int, default=512, help="image width and height in pixels (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every job (default 0)")
    parser.add_argument("--max-combinations", type=int, default=10, help="subject pairs per two-subject prompt (default 10, a fixed sample if more)")
    parser.add_argument("--crop-margin", type=float, default=DEFAULT_MARGIN, help=f"references are cropped square around the face with this margin (fraction of the face box per side; default {DEFAULT_MARGIN})")
    parser.add_argument("--no-crop", action="store_true", help="upload the reference photos whole (padded to a square) instead of cropped around the face")
    parser.add_argument("--sdm", help="SDM file name on the servers (default: the workflow's facediffuser_sdm.safetensors)")
    parser.add_argument("--tdm", help="TDM file name on the servers (default: the workflow's facediffuser_tdm.safetensors)")
    parser.add_argument("--workflow-dir", type=Path, help="use your own API workflows instead of the built-in graph: a folder with facediffuser_one_subject.json and/or facediffuser_two_subjects.json (e.g. the pack's workflows/api)")
    parser.add_argument("--layout", choices=WHOLE_LAYOUTS, help="generate with each subject in a region of its own: columns = side by side in marker order (compare the separation with and without it; built-in graphs only)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds a job may take on a server, queue included (default 3600)")
    parser.add_argument("--device", help="device for scoring (default: cuda if available, else cpu)")
    parser.add_argument("--no-score", action="store_true", help="only generate the images; a later run with the models scores them")


def score_model(given: Optional[Path], folder: str, file: str, option: str, comfyui: Optional[Path]) -> Path:
    """``given`` (``--facenet``/``--clip``), else ``file`` in the folders the ComfyUI at ``comfyui``
    searches for ``folder`` (where ``download`` puts it); a missing one is an error naming the file,
    the folders and the command that downloads it."""
    flag = f"--{option}"
    if given is not None:
        if not given.exists():
            raise EvaluationError(
                f"{flag} {given}: no such file or folder; `{download_command_line(['--scores'])}` downloads the official score models "
                f"into the ComfyUI's model folders, where evaluate finds them without {flag}"
            )
        return given
    if comfyui is None:
        raise EvaluationError(
            f"scoring needs {file} and no ComfyUI was found to look in: download it with "
            f"`{download_command_line([flag], comfyui=Path('/path/to/ComfyUI'))}` and pass the same --comfyui, or give {flag} PATH (or --no-score to only generate)"
        )
    folders = comfyui_model_folders(comfyui, name=folder)
    found = find_model(folders, file)
    if found is None:
        raise EvaluationError(
            f"scoring needs {file}, which is not in {', '.join(map(str, folders))}: download it with "
            f"`{download_command_line([flag], comfyui=comfyui)}`, or give {flag} PATH (or --no-score to only generate)"
        )
    return found


def evaluate(args: argparse.Namespace) -> int:
    if not args.no_score:
        try:
            comfyui = find_comfyui(args.comfyui)
        except FaceDiffuserError:
            if args.comfyui:
                raise
            comfyui = None  # only --facenet and --clip
        args.facenet = score_model(args.facenet, FACENET_FOLDER, FACENET_WEIGHTS, "facenet", comfyui)
        args.clip = score_model(args.clip, CLIP_EVAL_FOLDER, DEFAULT_CLIP_EVAL, "clip", comfyui)
    if min(args.images_per_prompt, args.steps, args.max_combinations) < 1 or args.size < 64 or args.size % 8:
        raise EvaluationError("--images-per-prompt, --steps and --max-combinations must be >= 1, --size a multiple of 8 and at least 64")
    if args.layout and args.workflow_dir:
        raise EvaluationError("--layout works with the built-in graphs; leave out --workflow-dir (or put the regions in your own workflows)")
    settings = Settings(
        images=args.images_per_prompt, steps=args.steps, cfg=args.cfg, size=args.size, seed=args.seed,
        sdm=args.sdm, tdm=args.tdm, crop_margin=None if args.no_crop else args.crop_margin, layout=args.layout,
    )  # fmt: skip
    subjects = find_subjects(args.subjects)
    jobs = plan_jobs(read_prompts(args.prompts), [s.name for s in subjects], settings.images, args.max_combinations, settings.seed)
    templates = None if args.workflow_dir is None else load_templates(args.workflow_dir, [len(job.subjects) for job in jobs])
    out = OutputFolder(args.out, settings)
    finished = out.resume(jobs)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    detector = load_detector(device) if settings.crop_margin is not None or not args.no_score else None
    scorer = None if args.no_score else Scorer(args.facenet, args.clip, args.clip_tokenizer, device, subjects, detector)
    if scorer is not None and importlib.util.find_spec("matplotlib") is None:
        print("note: matplotlib is not installed, so there will be no ip_pc.png plot (pip install matplotlib)", file=sys.stderr)
    pending = [job for job in jobs if job.id not in finished]
    generated = [job for job in pending if out.has_images(job)]  # downloaded before, not scored yet
    if scorer is None:
        finished |= {job.id for job in generated}
        pending, generated = [job for job in pending if job.id not in finished], []
    uploads = reference_uploads(subjects, settings.crop_margin, detector)
    workers = {server: ServerWorker(ComfyClient(server), templates, settings, uploads, out, args.timeout) for server in args.server}

    bar = tqdm(total=len(jobs), initial=len(jobs) - len(pending), unit="job", desc="evaluate", dynamic_ncols=True)
    failures: list[Failure] = []

    def done(job: Job, paths: Sequence[Path], server: str) -> None:
        if scorer is not None:
            out.append(scorer.score(job, paths, server))
        bar.update(1)

    def failed(failure: Failure) -> None:
        failures.append(failure)
        bar.update(1)
        bar.write(f"failed: {failure.job.id} ({failure.server or 'no server'}): {failure.error}")

    for job in generated:
        try:
            done(job, [out.image_path(name) for name in job.image_names()], "earlier run")
        except Exception as error:  # reported with the other failures
            failed(Failure(job, f"{type(error).__name__}: {error}", "earlier run"))
    to_run = [job for job in pending if job not in generated]
    try:
        run_jobs(to_run, workers, done, failed)
    except BaseException:  # Ctrl-C, or a worker that died of a BaseException
        for worker in workers.values():
            worker.client.cancel()  # its job still queued or running on the server
        raise
    finally:
        bar.close()
    out.write_failures(failures)

    print(f"{len(jobs) - len(failures)} of {len(jobs)} jobs finished ({len(pending) - len(failures)} in this run); outputs in {out.path}")
    if scorer is not None:
        planned = {job.id for job in jobs}
        scores = [s for s in out.read_scores() if s.job in planned]
        summary = summary_markdown(scores)
        (out.path / "summary.md").write_text(summary, encoding="utf-8")
        print(summary)
        if scores and importlib.util.find_spec("matplotlib") is not None:
            plot_ip_pc(scores, out.path / "ip_pc.png")
    if failures:
        print(f"{len(failures)} job(s) failed (listed in {out.path / 'failures.csv'}); run the command again to retry them:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure.job.id}: {failure.error}", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """:func:`evaluate` with its exit codes: 0 done, 1 some jobs failed, 2 an error, 130 stopped (the
    finished jobs kept)."""
    try:
        return evaluate(args)
    except (FaceDiffuserError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit) as stop:
        print(
            f"stopped ({type(stop).__name__}): every finished job is kept in {args.out}; "
            "run the same command again to resume (finished jobs are skipped)",
            file=sys.stderr,
        )
        return 130

