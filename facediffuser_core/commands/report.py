"""Evaluation results: one scored image per CSV row, the markdown table of means, the IP-PC plot."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Callable, Iterable, Optional, Sequence, TypeVar

from ..errors import EvaluationError, MissingDependencyError

__all__ = ["REFERENCE_POINTS", "SCORE_FIELDS", "CSV_FIELDS", "ImageScore", "parse_csv", "unreadable_line", "format_rows", "summary_markdown", "plot_ip_pc"]

REFERENCE_POINTS = {"FastComposer (paper, single subject)": (0.514, 0.243)}  # (IP, PC)
SCORE_FIELDS = ("job", "image", "prompt", "subjects", "num_subjects", "ip", "ip_per_subject", "faces", "pc", "server")  # scores.csv before separation
CSV_FIELDS = (*SCORE_FIELDS, "other_per_subject", "separation_per_subject")
SUBJECT_SEPARATOR = "+"
Number = TypeVar("Number", int, float)


@dataclass(frozen=True)
class ImageScore:
    """The scores of one generated image. ``ip``: the image's IP (max(min, 0)); ``ip_per_subject``:
    each subject's matched similarity (0 where its face is missing), in ``subjects`` order; ``faces``:
    how many faces were detected; ``pc``: prompt consistency; ``other_per_subject``: per subject, its
    matched face's highest similarity to another subject of the image (None without a face or another
    subject, or scored before this was measured)."""

    job: str
    image: str
    prompt: str
    subjects: tuple[str, ...]
    ip: float
    ip_per_subject: tuple[float, ...]
    faces: int
    pc: float
    server: str
    other_per_subject: tuple[Optional[float], ...] = ()

    def __post_init__(self) -> None:
        if not self.other_per_subject:  # not measured: unknown for every subject
            object.__setattr__(self, "other_per_subject", (None,) * len(self.subjects))

    @property
    def separation_per_subject(self) -> tuple[Optional[float], ...]:
        """Per subject: its own similarity minus the best other subject's, for its matched face (None where unknown)."""
        return tuple(None if other is None else own - other for own, other in zip(self.ip_per_subject, self.other_per_subject))

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
            "other_per_subject": _join_optional(self.other_per_subject),
            "separation_per_subject": _join_optional(self.separation_per_subject),
        }

    @classmethod
    def from_fields(cls, fields: Sequence[str], names: Sequence[str] = CSV_FIELDS) -> "ImageScore":
        """The score in one CSV record (values in ``names`` order: :data:`CSV_FIELDS`, or
        :data:`SCORE_FIELDS` for a file written before separation was measured); ValueError says what is wrong."""
        if len(fields) != len(names):
            raise ValueError(f"it has {len(fields)} fields, a score has {len(names)} ({', '.join(names)})")
        row = dict(zip(names, fields))
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
        others: tuple[Optional[float], ...] = ()
        if "other_per_subject" in row:
            others = tuple(None if value == "" else _parse(float, "other_per_subject", value) for value in row["other_per_subject"].split(";"))
            if len(others) != len(subjects):
                raise ValueError(f"its other_per_subject ({row['other_per_subject']!r}) does not have one value per subject ({row['subjects']!r})")
        return cls(row["job"], row["image"], row["prompt"], subjects, ip, per_subject, faces, pc, row["server"], others)


def _join_optional(values: Sequence[Optional[float]]) -> str:
    """``;``-joined values with 6 decimals, an empty field for None."""
    return ";".join("" if value is None else f"{value:.6f}" for value in values)


def _parse(kind: Callable[[str], Number], name: str, value: str) -> Number:
    """``value`` as an int or float; a ValueError naming the field otherwise."""
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"its {name} is {value!r}, not {'a whole number' if kind is int else 'a number'}") from None


def parse_csv(text: str, source: str = "scores.csv") -> list[ImageScore]:
    """The scores in a scores CSV (as :func:`format_rows` writes it).

    A file written before separation was measured (header :data:`SCORE_FIELDS`) is read too, its
    rows without separation. Only a last line without its newline (a run killed while writing it) is left out. Anything
    else that is not a score (another header, a row with a missing or unreadable value) raises
    :class:`EvaluationError` naming ``source``, the line and what is wrong: a score is never
    dropped silently.
    """
    reader = csv.reader(io.StringIO(text[: text.rfind("\n") + 1]))
    scores = []
    names = CSV_FIELDS
    try:
        for index, fields in enumerate(reader):
            if index == 0:
                if tuple(fields) not in (CSV_FIELDS, SCORE_FIELDS):
                    raise ValueError(f"the header is {','.join(fields)!r}, a scores file's is {','.join(CSV_FIELDS)!r}")
                names = tuple(fields)
            elif fields:  # a blank line holds no score
                scores.append(ImageScore.from_fields(fields, names))
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
    lines += _separation_lines(scores)
    lines += ["", "Reference points (paper numbers, not measured here):", ""]
    lines += [f"- {name}: IP {ip:.3f}, PC {pc:.3f}" for name, (ip, pc) in REFERENCE_POINTS.items()]
    return "\n".join(lines) + "\n"


def _separation_lines(scores: Sequence[ImageScore]) -> list[str]:
    """The separation table: over every matched face of the multi-subject images, the mean similarity
    to its own person, to the best other person, and their difference; overall and per subject."""
    faces: dict[str, list[tuple[float, float]]] = {}  # subject -> (own, best other) per face
    for score in scores:
        for subject, own, other in zip(score.subjects, score.ip_per_subject, score.other_per_subject):
            if other is not None:
                faces.setdefault(subject, []).append((own, other))
    if not faces:
        return []

    def means(pairs: Sequence[tuple[float, float]]) -> str:
        own, other = fmean(p[0] for p in pairs), fmean(p[1] for p in pairs)
        return f"{len(pairs)} | {own:.4f} | {other:.4f} | {fmean(p[0] - p[1] for p in pairs):.4f}"

    lines = ["", "Separation (multi-subject images; per generated face, its similarity to its own person and to the best other person; above 0: the identities stay apart):", ""]
    lines += ["| set | faces | own | best other | separation |", "|---|---:|---:|---:|---:|"]
    lines.append(f"| all | {means([pair for pairs in faces.values() for pair in pairs])} |")
    lines += [f"| {subject} | {means(faces[subject])} |" for subject in sorted(faces)]
    return lines


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
