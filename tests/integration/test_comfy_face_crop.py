"""The shipped workflows crop each photo with Face Crop at generate's settings, and generate uploads
its own crop of the same photo: the two are the same picture (to one 8-bit level, the PNG's), so the
GUI and the command give the same result from the same photo."""

from __future__ import annotations

import importlib
import io

import numpy as np
import pytest
from PIL import Image

from conftest import image_tensor
from facediffuser_core.faces.detection import load_detector, reference_png
from paths import FACES


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
