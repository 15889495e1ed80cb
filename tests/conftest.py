import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
for path in (ROOT, TESTS):  # facediffuser_core, and the tests' helper modules
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


@pytest.fixture(scope="session")
def official_files(tmp_path_factory):
    """Tiny random-weight SDM and TDM in the official layout: {"SDM": path, "TDM": path}."""
    import factories

    root = tmp_path_factory.mktemp("official")
    return {kind: factories.write_official(root, kind, "tiny", seed) for seed, kind in enumerate(("SDM", "TDM"))}


@pytest.fixture(scope="session")
def clip_tokenize():
    """The real CLIP BPE tokenizer (open-clip-torch ships its vocabulary): text -> ids, no BOS/EOS."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer().encode

