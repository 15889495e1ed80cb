"""Evaluation results: one scored image per CSV row, the markdown table of means, the IP-PC plot."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Callable, Iterable, Optional, Sequence, TypeVar

from .errors import EvaluationError, MissingDependencyError

__all__ = ["REFERENCE_POINTS", "CSV_FIELDS", "ImageScore", "parse_csv", "unreadable_line", "format_rows", "summary_markdown", "plot_ip_pc"]

REFERENCE_POINTS = {"FastComposer (paper, single subject)": (0.514, 0.243)}  # (IP, PC)
CSV_FIELDS = ("job", "image", "prompt", "subjects", "num_subjects", "ip", "ip_per_subject", "faces", "pc", "server")
SUBJECT_SEPARATOR = "+"
Number = TypeVar("Number", int, float)


@dataclass(frozen=True)
class ImageScore:
    """The scores of one generated image. ``ip``: the image's IP (max(min, 0)); ``ip_per_subject``:
    each subject's matched similarity (0 where its face is missing), in ``subjects`` order; ``faces``:
    how many faces were detected; ``pc``: prompt consistency."""

    job: str
    image: str
    prompt: str
    subjects: tuple[str, ...]
    ip: float
    ip_per_subject: tuple[float, ...]
    faces: int
    pc: float
    server: str

    def row(self) -> dict[str, str]:
        return {
            "job": self.job,
            "image": self.image,
            "prompt": self.prompt,
            "subjects": SUBJECT_SEPARATOR.join(self.subjects),
            "num_subjects": str(len(self.subjects)),
            "ip": f"{self.ip:.6f}",
            "ip_per_subject": ";".join(f"{value:.6f}" for value in self.ip_per_subject),
            "faces": str(self.faces),
            "pc": f"{self.pc:.6f}",
            "server": self.server,
        }

    @classmethod
    def from_fields(cls, fields: Sequence[str]) -> "ImageScore":
        """The score in one CSV record (values in :data:`CSV_FIELDS` order); ValueError says what is wrong."""
        if len(fields) != len(CSV_FIELDS):
            raise ValueError(f"it has {len(fields)} fields, a score has {len(CSV_FIELDS)} ({', '.join(CSV_FIELDS)})")
        row = dict(zip(CSV_FIELDS, fields))
        empty = next((name for name in ("job", "image", "subjects") if not row[name]), None)
        if empty:
            raise ValueError(f"its {empty} is empty")
        subjects = tuple(row["subjects"].split(SUBJECT_SEPARATOR))
        per_subject = tuple(_parse(float, "ip_per_subject", value) for value in row["ip_per_subject"].split(";"))
        if _parse(int, "num_subjects", row["num_subjects"]) != len(subjects) or len(per_subject) != len(subjects):
            raise ValueError(
                f"its subjects ({row['subjects']!r}), num_subjects ({row['num_subjects']!r}) and ip_per_subject "
                f"({row['ip_per_subject']!r}) do not count the same number of subjects"
            )
        faces = _parse(int, "faces", row["faces"])
        if faces < 0:
            raise ValueError(f"its faces is {faces}: a count of faces cannot be negative")
        ip, pc = _parse(float, "ip", row["ip"]), _parse(float, "pc", row["pc"])
        return cls(row["job"], row["image"], row["prompt"], subjects, ip, per_subject, faces, pc, row["server"])


def _parse(kind: Callable[[str], Number], name: str, value: str) -> Number:
    """``value`` as an int or float; a ValueError naming the field otherwise."""
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"its {name} is {value!r}, not {'a whole number' if kind is int else 'a number'}") from None


def parse_csv(text: str, source: str = "scores.csv") -> list[ImageScore]:
    """The scores in a scores CSV (as :func:`format_rows` writes it).

    Only a last line without its newline (a run killed while writing it) is left out. Anything
    else that is not a score (another header, a row with a missing or unreadable value) raises
    :class:`EvaluationError` naming ``source``, the line and what is wrong: a score is never
    dropped silently.
    """
    reader = csv.reader(io.StringIO(text[: text.rfind("\n") + 1]))
    scores = []
    try:
        for index, fields in enumerate(reader):
            if index == 0 and tuple(fields) != CSV_FIELDS:
                raise ValueError(f"the header is {','.join(fields)!r}, a scores file's is {','.join(CSV_FIELDS)!r}")
            if index > 0 and fields:  # a blank line holds no score
                scores.append(ImageScore.from_fields(fields))
    except (ValueError, csv.Error) as error:
        raise unreadable_line(source, reader.line_num, str(error)) from None
    return scores


def unreadable_line(source: str, line: int, problem: str) -> EvaluationError:
    """The error for a line of a scores file that holds no score (the file is left as it is)."""
    return EvaluationError(
        f"{source}, line {line}: {problem}. The file was left as it is: fix that line (or move the file "
        "away to score afresh), then run the command again"
    )


def format_rows(scores: Iterable[ImageScore], header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(score.row() for score in scores)
    return buffer.getvalue()


def _means(scores: Sequence[ImageScore], ip: Optional[Sequence[float]] = None) -> str:
    ips = [s.ip for s in scores] if ip is None else ip
    return f"{len(scores)} | {fmean(ips):.4f} | {fmean(s.pc for s in scores):.4f}"


def summary_markdown(scores: Sequence[ImageScore], title: str = "Face-diffuser evaluation") -> str:
    """Means of IP and PC: overall, single- vs multi-subject, and per subject (a subject's IP there is
    its own matched similarity, clamped at 0, over every image it appears in)."""
    lines = [f"# {title}", "", "| set | images | IP | PC |", "|---|---:|---:|---:|"]
    if scores:
        lines.append(f"| all | {_means(scores)} |")
    for name, group in (("single-subject", [s for s in scores if len(s.subjects) == 1]), ("multi-subject", [s for s in scores if len(s.subjects) > 1])):
        if group:
            lines.append(f"| {name} | {_means(group)} |")
    subjects = sorted({name for s in scores for name in s.subjects})
    if subjects:
        lines += ["", "Per subject (IP: the subject's own face match, 0 where it is missing):", "", "| subject | images | IP | PC |", "|---|---:|---:|---:|"]
        for subject in subjects:
            group = [s for s in scores if subject in s.subjects]
            own = [max(s.ip_per_subject[s.subjects.index(subject)], 0.0) for s in group]
            lines.append(f"| {subject} | {_means(group, own)} |")
    lines += ["", "Reference points (paper numbers, not measured here):", ""]
    lines += [f"- {name}: IP {ip:.3f}, PC {pc:.3f}" for name, (ip, pc) in REFERENCE_POINTS.items()]
    return "\n".join(lines) + "\n"


def plot_ip_pc(scores: Sequence[ImageScore], path: Path) -> None:
    """Scatter of every image's IP against PC, the single- and multi-subject means, and the paper's
    reference points, saved as an image (PNG by the file name)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError("the IP-PC plot needs matplotlib: pip install matplotlib") from None
    figure = Figure(figsize=(6.4, 5.2), dpi=120)
    axes = figure.add_subplot()
    for name, marker, colour, group in (
        ("single-subject", "o", "tab:blue", [s for s in scores if len(s.subjects) == 1]),
        ("multi-subject", "s", "tab:orange", [s for s in scores if len(s.subjects) > 1]),
    ):
        if not group:
            continue
        axes.scatter([s.ip for s in group], [s.pc for s in group], s=12, alpha=0.3, color=colour, linewidths=0)
        axes.scatter(
            [fmean(s.ip for s in group)], [fmean(s.pc for s in group)], s=140, marker=marker, color=colour,
            edgecolors="black", label=f"{name} mean ({len(group)} images)",
        )  # fmt: skip
    for name, (ip, pc) in REFERENCE_POINTS.items():
        axes.scatter([ip], [pc], s=220, marker="*", color="tab:red", edgecolors="black", label=name)
    axes.set_xlabel("Identity Preservation (FaceNet cosine)")
    axes.set_ylabel("Prompt Consistency (CLIP ViT-L/14 cosine)")
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
