"""The shipped workflows crop each photo with Face Crop at generate's settings, and generate uploads
its own crop of the same photo: the two are the same picture (to one 8-bit level, the PNG's), so the
GUI and the command give the same result from the same photo. Without facenet-pytorch, the face nodes
say how to install it into the Python that runs ComfyUI."""

from __future__ import annotations

import importlib
import io
import shlex
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import image_tensor
from facediffuser_core.faces.detection import load_detector, reference_png
from paths import FACES, ROOT


@pytest.mark.parametrize("photo", ["man1.jpeg", "man2.jpeg"])
def test_the_workflows_face_crop_is_generates_upload(comfy, photo):
    node = importlib.import_module("facediffuser_pack.nodes.faces").FaceDiffuserFaceCrop
    crops, face_mask, _ = node.execute(image_tensor(FACES / photo), face_index=0, margin=0.5, size=512, if_no_face="error").args
    uploaded = np.asarray(Image.open(io.BytesIO(reference_png(FACES / photo, load_detector("cpu")))), dtype=np.float64) / 255.0
    assert crops.shape == (1, 512, 512, 3) and uploaded.shape == (512, 512, 3)
    difference = np.abs(crops[0].double().numpy() - uploaded)
    assert difference.max() <= 1 / 255 + 1e-6  # one 8-bit level at most: the uploaded PNG's quantisation
    assert difference.mean() < 0.5 / 255
    assert face_mask.sum() > 0  # a face was found and cropped, not passed through


def test_without_facenet_pytorch_the_face_nodes_give_the_pip_of_comfyuis_python(comfy, facenet_file, monkeypatch):
    """Face Crop and Identity Score (the Face Detailer: test_comfy_detailer.py) name themselves and give
    the install command for this Python (sys.executable: ComfyUI's, e.g. python_embeded's on the
    portable build), not a bare pip that may install into another Python, and the pack's install.py."""
    import folder_paths

    pack_faces = importlib.import_module("facediffuser_pack.facediffuser_core.faces.detection")
    scores = importlib.import_module("facediffuser_pack.nodes.scores")
    faces = importlib.import_module("facediffuser_pack.nodes.faces")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, scores.FACENET_FOLDER, ([str(facenet_file.parent)], folder_paths.folder_names_and_paths[scores.FACENET_FOLDER][1]))
    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)  # as if not installed
    pack_faces.load_detector.cache_clear()  # loaded again (and failing) as on a first run; reloaded by the next test
    photo = image_tensor(FACES / "man1.jpeg")
    pip = shlex.join([sys.executable, "-m", "pip", "install", "--no-deps", "facenet-pytorch"])
    install = shlex.join([sys.executable, str(ROOT / "install.py")])  # the pack as ComfyUI imported it
    runs = {
        "Face-diffuser Face Crop": lambda: faces.FaceDiffuserFaceCrop.execute(photo, face_index=0, margin=0.5, size=512, if_no_face="error"),
        "Face-diffuser Identity Score": lambda: scores.FaceDiffuserIdentityScore.execute(photo, photo, facenet_file.name),
    }
    for node, run in runs.items():
        with pytest.raises(Exception) as raised:
            run()
        message = str(raised.value)
        assert type(raised.value).__name__ == "MissingDependencyError", message
        assert message.startswith(f"{node}: face detection and identity scores need facenet-pytorch"), message
        assert f"into the Python that runs ComfyUI with `{pip}` (or run the pack's install.py with that Python: `{install}`)" in message, message
