"""The example pictures the templates load (workflows/inputs/: two drawn portraits, a two-person pose, a park to put people into)
reach ComfyUI's input folder through the pack (``nodes.common.add_example_inputs``, called when the pack
loads): each is copied byte for byte where no file of its name is there, and a user's file of that name is
never replaced. The browser suite checks the same through a server that the suite gave no inputs."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "workflows" / "inputs"


@pytest.fixture
def common(comfy):
    return importlib.import_module("facediffuser_pack.nodes.common")


def test_the_shipped_inputs_are_what_the_templates_open():
    assert sorted(path.name for path in SHIPPED.glob("*.png")) == ["face_1.png", "face_2.png", "photo_park.png", "pose_two_people.png"]


@pytest.mark.oldest_host
def test_missing_example_inputs_are_copied_byte_identical(common, tmp_path):
    target = tmp_path / "input"  # not there yet: created
    copied = common.add_example_inputs(str(target))
    assert sorted(copied) == ["face_1.png", "face_2.png", "photo_park.png", "pose_two_people.png"]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == {p.name: p.read_bytes() for p in SHIPPED.glob("*.png")}
    assert common.add_example_inputs(str(target)) == []  # a second load copies nothing


@pytest.mark.oldest_host
def test_a_users_file_of_the_same_name_is_never_replaced(common, tmp_path):
    (tmp_path / "face_1.png").write_bytes(b"my own photo")
    os.utime(tmp_path / "face_1.png", (1, 1))  # older than the shipped one: still kept
    assert sorted(common.add_example_inputs(str(tmp_path))) == ["face_2.png", "photo_park.png", "pose_two_people.png"]
    assert (tmp_path / "face_1.png").read_bytes() == b"my own photo"
    assert (tmp_path / "face_2.png").read_bytes() == (SHIPPED / "face_2.png").read_bytes()


def test_a_folder_it_cannot_write_is_logged_not_raised(common, tmp_path, caplog):
    blocker = tmp_path / "input"
    blocker.write_text("a file where the folder should be")  # mkdir fails, as for a read-only folder
    assert common.add_example_inputs(str(blocker)) == []
    assert "could not copy the example input face_1.png" in caplog.text and blocker.read_text() == "a file where the folder should be"


def test_by_default_it_fills_comfyuis_input_folder(common, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path))
    assert len(common.add_example_inputs()) == 4 and (tmp_path / "pose_two_people.png").is_file()
