"""The into-a-photo template through a real ComfyUI server (at test size): the people are painted
into the picture's boxes only, the VAE-decoded picture far from the boxes differs from the picture by
no more than a VAE round trip of that picture (measured on its own), the saved picture keeps every
pixel outside the boxes exactly, and a person whose region the noise mask leaves out is an error
naming the sampler, the person and the fix."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
from PIL import Image

from harness import status_message
from workflow_format import API_WORKFLOWS, load

SIZE = 128  # the picture's working width (the template's 512): a 16x16 latent
STEPS = 3
CELL = 8  # one latent cell in pixels: "far from the boxes" is at least this far


def small(seed: int = 1) -> dict:
    graph = copy.deepcopy(load(API_WORKFLOWS / "facediffuser_into_a_photo.json"))
    for node in graph.values():
        if node["class_type"] == "ImageScale":
            node["inputs"]["width"] = SIZE
        elif node["class_type"] == "FaceDiffuserSampler":
            node["inputs"].update(steps=STEPS, seed=seed)
    return graph


def key_of(graph: dict, class_type: str) -> str:
    (key,) = [key for key, node in graph.items() if node["class_type"] == class_type]
    return key


def pixels(server, entry: dict, key: str) -> np.ndarray:
    (image,) = entry["outputs"][key]["images"]
    return np.asarray(Image.open(io.BytesIO(server.view(image))).convert("RGB"), dtype=np.int16)


def run(server, graph: dict) -> dict:
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "success", status_message(entry, "execution_error")
    return entry


def test_people_go_into_their_boxes_and_the_rest_of_the_picture_is_kept(server):
    graph = small()
    scale, decode = key_of(graph, "ImageScale"), key_of(graph, "VAEDecode")
    graph["90"] = {"class_type": "PreviewImage", "inputs": {"images": [decode, 0]}}  # the decoded picture, before the composite
    graph["91"] = {"class_type": "PreviewImage", "inputs": {"images": [scale, 0]}}  # the picture as the template scales it
    union = key_of(graph, "FaceDiffuserRegionsUnion")
    graph["92"] = {"class_type": "MaskToImage", "inputs": {"mask": [union, 0]}}
    graph["93"] = {"class_type": "PreviewImage", "inputs": {"images": ["92", 0]}}
    entry = run(server, graph)
    picture, decoded, saved = pixels(server, entry, "91"), pixels(server, entry, "90"), pixels(server, entry, key_of(graph, "SaveImage"))
    inside = pixels(server, entry, "93")[..., 0] > 127
    assert picture.shape == saved.shape == (SIZE, SIZE, 3) and decoded.shape == (SIZE, SIZE, 3)
    assert 0.2 < inside.mean() < 0.8  # the two boxes, not the whole picture
    # the VAE round trip of the picture alone (encode + decode), measured on its own
    loader = key_of(graph, "FaceDiffuserLoader")
    trip = {
        "1": graph[loader], "2": {"class_type": "LoadImage", "inputs": dict(graph[graph[scale]["inputs"]["image"][0]]["inputs"])},
        "3": {"class_type": "ImageScale", "inputs": {**graph[scale]["inputs"], "image": ["2", 0]}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["1", 3]}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 3]}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }  # fmt: skip
    tripped = pixels(server, run(server, trip), "6")
    round_trip = np.abs(tripped - picture)
    # far from the boxes (a latent cell away), the sampled-and-decoded picture is the picture up to that round trip
    grown = inside.copy()
    for axis in (0, 1):
        for shift in range(1, CELL + 1):
            grown |= np.roll(inside, shift, axis) | np.roll(inside, -shift, axis)
    far = ~grown
    assert far.sum() > 0.1 * far.size
    changed = np.abs(decoded - picture)
    assert changed[far].mean() <= round_trip[far].mean() + 1.0 and changed[far].max() <= round_trip[far].max() + 8
    # inside the boxes the people were painted: the decoded picture departs from the round trip more
    # there than far from the boxes, where the latent is the picture's (the test VAE's decoder, random
    # weights with a self-attention block, spreads any change over the whole picture: hence no sharper bound)
    departed = np.abs(decoded - tripped)
    assert departed[inside].mean() > 1.2 * departed[far].mean()
    # the saved picture keeps every pixel outside the boxes exactly (the composite through the union)
    assert np.array_equal(saved[~inside], picture[~inside])
    assert np.array_equal(saved[inside], decoded[inside])


def test_a_person_outside_the_noise_mask_is_an_error_naming_the_person_and_the_fix(server):
    """The noise mask is the first person's box only: the second person's region is outside it."""
    graph = small()
    regions = graph[key_of(graph, "FaceDiffuserRegionsUnion")]["inputs"]["masks"][0]
    first = copy.deepcopy(graph[regions])
    first["inputs"].update(people=1, boxes=first["inputs"]["boxes"].split(";")[0], prompt="")
    graph["95"] = first
    graph[key_of(graph, "FaceDiffuserRegionsUnion")]["inputs"]["masks"] = ["95", 0]
    entry = server.run(graph)
    error = status_message(entry, "execution_error")
    assert entry["status"]["status_str"] == "error" and error["node_type"] == "FaceDiffuserSampler"
    assert error["exception_message"].startswith(
        "Face-diffuser Sampler: marker 2 ('man'): only 0% of its region lies inside the latent's noise mask (the part of the picture that is repainted), "
        "so the kept picture would cut the person off; draw the region inside the masked area, or make the noise mask cover it"
    ), error["exception_message"]
