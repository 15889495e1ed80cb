"""A stand-in for a malicious checkpoint: a pickle whose loading runs code, which leaves a file."""

from __future__ import annotations

import builtins
from pathlib import Path


class CodeRunningPickle:
    """Unpickling this creates ``marker``; a test shows the payload did not run by its absence."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)
