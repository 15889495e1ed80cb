"""Face detection with the real MTCNN (its weights ship with facenet-pytorch) on real photos, square
crop geometry with margins and edge padding, masks, previews, and photos without a face."""

from __future__ import annotations

import subprocess
import sys
from pathlib import PurePosixPath, PureWindowsPath

import numpy as np
import pytest
import torch
from PIL import Image

from facediffuser_core.errors import FaceDiffuserError, FaceNotFoundError, MissingDependencyError
from facediffuser_core.faces.detection import (
    CropSquare,
    Face,
    box_mask,
    crop_faces,
    crop_preview,
    crop_square,
    cut_square,
    detect,
    detect_faces,
    facenet_install_hint,
    import_facenet,
    load_detector,
    pil_to_image,
    to_pil_images,
)
from paths import ROOT

# Points marked by hand on each photo (x, y in pixels): both eyes and the middle of the mouth.
LANDMARKS = {
    "man1": [(500, 270), (620, 280), (540, 410)],
    "man2": [(190, 343), (352, 346), (264, 500)],
    "astronaut": [(205, 105), (242, 105), (225, 142)],
}
NAMES = list(LANDMARKS)  # the order of the face_photos fixture


@pytest.fixture(scope="module")
def detector():
    return load_detector("cpu")


@pytest.fixture(scope="module")
def detections(detector, face_photos):
    return dict(zip(NAMES, (detect(detector, photo) for photo in face_photos)))


@pytest.mark.parametrize("name", NAMES)
def test_mtcnn_finds_the_face_where_it_is(name, detections, face_photos):
    photo = face_photos[NAMES.index(name)]
    (face,) = detections[name]
    x1, y1, x2, y2 = face.box
    assert face.confidence > 0.99
    width, height = photo.size
    assert -2 <= x1 < x2 <= width + 2 and -2 <= y1 < y2 <= height + 2
    for x, y in LANDMARKS[name]:
        assert x1 < x < x2 and y1 < y < y2, f"hand-marked point {(x, y)} outside the box {face.box}"
    eyes = np.hypot(*np.subtract(LANDMARKS[name][1], LANDMARKS[name][0]))
    assert 1.3 * eyes < x2 - x1 < 3.5 * eyes  # a face box is about two eye distances wide
    assert 0.9 < (y2 - y1) / (x2 - x1) < 1.8


def test_faces_come_largest_first(detector, face_photos):
    """Two faces side by side, the astronaut's small and man2's large: the larger is face 0."""
    small = face_photos[2].crop((150, 30, 300, 200))  # the astronaut's head, 150x170
    large = face_photos[1].resize((277, 352))
    canvas = Image.new("RGB", (450, 352), (128, 128, 128))
    canvas.paste(small, (0, 100))
    canvas.paste(large, (173, 0))
    faces = detect(detector, canvas)
    assert len(faces) == 2
    areas = [(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) for f in faces]
    assert areas[0] > areas[1]
    assert faces[0].box[0] > 173 and faces[1].box[2] < 160  # large one on the right, small on the left


def test_no_face_in_a_blank_image_or_noise(detector):
    blank = Image.new("RGB", (256, 256), (120, 120, 120))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    assert detect_faces(detector, [blank, noise]) == [[], []]


def test_detect_faces_reports_progress(detector, face_photos):
    calls = []
    detect_faces(detector, face_photos[2:] * 2, lambda done, total: calls.append((done, total)))
    assert calls == [(1, 2), (2, 2)]


def test_to_pil_rounds_down_as_comfyui_saves():
    image = torch.tensor([0.0, 0.5, 0.999, 1.0, 1 / 255, 2 / 255 - 1e-6]).view(1, 1, 6, 1).expand(1, 1, 6, 3)
    (pil,) = to_pil_images(image)
    expected = np.clip(255.0 * image[0].numpy(), 0, 255).astype(np.uint8)  # SaveImage's conversion
    assert np.array_equal(np.asarray(pil), expected)


@pytest.mark.parametrize(
    "box, margin, expected",
    [
        ((10.0, 20.0, 30.0, 60.0), 0.5, CropSquare(-20, 0, 80)),  # 40 tall -> 80, centred on (20, 40)
        ((10.0, 20.0, 30.0, 60.0), 0.0, CropSquare(0, 20, 40)),  # the box's longer side, squared
        ((100.0, 100.0, 150.0, 130.0), 0.25, CropSquare(88, 78, 75)),  # wide box: side from its width
        ((0.4, 0.4, 10.6, 10.6), 1.0, CropSquare(-10, -10, 31)),  # fractional box, whole pixels
    ],
)
def test_crop_square_geometry(box, margin, expected):
    square = crop_square(box, margin)
    assert square == expected
    centre_x, centre_y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    assert abs(square.left + square.size / 2 - centre_x) <= 0.5 and abs(square.top + square.size / 2 - centre_y) <= 0.5


