"""A model folder without the file a node needs, inside an imported ComfyUI: the Loader and the score
nodes refuse it at queue time (``validate_inputs``) with the folders ComfyUI searches and the exact
``download`` command, and that command, run as printed (against the fake hub of tests/fake_hub.py
with tiny official-layout files), fills the folder so the same input validates."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fake_hub import FakeHub, download_env, official_hub


@pytest.fixture
def hub(official_files, facenet_file, tiny_clip_folder):
    server = official_hub(official_files, facenet_file, tiny_clip_folder)
    yield server
    server.close()


@pytest.fixture
def empty_folders(comfy, tmp_path, monkeypatch):
    """ComfyUI's facediffuser, facenet and clip_eval folders, empty: {name: folder}."""
    import folder_paths

    folders = {}
    for name in ("facediffuser", "facenet", "clip_eval"):
        folders[name] = tmp_path / "models" / name
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name, ([str(folders[name])], folder_paths.folder_names_and_paths[name][1]))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return folders


def run_printed_command(message: str, hub: FakeHub) -> None:
    """Run the command a message prints (``PYTHON PACK/cli.py download ...``) in a shell, from another folder."""
    command = message.split("Download the official files with: ")[1].split("   then press R")[0]
    env = {**os.environ, **download_env(hub)}
    result = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=300, cwd=tempfile.gettempdir())
    assert result.returncode == 0, result.stderr


@pytest.mark.oldest_host
def test_the_loader_names_the_empty_folder_and_the_command_that_fills_it(comfy, empty_folders, hub):
    loader = comfy.loader.FaceDiffuserLoader
    folder = empty_folders["facediffuser"]
    message = loader.validate_inputs(sdm_name="facediffuser_sdm.safetensors", tdm_name="facediffuser_tdm.safetensors")
    assert message.startswith(f"Face-diffuser Loader: there is no file 'facediffuser_sdm.safetensors' in models/facediffuser ({folder}).")
    cli = Path(comfy.loader.__file__).absolute().parents[1] / "cli.py"
    assert f"with: {shlex.join([sys.executable, str(cli), 'download', '--to', str(folder)])}   then press R" in message
    run_printed_command(message, hub)
    assert sorted(path.name for path in folder.iterdir()) == ["facediffuser_sdm.safetensors", "facediffuser_tdm.safetensors"]
    assert loader.validate_inputs(sdm_name="facediffuser_sdm.safetensors", tdm_name="facediffuser_tdm.safetensors") is True
    assert "there is no file 'other.safetensors'" in loader.validate_inputs(sdm_name="facediffuser_sdm.safetensors", tdm_name="other.safetensors")
    assert loader.validate_inputs(sdm_name="facediffuser_sdm.safetensors", tdm_name="none (another scene model)") is True
    assert loader.validate_inputs(sdm_name=None, tdm_name=None) is True  # linked inputs are checked when they run


def test_the_score_nodes_name_their_own_download(comfy, empty_folders, hub):
    identity, consistency = comfy.scores.FaceDiffuserIdentityScore, comfy.scores.FaceDiffuserPromptConsistency
    facenet = identity.validate_inputs(facenet_name="20180402-114759-vggface2.pt")
    clip = consistency.validate_inputs(clip_name="clip-vit-large-patch14/model.safetensors")
    assert facenet.startswith(f"Face-diffuser Identity Score: there is no file '20180402-114759-vggface2.pt' in models/facenet ({empty_folders['facenet']}).")
    assert f"download --facenet --to {empty_folders['facenet']}" in facenet
    assert clip.startswith("Face-diffuser Prompt Consistency: there is no file 'clip-vit-large-patch14/model.safetensors' in models/clip_eval")
    assert f"download --clip --to {empty_folders['clip_eval']}" in clip
    run_printed_command(facenet, hub)
    run_printed_command(clip, hub)
    assert identity.validate_inputs(facenet_name="20180402-114759-vggface2.pt") is True
    assert consistency.validate_inputs(clip_name="clip-vit-large-patch14/model.safetensors") is True
