"""Paths the tests share: the repository, the read-only ../shared folder and its face photos."""

import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
SHARED = ROOT.parent / "shared"
FACES = SHARED / "testdata" / "faces"
CLI = shlex.join([sys.executable, str(ROOT / "cli.py")])  # how the printed download commands start, on POSIX