def test_negative_margin_is_refused():
    with pytest.raises(FaceDiffuserError, match="margin must be >= 0"):
        crop_square((0, 0, 10, 10), -0.1)


@pytest.mark.parametrize(
    "square",
    [CropSquare(2, 3, 4), CropSquare(-3, -2, 6), CropSquare(7, 5, 6), CropSquare(-2, -2, 14), CropSquare(20, 20, 3)],
    ids=["inside", "top-left-edge", "bottom-right-edge", "larger-than-image", "outside"],
)
def test_cut_square_pads_with_zeros_outside_the_image(square):
    image = torch.arange(3 * 8 * 10, dtype=torch.float32).view(3, 8, 10) + 1  # no zero pixels inside
    pad = 30
    padded = np.pad(image.numpy(), ((0, 0), (pad, pad), (pad, pad)))  # independent reference
    expected = padded[:, pad + square.top : pad + square.top + square.size, pad + square.left : pad + square.left + square.size]
    cut = cut_square(image, square)
    assert cut.shape == (3, square.size, square.size)
    assert np.array_equal(cut.numpy(), expected)


def test_box_mask_marks_the_pixels_whose_centre_is_inside():
    mask = box_mask((1.2, 0.5, 3.6, 2.4), height=4, width=5)
    expected = np.zeros((4, 5), dtype=np.float32)
    expected[0:2, 1:4] = 1  # row centres 0.5, 1.5 lie in 0.5..2.4; column centres 1.5, 2.5, 3.5 in 1.2..3.6
    assert np.array_equal(mask.numpy(), expected)


def test_crop_of_a_real_photo_is_the_square_around_its_face(detector, detections, face_photos):
    photo = face_photos[2]
    images = pil_to_image([photo])
    (face,) = detections["astronaut"]
    square = crop_square(face.box, 0.5)
    crops = crop_faces(images, [[face]], margin=0.5, size=square.size)
    assert crops.crops.shape == (1, square.size, square.size, 3)
    expected = images[0, square.top : square.top + square.size, square.left : square.left + square.size]
    assert square.top >= 0 and square.left >= 0  # the face is well inside: no padding here
    assert torch.allclose(crops.crops[0], expected, atol=1e-5)  # same size: the resize changes nothing
    assert crops.masks.shape == (1, 512, 512) and crops.chosen == (face,)
    assert torch.equal(crops.masks[0], box_mask(face.box, 512, 512))
    for x, y in LANDMARKS["astronaut"]:
        assert crops.masks[0, y, x] == 1


def test_crop_at_the_edge_is_padded_and_resized(detector, face_photos):
    """The photo cut so the face touches the left and top edges: the square is zero-padded there."""
    photo = face_photos[1].crop((150, 190, 554, 704))  # man2's face now starts at the image's corner
    (face,) = detect(detector, photo)
    images = pil_to_image([photo])
    square = crop_square(face.box, 0.5)
    assert square.left < 0 and square.top < 0
    crops = crop_faces(images, [[face]], margin=0.5, size=128)
    assert crops.crops.shape == (1, 128, 128, 3)
    scale = 128 / square.size
    left_pad, top_pad = int(-square.left * scale), int(-square.top * scale)
    assert crops.crops[0, :, : left_pad - 2].abs().max() == 0 and crops.crops[0, : top_pad - 2].abs().max() == 0
    assert crops.crops[0, top_pad + 2 :, left_pad + 2 :].mean() > 0.1  # the photo itself


def test_face_index_picks_the_next_largest_face():
    faces = [[Face((0, 0, 20, 20), 0.99), Face((30, 30, 40, 40), 0.98)]]
    images = torch.rand(1, 64, 64, 3)
    crops = crop_faces(images, faces, face_index=1, margin=0.0, size=10)
    assert crops.chosen == (faces[0][1],)
    assert torch.allclose(crops.crops[0], images[0, 30:40, 30:40], atol=1e-5)


def test_missing_face_is_an_error_naming_the_image():
    faces = [[Face((0, 0, 20, 20), 0.99)], [], [Face((0, 0, 20, 20), 0.99)]]
    with pytest.raises(FaceNotFoundError, match=r"no face was found in image 2 of 3 \(batch index 1\).*if_no_face to 'pass through'"):
        crop_faces(torch.rand(3, 32, 32, 3), faces)
    with pytest.raises(FaceNotFoundError, match=r"image 1 of 3 \(batch index 0\) has 1 face\(s\) but face_index 1 asks for face 2"):
        crop_faces(torch.rand(3, 32, 32, 3), faces, face_index=1)


