import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
for path in (ROOT, TESTS):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

SHARED = ROOT.parent / "shared"
FACES = SHARED / "testdata" / "faces"


@pytest.fixture(scope="session")
def official_files(tmp_path_factory):
    """Tiny random-weight SDM and TDM in the official layout: {"SDM": path, "TDM": path}."""
    import factories

    root = tmp_path_factory.mktemp("official")
    return {kind: factories.write_official(root, kind, "tiny", seed) for seed, kind in enumerate(("SDM", "TDM"))}
