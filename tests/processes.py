"""Whether processes have ended, for the tests that start servers and must leave nothing behind, how
the Ctrl-C tests start their command, and git for the tests that build throwaway repositories."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def sigint_default() -> None:
    """A ``preexec_fn`` giving the child SIGINT at its default disposition, so that Python turns Ctrl-C
    into KeyboardInterrupt there. A suite started from a background shell inherits SIGINT ignored,
    and a Ctrl-C test would then test the shell, not the command."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def gone(*pids: int, within: float = 10.0) -> bool:
    """Whether every process has ended within ``within`` seconds (a killed grandchild takes a moment)."""
    deadline = time.monotonic() + within
    while any(alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


GIT_IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}


def git(*args: str, cwd: Path) -> str:
    """Runs git in ``cwd`` with a throwaway identity (commits work on a machine without git config);
    its output, stripped."""
    return subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **GIT_IDENTITY}, check=True, capture_output=True, text=True).stdout.strip()