def test_missing_face_can_pass_through_uncropped():
    images = torch.rand(2, 30, 50, 3) * 0.5 + 0.25
    faces = [[Face((5, 5, 25, 25), 0.99)], []]
    crops = crop_faces(images, faces, margin=0.0, size=50, if_no_face="pass through")
    assert crops.chosen == (faces[0][0], None)
    assert crops.masks[1].abs().max() == 0 and crops.masks[0].sum() == 20 * 20
    passed = crops.crops[1]  # padded to a centred 50x50 square: 10 black rows above and below
    assert passed[:10].abs().max() == 0 and passed[40:].abs().max() == 0
    assert torch.allclose(passed[10:40], images[1], atol=1e-5)


def test_preview_draws_every_box_with_the_used_one_green(face_photos):
    photo = face_photos[2]
    used, other = Face((181.0, 62.0, 268.0, 172.0), 0.999), Face((300.0, 300.0, 400.0, 400.0), 0.75)
    preview = crop_preview([photo], [[used, other]], [used])
    original = pil_to_image([photo])[0]
    assert preview.shape == (1, 512, 512, 3)
    changed = (preview[0] - original).abs().sum(-1) > 0
    assert changed[62, 181:268].any() and changed[300, 300:400].all()  # both outlines
    assert not changed[450:, :100].any()  # far from the boxes: untouched
    top_edge = preview[0, 62, 200:250]
    assert torch.allclose(top_edge, torch.tensor([0.0, 1.0, 0.0]).expand_as(top_edge))  # green
    assert (preview[0, 300, 320:380, 2] == 0).all() and (preview[0, 300, 320:380, 0] == 1).all()  # yellow


def test_facenet_is_imported_lazily_with_an_install_hint_for_the_running_python(monkeypatch):
    """The hint installs into this Python (ComfyUI's, not whatever ``pip`` is on PATH) and names the
    pack's install.py as the other way (the quoting: the test below)."""
    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)  # as if not installed
    with pytest.raises(MissingDependencyError) as raised:
        import_facenet()
    message = str(raised.value)
    assert message.startswith("face detection and identity scores need facenet-pytorch, which cannot be imported")
    assert message.endswith(facenet_install_hint(sys.executable, sys.platform))
    assert sys.executable in message and " -m pip install --no-deps facenet-pytorch`" in message and str(ROOT / "install.py") in message


@pytest.mark.parametrize(
    ("platform", "python", "pack", "pip", "script"),
    [
        # the Windows portable build, in a folder with a space: double quotes (cmd and PowerShell)
        (
            "win32", r"C:\AI\ComfyUI portable\python_embeded\python.exe", PureWindowsPath(r"C:\AI\ComfyUI portable\ComfyUI\custom_nodes\facediffuser"),
            r'"C:\AI\ComfyUI portable\python_embeded\python.exe" -m pip install --no-deps facenet-pytorch',
            r'"C:\AI\ComfyUI portable\python_embeded\python.exe" "C:\AI\ComfyUI portable\ComfyUI\custom_nodes\facediffuser\install.py"',
        ),
        # a Linux / macOS venv in a folder with a space: POSIX single quotes
        (
            "linux", "/home/me/Comfy UI/venv/bin/python", PurePosixPath("/home/me/Comfy UI/custom_nodes/facediffuser"),
            "'/home/me/Comfy UI/venv/bin/python' -m pip install --no-deps facenet-pytorch",
            "'/home/me/Comfy UI/venv/bin/python' '/home/me/Comfy UI/custom_nodes/facediffuser/install.py'",
        ),
    ],
)  # fmt: skip
def test_the_facenet_install_hint_runs_the_given_python_quoted_for_the_platform(monkeypatch, platform, python, pack, pip, script):
    import facediffuser_core.weights.model_folders as model_folders

    monkeypatch.setattr(model_folders, "PACK", pack)  # where this pack was imported from
    hint = facenet_install_hint(python, platform)
    assert hint.startswith(f"install it into the Python that runs ComfyUI with `{pip}` (or run the pack's install.py with that Python: `{script}`), then restart ComfyUI")
    assert "`pip " not in hint  # no bare pip, which may belong to another Python


def test_the_core_imports_without_facenet_pytorch():
    code = (
        "import sys; sys.modules['facenet_pytorch'] = None\n"
        "import facediffuser_core.faces.detection, facediffuser_core.faces.identity, facediffuser_core.faces.consistency, facediffuser_core.commands.evaluate\n"
        "print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
