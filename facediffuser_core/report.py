"""Evaluation results: one scored image per CSV row, the markdown table of means, the IP-PC plot."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Iterable, Optional, Sequence

from .errors import MissingDependencyError

__all__ = ["REFERENCE_POINTS", "CSV_FIELDS", "ImageScore", "parse_csv", "format_rows", "summary_markdown", "plot_ip_pc"]

REFERENCE_POINTS = {"FastComposer (paper, single subject)": (0.514, 0.243)}  # (IP, PC)
CSV_FIELDS = ("job", "image", "prompt", "subjects", "num_subjects", "ip", "ip_per_subject", "faces", "pc", "server")
SUBJECT_SEPARATOR = "+"


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
    def from_row(cls, row: dict[str, str]) -> "ImageScore":
        return cls(
            row["job"],
            row["image"],
            row["prompt"],
            tuple(row["subjects"].split(SUBJECT_SEPARATOR)),
            float(row["ip"]),
            tuple(float(value) for value in row["ip_per_subject"].split(";")),
            int(row["faces"]),
            float(row["pc"]),
            row["server"],
        )


def parse_csv(text: str) -> list[ImageScore]:
    """The rows of a scores CSV; an incomplete row (a run killed while writing it) is dropped."""
    scores = []
    for row in csv.DictReader(io.StringIO(text)):
        try:
            scores.append(ImageScore.from_row(row))
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
    return scores


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
