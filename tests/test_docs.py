"""The README and docs/*.md keep their promises: every relative link and #anchor resolves, every flag
a code block passes to the pack's command line is one its parser knows, the command reference names
every option, the quick start works as written on the portable build, the test command is CI's, and
the README's RAM figures are the measured ones. Light: no ComfyUI, no network."""

import argparse
import re
import shlex
from pathlib import PurePosixPath, PureWindowsPath

import pytest

from facediffuser_core.__main__ import parser as command_parser
from paths import ROOT as REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PAGE_IDS = [str(p.relative_to(REPO)) for p in PAGES]

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "<", "2>", "&"}


# ---------------------------------------------------------------------------------------------
# Markdown helpers


def split_fences(text: str) -> tuple[list[str], list[list[str]]]:
    """(the lines outside fenced code blocks, each fenced block's lines)."""
    prose, blocks, block = [], [], None
    for line in text.splitlines():
        if FENCE.match(line):
            if block is None:
                block = []
            else:
                blocks.append(block)
                block = None
            continue
        (prose if block is None else block).append(line)
    assert block is None, "a code fence is never closed"
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (links and inline code unwrapped), lowercased, every
    character that is not a letter, digit, space, - or _ dropped, spaces turned into -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = INLINE_CODE.sub(lambda m: m.group(2), text)
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown page (a repeated slug gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    result = set()
    prose, _ = split_fences(text)
    for line in prose:
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(text: str) -> list[str]:
    """The targets of the Markdown links and images outside code (fenced blocks and inline spans)."""
    prose, _ = split_fences(text)
    return [m.group(1) for line in prose for m in LINK.finditer(INLINE_CODE.sub("", line))]


def link_problems(page, text: str, read=lambda path: path.read_text()) -> list[str]:
    """Each relative link of ``text`` (a page at ``page``) whose file or #anchor does not exist."""
    problems = []
    for target in links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ... : not ours to check
            continue
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        if path_part and not path.exists():
            problems.append(f"{target}: no file {path}")
            continue
        if anchor and path.suffix == ".md" and anchor not in anchors(text if path == page else read(path)):
            problems.append(f"{target}: no heading with the anchor #{anchor} in {path.name}")
    return problems


# ---------------------------------------------------------------------------------------------
# Command lines in code blocks


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    (subparsers,) = [a for a in command_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(subparsers.choices)


def commands_in(block: list[str]) -> list[str]:
    """The logical lines of a code block: a line ending with a backslash continues on the next."""
    result, current = [], ""
    for line in block:
        if line.rstrip().endswith("\\") and not line.rstrip().endswith("\\\\"):
            current += line.rstrip()[:-1] + " "
            continue
        result.append(current + line)
        current = ""
    if current:
        result.append(current)
    return result


def pack_command(tokens: list[str]) -> int | None:
    """Index of the subcommand token where ``tokens`` call the pack's command line: ``... cli.py SUB``,
    ``python -m facediffuser_core SUB`` or ``facediffuser SUB`` (the console script, in command
    position: first, after VAR=value settings, and followed by a word: a benchmark table's row
    ``facediffuser  52  83.0 ...`` is no command); None where they do not."""
    for i, token in enumerate(tokens[:-1]):
        if token in SHELL_OPERATORS:
            return None
        name = PureWindowsPath(token).name if "\\" in token else PurePosixPath(token).name
        in_command_position = all(re.match(r"^\w+=", t) for t in tokens[:i])
        console_script = token == "facediffuser" and in_command_position and re.match(r"^-|^[a-z][\w-]*$", tokens[i + 1])
        if name == "cli.py" or console_script or (token == "facediffuser_core" and i > 0 and tokens[i - 1] == "-m"):
            return i + 1
    return None


def tokenize(line: str) -> list[str]:
    """A command line's words, quotes removed and a # comment dropped. Backslashes are kept (a .bat
    line's ..\\..\\python.exe); a line that does not split so (bash escapes inside quotes) splits as bash would."""
    lexer = shlex.shlex(line, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    lexer.escape = ""
    try:
        return list(lexer)
    except ValueError:
        pass
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # not a command line at all (a table row with an apostrophe)
        return line.split()


def flag_problems(block: list[str], parsers=None) -> list[str]:
    """Each subcommand or option that a command of the pack in ``block`` uses and its parser lacks."""
    parsers = parsers if parsers is not None else subcommand_parsers()
    problems = []
    for line in commands_in(block):
        if not line.strip():
            continue
        tokens = tokenize(line)
        at = pack_command(tokens)
        if at is None:
            continue
        sub = tokens[at]
        if sub not in parsers:
            if sub not in ("-h", "--help"):
                problems.append(f"{line.strip()!r}: no subcommand {sub!r} (there are {', '.join(parsers)})")
            continue
        options = parsers[sub]._option_string_actions
        rest = iter(tokens[at + 1 :])
        for token in rest:
            if token in SHELL_OPERATORS:
                break
            if not token.startswith("-") or token == "-" or re.match(r"^-\d", token):
                continue
            name = token.split("=", 1)[0]
            action = options.get(name)
            if action is None:
                problems.append(f"{line.strip()!r}: {sub} has no option {name}")
            elif action.nargs != 0 and "=" not in token:
                next(rest, None)  # its value, which may itself start with - (--comfyui-args "--cpu")
    return problems


# ---------------------------------------------------------------------------------------------
# The checkers can fail


def test_slugs_follow_githubs_rules():
    assert slug("What you need: disk, RAM, VRAM") == "what-you-need-disk-ram-vram"
    assert slug("Any SD1.5 model as the scene model") == "any-sd15-model-as-the-scene-model"
    assert slug("Nodes (category *Face-diffuser*)") == "nodes-category-face-diffuser"
    assert slug("With ComfyUI's model patches and `guidance` nodes") == "with-comfyuis-model-patches-and-guidance-nodes"
    assert slug("snake_case [linked](x.md) stays") == "snake_case-linked-stays"
    assert anchors("# Title\n## Usage\n```\n# not a heading\n```\n## Usage\n### Usage\n") == {"title", "usage", "usage-1", "usage-2"}


def test_link_checker_flags_a_missing_file_and_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n## Real part\n")
    page = tmp_path / "page.md"
    text = (
        "# Page\n## Here\n[ok](other.md#real-part) [ok](#here) [ok](https://example.com/#x) `[code](nowhere.md)`\n"
        "[gone](missing.md) [bad](other.md#made-up-part) [bad too](#nowhere)\n```\n[in code](nowhere.md)\n```\n"
    )
    problems = link_problems(page, text)
    assert len(problems) == 3, problems
    assert any("missing.md" in p for p in problems)
    assert any("#made-up-part" in p for p in problems) and any("#nowhere" in p for p in problems)


def test_flag_checker_flags_a_made_up_flag_and_subcommand():
    block = [
        "python cli.py generate --face a.jpg --prompt 'a man <|image|>' -o out --comfyui-args \"--lowvram\" \\",
        "    --made-up-flag 3",
        r"..\..\..\python_embeded\python.exe cli.py download --all --nope",
        "python -m facediffuser_core generat --face a.jpg",
        "facediffuser evaluate --server h:1 --subjects s --prompts p --out o --layout=columns  # --not-checked comment",
        "pip install --no-deps facenet-pytorch  # not the pack's command",
        "facediffuser           52     83.0       1.46x  # a benchmark table's row, not a command",
    ]
    problems = flag_problems(block)
    assert len(problems) == 3, problems
    assert "--made-up-flag" in problems[0] and "--nope" in problems[1] and "'generat'" in problems[2]


# ---------------------------------------------------------------------------------------------
# The pages


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_relative_links_and_anchors_resolve(page):
    assert link_problems(page, page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_commands_shown_use_options_the_parser_knows(page):
    _, blocks = split_fences(page.read_text())
    problems = [problem for block in blocks for problem in flag_problems(block)]
    assert problems == []


def test_the_pages_show_commands_of_every_subcommand():
    """So the flag check above has something to check on every subcommand."""
    shown = set()
    for page in PAGES:
        for block in split_fences(page.read_text())[1]:
            for line in commands_in(block):
                tokens = tokenize(line) if line.strip() else []
                at = pack_command(tokens)
                if at is not None:
                    shown.add(tokens[at])
    assert shown >= set(subcommand_parsers())


def test_command_reference_names_every_option():
    text = (REPO / "docs" / "commands.md").read_text()
    sections = dict(re.findall(r"^## (\S+)\n(.*?)(?=^## |\Z)", text, re.M | re.S))
    for name, sub in subcommand_parsers().items():
        assert name in sections, f"docs/commands.md has no '## {name}' section"
        missing = [
            option
            for action in sub._actions
            if not isinstance(action, argparse._HelpAction)
            for option in (action.option_strings or [action.dest])
            if not re.search(r"`" + re.escape(option) + r"[ `=]", sections[name])
        ]
        assert missing == [], f"docs/commands.md's {name} section does not name {missing}"


def test_quick_start_runs_cli_py_on_every_platform():
    """Issue 34: the quick start's commands work as written, the portable build's included, whose
    python_embeded cannot run -m facediffuser_core from the pack's folder."""
    readme = (REPO / "README.md").read_text()
    quick_start = re.search(r"^## Quick start\n(.*?)^## ", readme, re.M | re.S).group(1)
    blocks = split_fences(quick_start)[1]
    lines = [line for block in blocks for line in commands_in(block)]
    calls = [tokenize(line) for line in lines if pack_command(tokenize(line)) is not None]
    assert {tuple(t[pack_command(t) :][:1]) for t in calls} >= {("download",), ("generate",)}
    assert all(PurePosixPath(t[pack_command(t) - 1].replace("\\", "/")).name == "cli.py" for t in calls), "the quick start runs the pack's cli.py by its path"
    assert (REPO / "cli.py").is_file()
    portable = [block for block in blocks if any("python_embeded" in line for line in block)]
    assert portable, "the quick start has the Windows portable build's lines"
    (cd,) = [line.split(None, 1)[1] for line in portable[0] if line.startswith("cd ")]
    assert PureWindowsPath(cd).parts[-3:] == ("ComfyUI", "custom_nodes", "ComfyUI-FaceDiffuser")
    for line in portable[0]:
        if "cli.py" in line:
            python = PureWindowsPath(cd, line.split()[0])
            resolved = []
            for part in python.parts:
                resolved = resolved[:-1] if part == ".." else [*resolved, part]
            # ComfyUI_windows_portable\python_embeded\python.exe, the portable build's Python
            assert resolved == [PureWindowsPath(cd).parts[0], "python_embeded", "python.exe"], line


def test_test_command_is_cis():
    """Issue 34: the documented test command installs the test extras first and is the one .ci/run
    runs (CI adds only pip's -q and --no-compile)."""
    development = (REPO / "docs" / "development.md").read_text()
    section = re.search(r"^## Running the tests\n(.*?)^## ", development, re.M | re.S).group(1)
    (block,) = [b for b in split_fences(section)[1] if any("pytest" in line for line in b)]
    documented = [tokenize(line) for line in block if line.strip()]
    assert documented[-1] == ["python", "-m", "pytest"]
    installs = [t[4:] for t in documented[:-1] if t[:4] == ["python", "-m", "pip", "install"]]
    assert len(installs) == len(documented) - 1 and ["-e", ".[test]"] in installs

    ci = (REPO / ".ci" / "run").read_text()
    ci_installs = [[a for a in tokenize(m) if a != "--no-compile"] for m in re.findall(r"^\s*pip install (.*)$", ci, re.M)]
    assert all(args in ci_installs for args in installs), (installs, ci_installs)
    assert re.search(r"python -m pytest \"\$@\"", ci)

    readme = (REPO / "README.md").read_text()
    shown = [" ".join(f'"{a}"' if "[" in a else a for a in args) for args in installs]  # -e ".[test]", as a shell needs it
    assert "pytest" in readme and all(f"python -m pip install {line}" in readme for line in shown), shown


def test_readme_gives_the_measured_ram():
    """Issue 34: the RAM a user needs, with the figures performance.md measured."""
    performance = (REPO / "docs" / "performance.md").read_text()
    first_run_table = performance[performance.index("## A first run: memory") :]
    first_run = re.search(r"^facediffuser\s+(\d+)\s+(\d+)\s+", first_run_table, re.M)  # graph, idle MiB, peak RSS MiB
    peak = int(first_run.group(2))
    readme = (REPO / "README.md").read_text()
    section = re.search(r"^### What you need: disk, RAM, VRAM\n(.*?)^### ", readme, re.M | re.S).group(1)
    assert re.search(r"^\| step \| disk \| RAM \| VRAM \|", section, re.M)
    rows = {row.split("|")[1].strip(): [cell.strip() for cell in row.split("|")[2:-1]] for row in re.findall(r"^\|.*\|$", section, re.M)}
    (cpu,) = [cells for step, cells in rows.items() if "on a CPU" in step]
    assert f"{peak:,} MiB" in cpu[1], "the CPU run's RAM cell gives the measured first-run peak"
    converter = [float(r) for r in re.findall(r"^\s*\w+\s+400\s+\d+\s+[\d.]+\s+\d+\s+([\d.]+)$", performance, re.M)]
    (download,) = [cells for step, cells in rows.items() if step.startswith("`download`")]
    assert converter and f"{min(converter):.2f} to {max(converter):.2f} times the input" in download[1], "the download's RAM cell gives the converter's measured peak"
