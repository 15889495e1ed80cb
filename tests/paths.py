"""Paths the tests share: the repository, the read-only ../shared folder and its face photos."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
SHARED = ROOT.parent / "shared"
FACES = SHARED / "testdata" / "faces"
