""".ci/hosts.sh, as a public clone runs it: without the workplace's ComfyUI archive, ComfyUI 0.33 comes
from a git repository (upstream by default, ``COMFYUI_GIT_URL`` here: a local bare repository standing
in for it, no network) at exactly the pinned commit, not at the branch's newest one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from paths import ROOT
from processes import git

pytestmark = pytest.mark.skipif(sys.platform == "win32" or not shutil.which("git") or not shutil.which("bash"), reason="CI's scripts run in bash on Linux")


@pytest.fixture
def upstream(tmp_path) -> tuple[Path, str, str]:
    """A bare repository with two commits of a ComfyUI-shaped tree: (its path, the first commit, the second)."""
    work = tmp_path / "work"
    (work / "comfy").mkdir(parents=True)
    git("init", "-q", "-b", "master", cwd=work)
    commits = []
    for version in ("0.33.0", "0.34.0"):
        (work / "main.py").write_text("print('ComfyUI')\n")
        (work / "comfy" / "__init__.py").write_text("")
        (work / "comfyui_version.py").write_text(f'__version__ = "{version}"\n')
        git("add", "-A", cwd=work)
        git("commit", "-q", "-m", version, cwd=work)
        commits.append(git("rev-parse", "HEAD", cwd=work))
    bare = tmp_path / "upstream.git"
    git("clone", "-q", "--bare", str(work), str(bare), cwd=tmp_path)
    return bare, commits[0], commits[1]


def host_0_33(tmp_path: Path, **environment: str) -> subprocess.CompletedProcess:
    """Runs .ci/hosts.sh's host_0_33 from the repository root, as .ci/run does, with the cache in tmp_path."""
    script = 'set -euo pipefail; cache="$1"; . .ci/hosts.sh; host_0_33'
    return subprocess.run(
        ["bash", "-c", script, "bash", str(tmp_path / "cache")], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "HOST_ARCHIVE": str(tmp_path / "absent.tar.gz"), **environment},
    )


def test_without_the_archive_comfyui_comes_from_git_at_exactly_the_pinned_commit(tmp_path, upstream):
    bare, first, second = upstream
    result = host_0_33(tmp_path, COMFYUI_GIT_URL=str(bare), COMFYUI_COMMIT=first)
    assert result.returncode == 0, result.stderr
    host = Path(result.stdout.strip())
    assert host == tmp_path / "cache" / "comfyui-0.33.0"
    assert f"fetching ComfyUI {first} from {bare}" in result.stderr
    assert git("rev-parse", "HEAD", cwd=host) == first != second  # the pinned commit, not the branch's newest
    assert (host / "comfyui_version.py").read_text() == '__version__ = "0.33.0"\n' and (host / "main.py").is_file()
    again = host_0_33(tmp_path, COMFYUI_GIT_URL=str(tmp_path / "gone.git"), COMFYUI_COMMIT=first)
    assert again.returncode == 0 and Path(again.stdout.strip()) == host and "fetching" not in again.stderr  # cached


def test_a_commit_the_repository_lacks_stops_with_an_error_and_leaves_no_host(tmp_path, upstream):
    bare, _, _ = upstream
    result = host_0_33(tmp_path, COMFYUI_GIT_URL=str(bare), COMFYUI_COMMIT="0" * 40)
    assert result.returncode != 0
    assert not (tmp_path / "cache" / "comfyui-0.33.0").exists()


def test_the_default_is_upstream_comfyui_at_the_archives_commit():
    """What a public clone fetches when nothing is overridden: ComfyUI's repository, at the commit the
    workplace's archive was made from (../shared/hosts/README.md)."""
    result = subprocess.run(["bash", "-c", '. .ci/hosts.sh; echo "$COMFYUI_GIT_URL $COMFYUI_COMMIT"'], cwd=ROOT, capture_output=True, text=True, check=True,
                            env={key: value for key, value in os.environ.items() if key not in ("COMFYUI_GIT_URL", "COMFYUI_COMMIT")})  # fmt: skip
    assert result.stdout.split() == ["https://github.com/comfyanonymous/ComfyUI.git", "783545f689a0af730065994b46b382ae24844c99"]
