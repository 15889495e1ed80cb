"""Identity Preservation: FaceNet loading, the plumbing from photo to score against an independent
pipeline built from facenet-pytorch itself (random weights: the plumbing, not the accuracy), cosine
similarities in float64, and greedy matching on hand-built similarity matrices."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from facediffuser_core.errors import CheckpointError, FaceNotFoundError
from facediffuser_core.faces.detection import load_detector, pil_to_image
from facediffuser_core.faces.identity import (
    IdentityScore,
    Match,
    annotate_identity,
    cosine_matrix,
    embed_faces,
    greedy_match,
    load_facenet,
    reference_embeddings,
    score_identity,
)
from malicious import CodeRunningPickle

MAN1, MAN2, ASTRONAUT = range(3)  # indices into the face_photos fixture


@pytest.fixture(scope="module")
def facenet(facenet_file):
    return load_facenet(facenet_file)


@pytest.fixture(scope="module")
def detector():
    return load_detector("cpu")


@pytest.fixture(scope="module")
def oracle(facenet_file):
    """FastComposer's pipeline written directly with facenet-pytorch: MTCNN(...)(image) crops and an
    InceptionResnetV1 loaded by hand; embeddings returned as float64 numpy arrays."""
    from facenet_pytorch import MTCNN, InceptionResnetV1

    mtcnn = MTCNN(image_size=160, margin=0, min_face_size=20, thresholds=[0.6, 0.7, 0.7], factor=0.709, post_process=True, keep_all=True)
    model = InceptionResnetV1(classify=True, num_classes=8631)
    model.load_state_dict(torch.load(facenet_file, weights_only=True))
    model.classify = False
    model.eval()

    def embed(image: Image.Image, count: int) -> np.ndarray:
        faces = mtcnn(image)
        if faces is None:
            return np.zeros((0, 512))
        with torch.no_grad():
            return model(faces[:count]).double().numpy()

    return embed


def oracle_greedy(similarity: np.ndarray) -> dict[int, tuple[int, float]]:
    """reference -> (face, similarity), by repeatedly taking the global maximum (a plain loop)."""
    matrix = similarity.astype(np.float64).copy()
    found = {}
    while matrix.size and np.isfinite(matrix).any():
        face, reference = np.unravel_index(np.argmax(np.where(np.isfinite(matrix), matrix, -np.inf)), matrix.shape)
        found[int(reference)] = (int(face), float(similarity[face, reference]))
        matrix[face, :] = -np.inf
        matrix[:, reference] = -np.inf
    return found


def two_faces(face_photos) -> Image.Image:
    """A 'generated' image with two faces: the astronaut's (small, left) and man2's (large, right)."""
    canvas = Image.new("RGB", (450, 352), (128, 128, 128))
    canvas.paste(face_photos[ASTRONAUT].crop((150, 30, 300, 200)), (0, 100))
    canvas.paste(face_photos[MAN2].resize((277, 352)), (173, 0))
    return canvas


def test_facenet_loads_every_tensor_and_returns_unit_embeddings(facenet, facenet_file):
    saved = torch.load(facenet_file, weights_only=True)
    loaded = facenet.state_dict()
    assert set(loaded) == set(saved) and "logits.weight" in saved
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert not facenet.training and not facenet.classify
    embeddings = embed_faces(facenet, torch.rand(3, 3, 160, 160) * 2 - 1)
    assert embeddings.shape == (3, 512)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(3), atol=1e-5)


def test_facenet_from_safetensors_without_the_classifier(facenet, facenet_file, tmp_path):
    state = {k: v for k, v in torch.load(facenet_file, weights_only=True).items() if not k.startswith("logits.")}
    save_file(state, str(tmp_path / "facenet.safetensors"))
    other = load_facenet(tmp_path / "facenet.safetensors")
    faces = torch.rand(2, 3, 160, 160) * 2 - 1
    assert torch.allclose(embed_faces(other, faces), embed_faces(facenet, faces), atol=1e-6)


def test_facenet_file_errors(facenet_file, tmp_path):
    with pytest.raises(CheckpointError, match=r"no such FaceNet file; download 20180402-114759-vggface2.pt from https://github.com/timesler/facenet-pytorch"):
        load_facenet(tmp_path / "missing.pt")
    state = torch.load(facenet_file, weights_only=True)
    del state["last_bn.running_mean"]
    torch.save(state, tmp_path / "incomplete.pt")
    with pytest.raises(CheckpointError, match=r"not a FaceNet InceptionResnetV1 state dict \(1 tensors missing, e.g. \['last_bn.running_mean'\]"):
        load_facenet(tmp_path / "incomplete.pt")
    state = torch.load(facenet_file, weights_only=True)
    state["last_linear.weight"] = torch.zeros(128, 1792)
    torch.save(state, tmp_path / "resized.pt")
    with pytest.raises(CheckpointError, match=r"does not fit FaceNet InceptionResnetV1 \(.*last_linear.weight.*20180402-114759-vggface2.pt"):
        load_facenet(tmp_path / "resized.pt")


def test_a_pickle_that_runs_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"  # the payload creates it (test_checkpoints shows it does when unpickled)
    path = tmp_path / "evil.pt"
    torch.save({"x": CodeRunningPickle(marker), "logits.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=r"evil.pt was refused: loading it would run code \((builtins\.)?exec\)"):
        load_facenet(path)
    assert not marker.exists()


def test_single_subject_score_matches_the_independent_pipeline(facenet, detector, oracle, face_photos):
    reference = face_photos[MAN1]
    generated = face_photos[MAN1].transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((540, 304))
    references = reference_embeddings(facenet, detector, [reference])
    score = score_identity(facenet, detector, references, generated)
    expected = float(oracle(generated, 1)[0] @ oracle(reference, 1)[0])
    assert score.matches == (Match(0, 0, pytest.approx(expected, abs=1e-5)),)
    assert score.score == pytest.approx(max(expected, 0), abs=1e-5)
    assert len(score.faces) == 1
    other = score_identity(facenet, detector, references, face_photos[MAN2])
    assert other.score < score.score  # with calibrated random weights, another man is less similar


@pytest.mark.parametrize(
    "order",
    [(MAN2, ASTRONAUT), (ASTRONAUT, MAN2), (ASTRONAUT, MAN1, MAN2)],
    ids=["two-in-order", "two-swapped", "three-references-two-faces"],
)
def test_multi_subject_matching_matches_the_independent_pipeline(order, facenet, detector, oracle, face_photos):
    generated = two_faces(face_photos)
    references = reference_embeddings(facenet, detector, [face_photos[i] for i in order])
    score = score_identity(facenet, detector, references, generated)
    reference_embeds = np.concatenate([oracle(face_photos[i], 1) for i in order])
    similarity = oracle(generated, len(order)) @ reference_embeds.T  # float64, [faces, references]
    expected = oracle_greedy(similarity)
    assert len(score.faces) == 2 and similarity.shape == (2, len(order))
    for match in score.matches:
        if match.reference in expected:
            face, value = expected[match.reference]
            assert match.face == face and match.similarity == pytest.approx(value, abs=1e-5)
        else:
            assert match.face is None and match.similarity == 0.0
    values = [expected[r][1] if r in expected else 0.0 for r in range(len(order))]
    assert score.score == pytest.approx(max(min(values), 0.0), abs=1e-5)
    if len(order) == 2:  # the right faces: man2 is the large face 0, the astronaut the small face 1
        assert {match.reference: match.face for match in score.matches} == {order.index(MAN2): 0, order.index(ASTRONAUT): 1}
    else:
        assert score.score == 0.0 and sum(match.face is None for match in score.matches) == 1


def test_an_image_without_faces_scores_zero(facenet, detector, face_photos):
    references = reference_embeddings(facenet, detector, face_photos[:2])
    score = score_identity(facenet, detector, references, Image.new("RGB", (128, 128), (90, 90, 90)))
    assert score.faces == () and score.score == 0.0
    assert score.matches == (Match(0, None, 0.0), Match(1, None, 0.0))
    assert score.describe() == "IP 0.000 [ref 1: no face, ref 2: no face; 0 face(s) found]"


def test_a_reference_without_a_face_is_an_error(facenet, detector, face_photos):
    with pytest.raises(FaceNotFoundError, match="no face was found in reference image 2 of 2"):
        reference_embeddings(facenet, detector, [face_photos[MAN1], Image.new("RGB", (64, 64))])


def test_cosine_matrix_against_float64_by_hand():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 16, generator=generator) * 3, torch.randn(3, 16, generator=generator)
    a64, b64 = a.double().numpy(), b.double().numpy()
    expected = np.array([[x @ y / np.sqrt(x @ x) / np.sqrt(y @ y) for y in b64] for x in a64])
    assert np.allclose(cosine_matrix(a, b).numpy(), expected, atol=1e-6)


@pytest.mark.parametrize(
    "matrix, expected",
    [
        # greedy takes 0.9 first and is left with 0.1, although 0.8 + 0.85 would be the best assignment
        ([[0.9, 0.8], [0.85, 0.1]], [(0, 0.9), (1, 0.1)]),
        ([[0.2, 0.7], [0.6, 0.3], [0.5, 0.65]], [(1, 0.6), (0, 0.7)]),  # 3 faces, 2 references
        ([[0.3, 0.5, 0.4]], [(None, 0.0), (0, 0.5), (None, 0.0)]),  # 1 face, 3 references
        ([[-0.2, -0.4]], [(0, -0.2), (None, 0.0)]),
        (np.zeros((0, 2)), [(None, 0.0), (None, 0.0)]),  # no face
    ],
)
def test_greedy_matching_by_hand(matrix, expected):
    matches = greedy_match(torch.tensor(np.asarray(matrix, dtype=np.float32)))
    assert [(m.face, m.similarity) for m in matches] == [(face, pytest.approx(value)) for face, value in expected]
    assert [m.reference for m in matches] == list(range(len(expected)))


def test_greedy_matching_agrees_with_the_plain_loop_on_random_matrices():
    rng = np.random.default_rng(0)
    for faces, references in itertools.product(range(1, 5), range(1, 5)):
        for _ in range(5):
            similarity = rng.uniform(-1, 1, (faces, references))
            expected = oracle_greedy(similarity)
            matches = greedy_match(torch.tensor(similarity))
            assert {m.reference: (m.face, m.similarity) for m in matches if m.face is not None} == {
                r: (f, pytest.approx(v)) for r, (f, v) in expected.items()
            }


def test_separation_is_own_minus_the_best_other_person_by_hand():
    matches = greedy_match(torch.tensor([[0.9, 0.8, 0.2], [0.85, 0.1, 0.3]], dtype=torch.float64))
    # face 0 -> person 0 (0.9; others 0.8, 0.2), face 1 -> person 2 (0.3; others 0.85, 0.1): a face nearer another person
    assert [(m.face, m.other) for m in matches] == [(0, pytest.approx(0.8)), (None, None), (1, pytest.approx(0.85))]
    assert matches[0].separation == pytest.approx(0.1) and matches[2].separation == pytest.approx(-0.55) and matches[1].separation is None
    (alone,) = greedy_match(torch.tensor([[0.7]]))
    assert alone.other is None and alone.separation is None  # one person: nobody to be separated from


def test_separation_agrees_with_a_float64_loop_on_random_matrices():
    rng = np.random.default_rng(1)
    for faces, references in itertools.product(range(1, 5), range(2, 5)):
        similarity = rng.uniform(-1, 1, (faces, references))
        for match in greedy_match(torch.tensor(similarity, dtype=torch.float32)):
            if match.face is None:
                assert match.other is None
                continue
            row = similarity[match.face]
            best_other = max(row[r] for r in range(references) if r != match.reference)
            assert match.separation == pytest.approx(row[match.reference] - best_other, abs=1e-6)


def test_identity_score_is_the_clamped_minimum():
    assert IdentityScore((Match(0, 0, 0.6), Match(1, 1, 0.4)), ()).score == pytest.approx(0.4)
    assert IdentityScore((Match(0, 0, -0.3),), ()).score == 0.0
    assert IdentityScore((Match(0, 0, 0.7), Match(1, None, 0.0)), ()).score == 0.0


def test_annotation_boxes_matched_faces_green_and_others_grey(facenet, detector, face_photos):
    generated = two_faces(face_photos)
    references = reference_embeddings(facenet, detector, [face_photos[MAN2]])  # one reference, two faces
    score = score_identity(facenet, detector, references, generated)
    assert score.matches[0].face == 0  # only the largest face is used for one reference
    drawn = pil_to_image([annotate_identity(generated, score)])[0]
    original = pil_to_image([generated])[0]
    for face, colour in zip(score.faces, ([0.0, 1.0, 0.0], [160 / 255] * 3)):
        x1, y1, x2, _ = (int(v) for v in face.box)  # PIL draws from the whole pixels the box starts in
        row = drawn[y1, x1 + 4 : x2 - 4]
        assert torch.allclose(row, torch.tensor(colour).expand_as(row), atol=1e-6)
    assert torch.equal(drawn[-5:, :5], original[-5:, :5])
