""".ci/peak_memory.py, which CI runs each host's suite under: the peak of the command's process tree,
with the largest processes named by what they are (a ComfyUI server by its main.py), and the
command's exit code passed on."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from paths import ROOT

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak_memory.py reads Linux's /proc")

HOLD = "import sys, time; block = bytearray({mb} * 2**20); time.sleep(1.5); sys.exit({code})"


def test_the_peak_names_a_comfyui_child_and_the_exit_code_is_the_commands(tmp_path):
    """A parent holding 50 MB starts a 'ComfyUI' (a main.py) holding 400 MB: the report names it first,
    counts both in the peak, goes to $PEAK_MEMORY_LOG (here a file of the test's own, not CI's log, which
    this test's environment may name) and the exit code is the parent's."""
    (tmp_path / "main.py").write_text(HOLD.format(mb=400, code=0))
    parent = f"import subprocess, sys; block = bytearray(50 * 2**20); subprocess.run([sys.executable, {str(tmp_path / 'main.py')!r}]); sys.exit(3)"
    log = tmp_path / "peak-memory.log"
    env = {**os.environ, "PEAK_MEMORY_LOG": str(log)}
    result = subprocess.run([sys.executable, str(ROOT / ".ci" / "peak_memory.py"), "probe", "--", sys.executable, "-c", parent], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 3, result.stderr
    match = re.search(r"^probe: peak memory ([\d.]+) GB at [\d:]+ \(largest processes then: ComfyUI \d+ ([\d.]+) GB, python \d+ 0\.\d GB\)", result.stdout, re.M)
    assert match, result.stdout
    assert float(match.group(2)) == pytest.approx(0.4, abs=0.06) and float(match.group(1)) >= 0.4
    assert log.read_text() == match.string[match.start() :].splitlines()[0] + "\n"
