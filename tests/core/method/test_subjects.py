"""Several photos per subject: the combination of image embeddings against a float64 restatement,
bit-identity with the one-image-per-marker path, where the combination happens (before the postfuse
MLP), and the errors that name the marker."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import factories
from paths import FACES
from facediffuser_core.errors import ReferenceImageError
from facediffuser_core.method.preprocess import preprocess_references
from facediffuser_core.method.subject_encoder import SubjectEncoder
from facediffuser_core.method.subjects import COMBINE_MODES, Subject, check_subjects, combine_embeddings

WORDS = ("man", "woman")


def reference_combine(embeds: np.ndarray, mode: str) -> np.ndarray:
    """The two modes restated in float64 numpy: the mean of the rows; or the mean of the rows scaled
    to unit length, given the rows' mean length."""
    e = embeds.astype(np.float64)
    if mode == "average":
        return e.sum(axis=0) / e.shape[0]
    lengths = np.sqrt((e * e).sum(axis=1))
    mean_unit = (e / lengths[:, None]).sum(axis=0) / e.shape[0]
    return mean_unit / np.sqrt((mean_unit * mean_unit).sum()) * lengths.mean()


def random_embeds(count: int, width: int = 768, seed: int = 0) -> torch.Tensor:
    """Rows of very different lengths (0.5 to 20), so the two modes disagree."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(count, width, generator=generator)
    return rows * torch.linspace(0.5, 20.0, count).unsqueeze(1)


@pytest.mark.parametrize("mode", COMBINE_MODES)
@pytest.mark.parametrize("count", [2, 3, 7])
def test_combination_matches_a_float64_restatement(mode: str, count: int) -> None:
    embeds = random_embeds(count, seed=count)
    combined = combine_embeddings(embeds, mode)
    expected = reference_combine(embeds.numpy(), mode)
    assert combined.shape == (768,) and combined.dtype == torch.float32
    # float32 sums of 768-wide rows: relative error ~1e-7; 1e-5 of the largest entry is ample and
    # far below the 2-mode difference asserted below
    np.testing.assert_allclose(combined.double().numpy(), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_the_modes_differ_where_the_photos_differ() -> None:
    embeds = random_embeds(3)
    average, normed = combine_embeddings(embeds, "average"), combine_embeddings(embeds, "norm average")
    lengths = embeds.norm(dim=-1)
    assert normed.norm().item() == pytest.approx(lengths.mean().item(), rel=1e-5)
    assert average.norm().item() < 0.9 * lengths.mean().item()  # the plain mean of differing rows is shorter
    assert (average - normed).abs().max().item() > 0.1


@pytest.mark.parametrize("mode", COMBINE_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_one_photo_is_its_embedding_bit_for_bit(mode: str, dtype: torch.dtype) -> None:
    embeds = random_embeds(1).to(dtype)
    combined = combine_embeddings(embeds, mode)
    assert combined.dtype == dtype and torch.equal(combined, embeds[0])


@pytest.mark.parametrize("mode", COMBINE_MODES)
def test_half_precision_embeddings_combine_in_float32(mode: str) -> None:
    embeds = random_embeds(4).half()
    combined = combine_embeddings(embeds, mode)
    assert combined.dtype == torch.float16
    assert torch.equal(combined, combine_embeddings(embeds.float(), mode).half())


@pytest.fixture(scope="module")
def encoder() -> SubjectEncoder:
    return factories.subject_encoder("tiny", seed=4).eval()


@pytest.fixture(scope="module")
def text_cond() -> torch.Tensor:
    return torch.randn(1, 77, factories.TINY_WIDTH, generator=torch.Generator().manual_seed(1))


def photo(name: str) -> torch.Tensor:
    """A shared test photo as a ComfyUI IMAGE [1,H,W,3] (man1 is 1080x607, man2 554x704)."""
    with Image.open(FACES / name) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).unsqueeze(0)


def subject(*photos: torch.Tensor, combine: str = "average") -> Subject:
    return Subject(photos, tuple(f"batch {i + 1}" for i in range(len(photos))), combine)


@pytest.mark.parametrize("mode", COMBINE_MODES)
def test_one_photo_per_subject_is_the_one_image_path_bit_for_bit(encoder: SubjectEncoder, text_cond: torch.Tensor, mode: str) -> None:
    face = photo("man1.jpeg")
    images = torch.cat([face, face.flip(2)])  # two people, one batch: the existing path
    positions = (2, 6)
    with torch.no_grad():
        one_image_path = encoder(text_cond, images, positions)
        subjects_path = encoder(text_cond, [subject(face, combine=mode), subject(face.flip(2), combine=mode)], positions)
    assert torch.equal(subjects_path, one_image_path)
    assert not torch.equal(one_image_path[:, 2], one_image_path[:, 6])  # two different people were fused


def test_photos_of_different_sizes_are_combined_before_the_postfuse_mlp(encoder: SubjectEncoder, text_cond: torch.Tensor) -> None:
    """Person 1: man1 (1080x607) + a batch of two 64x48 photos, norm average; person 2: man2 alone.
    Expected: every photo embedded on its own, person 1's three embeddings combined by the float64
    restatement, then the postfuse MLP once per person."""
    first, small, second = photo("man1.jpeg"), torch.rand(2, 64, 48, 3, generator=torch.Generator().manual_seed(5)), photo("man2.jpeg")
    positions = (3, 7)
    with torch.no_grad():
        out = encoder(text_cond, [subject(first, small, combine="norm average"), subject(second)], positions, 512, WORDS)
        own = [encoder.embed(preprocess_references(image)) for image in (first, small[:1], small[1:], second)]
        person1 = torch.from_numpy(reference_combine(torch.cat(own[:3]).numpy(), "norm average")).float()
        expected = encoder.postfuse_module(text_cond, torch.stack([person1, own[3][0]]), positions)
        fused_each = [encoder.postfuse_module(text_cond, embed, positions[:1])[0, 3] for embed in own[:3]]
        after_mlp = torch.stack(fused_each).mean(dim=0)  # had the fused outputs been combined instead
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)  # measured: 2.4e-7 (float32 batch vs single)
    changed = (out != text_cond).any(dim=-1)[0]
    assert changed.nonzero().flatten().tolist() == list(positions)
    # the tiny random encoder's photos embed alike (cosine 0.99), yet the other order is 100x the tolerance off
    assert (out[0, 3] - after_mlp).abs().max() > 10 * 1e-5


def test_each_subject_keeps_its_own_mode(encoder: SubjectEncoder, text_cond: torch.Tensor) -> None:
    photos = (photo("man1.jpeg"), photo("man2.jpeg"))
    with torch.no_grad():
        average = encoder.embed_subjects([subject(*photos), subject(*photos, combine="norm average")])
        own = torch.cat([encoder.embed(preprocess_references(image)) for image in photos]).numpy()
    for row, mode in zip(average, ("average", "norm average")):
        np.testing.assert_allclose(row.double().numpy(), reference_combine(own, mode), rtol=0, atol=1e-4)


ERRORS = [
    pytest.param(1, r"^marker 2 \('woman'\) has no photo: the prompt marks 2 subject\(s\) .* but 1 subject\(s\) were given; give one subject per marker", id="marker-without-photo"),
    pytest.param(
        3,
        r"^3 subject\(s\) were given but the prompt marks only 2 subject\(s\) with <\|image\|> \(marker 1 \('man'\), marker 2 \('woman'\)\): subject 3 has no marker",
        id="more-subjects-than-markers",
    ),
]


@pytest.mark.parametrize(("count", "message"), ERRORS)
def test_subject_count_errors_name_the_marker(encoder: SubjectEncoder, text_cond: torch.Tensor, count: int, message: str) -> None:
    subjects = [subject(torch.rand(1, 32, 32, 3))] * count
    with pytest.raises(ReferenceImageError, match=message):
        encoder(text_cond, subjects, (2, 5), 512, WORDS)


def test_an_empty_batch_is_an_error_naming_the_marker(encoder: SubjectEncoder, text_cond: torch.Tensor) -> None:
    subjects = [subject(torch.rand(1, 32, 32, 3)), subject(torch.rand(2, 32, 32, 3), torch.zeros(0, 40, 40, 3))]
    with pytest.raises(ReferenceImageError, match=r"^marker 2 \('woman'\): the photos in batch 2 are an empty batch \(0 images\); connect at least one photo"):
        encoder(text_cond, subjects, (2, 5), 512, WORDS)


def test_a_subject_without_photos_is_an_error_naming_the_marker() -> None:
    with pytest.raises(ReferenceImageError, match=r"^marker 1 \('man'\) has no photo: its subject has no photo batch"):
        check_subjects([subject()], 1, WORDS[:1])


def test_markers_are_numbered_without_words() -> None:
    with pytest.raises(ReferenceImageError, match=r"^marker 2 has no photo"):
        check_subjects([subject(torch.rand(1, 8, 8, 3))], 2)


def test_subject_refuses_an_unknown_mode_and_non_batches() -> None:
    with pytest.raises(ReferenceImageError, match=r"combine must be one of average, norm average, got 'median'"):
        subject(torch.rand(1, 8, 8, 3), combine="median")
    with pytest.raises(ReferenceImageError, match=r"the photos in batch 1 must be an IMAGE batch \[N,H,W,C\], got \(8, 8, 3\)"):
        subject(torch.rand(8, 8, 3))
