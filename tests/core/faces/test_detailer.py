"""The face detailer's core: assignment of faces to people against an exhaustive search, similarities
in float64, the feathered mask and the blend restated in numpy, pixels outside the faces' squares kept
bit for bit, seeds, the unmatched-face and no-face options, and the preview."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from facediffuser_core.faces.detailer import (
    Placement,
    assign_people,
    check_faces_found,
    cosine_to_people,
    detail_picture,
    detail_pictures,
    detail_preview,
    face_crop,
    feather_mask,
    paste_face,
    person_prompt,
    place_faces,
)
from facediffuser_core.errors import FaceDiffuserError, FaceNotFoundError, ReferenceImageError
from facediffuser_core.faces.detection import CropSquare, Face, crop_square
from facediffuser_core.method.subjects import Subject, people_references, photos_of


def exhaustive_assignment(similarity: np.ndarray) -> float:
    """The best total similarity of min(F, P) face-person pairs, by trying every injective map."""
    faces, people = similarity.shape
    if faces >= people:
        return max(sum(similarity[f, p] for p, f in enumerate(chosen)) for chosen in itertools.permutations(range(faces), people))
    return max(sum(similarity[f, p] for f, p in enumerate(chosen)) for chosen in itertools.permutations(range(people), faces))


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (3, 2), (2, 3), (4, 4), (6, 3), (1, 4)])
@pytest.mark.parametrize("seed", range(5))
def test_assignment_is_the_best_one_to_one_match(shape, seed):
    similarity = np.random.default_rng(seed).uniform(-1, 1, shape)
    people = assign_people(torch.from_numpy(similarity))
    chosen = [(face, person) for face, person in enumerate(people) if person is not None]
    assert len(chosen) == min(shape)
    assert len({person for _, person in chosen}) == len(chosen)  # each person at most once
    assert sum(similarity[f, p] for f, p in chosen) == pytest.approx(exhaustive_assignment(similarity), abs=1e-12)


def test_assignment_follows_identity_not_order():
    # the first face (largest) looks like the second person: greedy by position would pair it with the first
    similarity = torch.tensor([[0.5, 0.6], [0.1, 0.55]])
    assert assign_people(similarity) == (0, 1)  # 0.5 + 0.55 beats 0.6 + 0.1
    assert assign_people(torch.tensor([[0.2, 0.9], [0.8, 0.1]])) == (1, 0)
    assert assign_people(torch.zeros(0, 2)) == ()


def test_cosine_to_people_is_the_mean_cosine_over_each_persons_photos():
    rng = np.random.default_rng(0)
    faces = rng.normal(size=(3, 8))
    people = [rng.normal(size=(1, 8)), rng.normal(size=(4, 8))]
    got = cosine_to_people(torch.from_numpy(faces).float(), [torch.from_numpy(p).float() for p in people])
    assert got.dtype == torch.float64 and got.shape == (3, 2)
    for f in range(3):
        for p, photos in enumerate(people):
            cosines = [faces[f] @ photo / np.linalg.norm(faces[f]) / np.linalg.norm(photo) for photo in photos]
            assert float(got[f, p]) == pytest.approx(np.mean(cosines), abs=1e-6)


def test_feather_mask_ramps_linearly_inside_the_square_and_is_zero_outside():
    square = CropSquare(left=2, top=1, size=10)
    mask = feather_mask(square, 14, 16, 0.2).numpy().astype(np.float64)
    expected = np.zeros((14, 16))
    for i in range(14):
        for j in range(16):
            y, x = i + 0.5, j + 0.5
            if 1 <= y <= 11 and 2 <= x <= 12:
                d = min(y - 1, 11 - y, x - 2, 12 - x)
                expected[i, j] = min(1.0, d / 2.0)  # ramp: 0.2 of 10 px
    np.testing.assert_allclose(mask, expected, atol=1e-7)
    assert (mask[1:11, 2:12] > 0).all() and mask[5, 7] == 1.0
    hard = feather_mask(square, 14, 16, 0.0).numpy()
    assert hard[1:11, 2:12].min() == 1.0 and hard.sum() == 100
    with pytest.raises(FaceDiffuserError, match="feather must be in 0..0.5"):
        feather_mask(square, 14, 16, 0.6)


def test_feather_mask_of_a_square_past_the_edge_is_cut_at_the_picture():
    mask = feather_mask(CropSquare(left=-4, top=-4, size=8), 6, 6, 0.0).numpy()
    assert mask[:4, :4].min() == 1.0 and mask[4:, :].max() == 0.0 and mask[:, 4:].max() == 0.0


def test_paste_blends_inside_the_mask_and_keeps_every_other_pixel_bit_for_bit():
    torch.manual_seed(0)
    picture = torch.rand(3, 20, 24)
    square = CropSquare(left=14, top=-2, size=12)  # past the top and right edges
    rendered = torch.rand(1, 12, 12, 3)  # square size: no resize
    mask = feather_mask(square, 20, 24, 0.25)
    out = paste_face(picture, rendered, square, mask)
    outside = mask == 0
    assert torch.equal(out[:, outside], picture[:, outside])
    # independent restatement of the blend in float64: rendered pixel (r, c) lands at (top + r, left + c)
    p, m = picture.double().numpy(), mask.double().numpy()
    for i, j in [(0, 14), (3, 19), (9, 23), (5, 20)]:
        r, c = i - square.top, j - square.left
        expected = p[:, i, j] * (1 - m[i, j]) + rendered[0, r, c].double().numpy() * m[i, j]
        np.testing.assert_allclose(out[:, i, j].double().numpy(), expected, atol=1e-6)


def test_face_crop_is_the_squares_pixels_with_black_past_the_edge():
    picture = torch.rand(3, 10, 10)
    crop = face_crop(picture, CropSquare(left=6, top=-2, size=8), 8)  # same size: no resampling
    assert crop.shape == (1, 8, 8, 3)
    array = picture.permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(crop[0, 2:, :4].numpy(), array[0:6, 6:10])
    assert crop[0, :2].abs().max() == 0 and crop[0, :, 4:].abs().max() == 0


def face(x: float, y: float, side: float) -> Face:
    return Face((x, y, x + side, y + side), 0.99)


def test_place_faces_gives_seeds_by_face_order_and_renders_unmatched_faces_only_when_asked():
    faces = [face(10, 10, 30), face(60, 10, 20), face(10, 60, 15)]
    similarity = torch.tensor([[0.1, 0.7], [0.6, 0.2], [0.3, 0.4]], dtype=torch.float64)
    left = place_faces(faces, similarity, 0.5, "leave it", 100)
    assert [p.person for p in left] == [1, 0, None]
    assert [p.seed for p in left] == [100, 101, 102]
    assert [p.rendered for p in left] == [True, True, False]
    assert left[0].similarity == pytest.approx(0.7) and left[2].similarity == pytest.approx(0.4)  # unmatched: best person
    assert left[1].square == crop_square(faces[1].box, 0.5)
    text = place_faces(faces, similarity, 0.5, "text only", 100)
    assert [p.rendered for p in text] == [True, True, True] and text[2].person is None
    with pytest.raises(FaceDiffuserError, match="if_unmatched must be one of leave it, text only"):
        place_faces(faces, similarity, 0.5, "ignore", 0)


def test_detail_picture_renders_each_face_once_and_changes_nothing_outside_the_squares():
    torch.manual_seed(1)
    picture = torch.rand(48, 64, 3)
    faces = [face(8, 8, 10), face(40, 20, 12)]
    placements = place_faces(faces, torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64), 0.25, "leave it", 7)
    calls = []

    def render(crop: torch.Tensor, placement: Placement) -> torch.Tensor:
        calls.append((crop.shape, placement.person, placement.seed))
        return torch.full_like(crop, 0.25 * (placement.person + 1))

    out, mask = detail_picture(picture, placements, render, 16, 0.1)
    assert calls == [((1, 16, 16, 3), 0, 7), ((1, 16, 16, 3), 1, 8)]
    expected_mask = torch.maximum(*(feather_mask(p.square, 48, 64, 0.1) for p in placements))
    assert torch.equal(mask, expected_mask)
    assert torch.equal(out[mask == 0], picture[mask == 0])
    for placement, value in zip(placements, (0.25, 0.5)):
        full = feather_mask(placement.square, 48, 64, 0.1) == 1
        assert torch.allclose(out[full], torch.full_like(out[full], value), atol=1e-6)
    with pytest.raises(FaceDiffuserError, match="size must be a positive multiple of 8"):
        detail_picture(picture, placements, render, 20, 0.1)


def test_detail_pictures_leaves_unrendered_faces_and_calls_nothing_without_work():
    picture = torch.rand(2, 32, 32, 3)
    placements = [place_faces([face(4, 4, 10)], torch.tensor([[0.5]], dtype=torch.float64), 0.5, "leave it", 0), ()]
    unrendered = [[Placement(p.face, p.person, p.similarity, p.square, False, p.seed) for p in placements[0]], ()]
    out, masks = detail_pictures(picture, unrendered, None, 16, 0.1)
    assert torch.equal(out, picture) and masks.abs().max() == 0 and masks.shape == (2, 32, 32)


def test_check_faces_found_names_the_picture_or_passes_it_through():
    with pytest.raises(FaceNotFoundError, match=r"no face was found in picture 2 of 2 \(batch index 1\).*'pass through'"):
        check_faces_found([[face(0, 0, 30)], []], "error")
    check_faces_found([[face(0, 0, 30)], []], "pass through")
    with pytest.raises(FaceDiffuserError, match="if_no_face must be one of error, pass through"):
        check_faces_found([[]], "skip")


def test_person_prompt_keeps_the_class_word_and_its_marker():
    assert person_prompt("woman") == "a photo of a woman <|image|>"


def test_preview_draws_a_labelled_box_per_face():
    picture = Image.new("RGB", (96, 96), (0, 0, 0))
    placements = [place_faces([face(20, 30, 40)], torch.tensor([[0.1, 0.83]], dtype=torch.float64), 0.5, "leave it", 0)]
    preview = detail_preview([picture], placements, ["man", "woman"])
    assert preview.shape == (1, 96, 96, 3)
    assert preview[0, 50, 20].tolist() == [0.0, 1.0, 0.0]  # the green box's left edge
    assert preview[0, 50, 40].abs().max() == 0  # inside the box: untouched


def test_people_references_split_one_person_per_marker():
    images = torch.rand(2, 8, 8, 3)
    first, second = people_references(images, ("man", "woman"))
    assert torch.equal(first, images[:1]) and torch.equal(second, images[1:])
    subjects = (Subject((images[:1], images), ("a", "b")), Subject((images[1:],), ("c",)))
    people = people_references(subjects, ("man", "woman"))
    assert [len(photos_of(person)) for person in people] == [2, 1]
    with pytest.raises(ReferenceImageError, match=r"marker 2 \('woman'\) has no photo"):
        people_references(images[:1], ("man", "woman"))
