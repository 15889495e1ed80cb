"""The Face Detailer inside an imported ComfyUI, on the suite's random-weight models and the real test
photos: faces given to people by identity (references in the opposite order to the faces), pixels
outside the faces kept bit for bit, denoise 0, repeatability, each face sampled as the Face-diffuser
Sampler samples that crop with that person alone, the no-face and unmatched-face options, batches,
FaceNet matching (on references the subject encoder pairs the other way), the progress bar and the
errors (a missing facenet-pytorch included)."""

from __future__ import annotations

import importlib
import shlex
import sys

import pytest
import torch

from conftest import empty_conditioning, image_tensor
from facediffuser_core.faces.detailer import detail_preview, face_crop, feather_mask, place_faces
from facediffuser_core.faces.detection import crop_faces, detect, load_detector, to_pil_images
from facediffuser_core.faces.identity import cosine_matrix
from facediffuser_core.method.preprocess import resize_square, to_rgb
from facediffuser_core.method.subjects import people_references
from paths import FACES, ROOT

PROMPT = "a man <|image|> and a man <|image|> at a cafe"
ONE_PERSON = "a man <|image|> at a cafe"
SETTINGS = dict(seed=11, steps=2, cfg=5.0, sampler_name="ddim", scheduler="ddim_uniform", denoise=0.5, size=64, margin=0.5, feather=0.15)
HEIGHT = 256


def side_by_side(*photos: torch.Tensor) -> torch.Tensor:
    """IMAGE [1, 256, W, 3]: the photos scaled to 256 px tall, left to right."""
    scaled = [torch.nn.functional.interpolate(p.permute(0, 3, 1, 2), size=(HEIGHT, round(p.shape[2] * HEIGHT / p.shape[1])), mode="bilinear", antialias=True) for p in photos]
    return torch.cat(scaled, dim=3).clamp(0, 1).permute(0, 2, 3, 1).contiguous()


@pytest.fixture(scope="module")
def photos():
    return image_tensor(FACES / "man1.jpeg"), image_tensor(FACES / "man2.jpeg")


@pytest.fixture(scope="module")
def picture(photos):
    """man1 on the left, man2 on the right."""
    return side_by_side(*photos)


@pytest.fixture(scope="module")
def references(photos):
    """Face crops of the original photos as Face Crop makes them: [man1, man2]."""
    detector = load_detector("cpu")
    crops = [crop_faces(photo, [detect(detector, to_pil_images(photo)[0])], size=256).crops for photo in photos]
    return torch.cat(crops)


def detail(comfy, loaded, picture, references, prompt=PROMPT, **overrides):
    """face_detail with the suite's models: (image, masks, preview, placements)."""
    _, sdm, clip, vae, encoder = loaded
    settings = {**SETTINGS, **overrides}
    facenet = settings.pop("facenet_path", None)
    return comfy.detailer.face_detail(
        picture, vae, sdm, clip, encoder, references, prompt, settings["seed"], settings["steps"], settings["cfg"],
        settings["sampler_name"], settings["scheduler"], settings["denoise"], settings["size"], settings["margin"],
        settings["feather"], settings.get("if_unmatched", "leave it"), settings.get("if_no_face", "error"), 512, facenet,
    )  # fmt: skip


def by_position(placements):
    """A picture's placements from left to right."""
    return sorted(placements, key=lambda p: p.face.box[0])


# how a person with several photos could be matched: each face's [F, photos] similarities -> [F]
PHOTO_RULES = {"mean": lambda s: s.mean(dim=1), "first": lambda s: s[:, 0], "max": lambda s: s.max(dim=1).values}


def left_person(similarity: torch.Tensor) -> int:
    """The person (0 or 1) the left face gets when two faces ([left, right] rows) go to two people
    with the largest total similarity."""
    return 0 if similarity[0, 0] + similarity[1, 1] > similarity[0, 1] + similarity[1, 0] else 1


def test_each_face_goes_to_its_own_person_whatever_the_marker_order(comfy, loaded, picture, references):
    (placed,) = detail(comfy, loaded, picture, references, denoise=0.0)[3]
    left, right = by_position(placed)
    assert (left.person, right.person) == (0, 1)
    (placed,) = detail(comfy, loaded, picture, references.flip(0), denoise=0.0)[3]  # references [man2, man1]
    left, right = by_position(placed)
    assert (left.person, right.person) == (1, 0)
    # each face scores lower against the other man's photo (a face left unmatched reports its best
    # similarity, here to the one photo given) than against its own
    left_to_man2 = by_position(detail(comfy, loaded, picture, references[1:], ONE_PERSON, denoise=0.0)[3][0])[0]
    right_to_man1 = by_position(detail(comfy, loaded, picture, references[:1], ONE_PERSON, denoise=0.0)[3][0])[1]
    assert left_to_man2.person is None and right_to_man1.person is None
    assert left_to_man2.similarity < left.similarity and right_to_man1.similarity < right.similarity


def test_people_as_subject_nodes_match_as_images_do(comfy, loaded, picture, references):
    """Subjects (the Face-diffuser Subject chain) instead of images: the same people, the same picture;
    a person with two photos is matched by the mean similarity over them, on photos where the mean,
    the first photo alone and the best photo give different people."""
    subject = comfy.subject.add_subject
    people = subject(subject(None, "average", {"images": references[1:]}), "average", {"images": references[:1]})  # [man2, man1]
    by_images = detail(comfy, loaded, picture, references.flip(0))
    by_subjects = detail(comfy, loaded, picture, people)
    assert torch.equal(by_subjects[0], by_images[0]) and [p.person for p in by_position(by_subjects[3][0])] == [1, 0]
    man1, man2 = references[:1], references[1:]
    # person 1: an even blend of the two men, then man2 darkened; person 2: man1 darkened
    two_photos = subject(subject(None, "average", {"images": (man1 + man2) / 2, "images_2": man2 * 0.5}), "average", {"images": man1 * 0.5})
    encoder = loaded[4]
    embed, people_embeds = comfy.detailer.encoder_embedder(encoder, people_references(two_photos, ["man", "man"]), SETTINGS["margin"], 512)
    faces = sorted(detect(load_detector("cpu"), to_pil_images(picture)[0]), key=lambda face: face.box[0])
    per_photo = [cosine_matrix(embed(picture, 0, faces), photos).double() for photos in people_embeds]  # [left/right face, photo]
    by_rule = {rule: left_person(torch.stack([pick(s) for s in per_photo], dim=1)) for rule, pick in PHOTO_RULES.items()}
    assert by_rule["mean"] != by_rule["first"] and by_rule["mean"] != by_rule["max"], by_rule  # the photos tell the rules apart
    (placed,) = detail(comfy, loaded, picture, two_photos, denoise=0.0)[3]
    assert [p.person for p in by_position(placed)] == [by_rule["mean"], 1 - by_rule["mean"]]


def facenet_similarities(facenet_file, picture: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """[left/right face, reference] float64 cosine of FaceNet embeddings computed here with
    facenet-pytorch alone (MTCNN's 160-px crop of each box, fixed standardisation, the weights read
    from ``facenet_file``): the faces of ``picture`` and the largest face of each reference photo."""
    from facenet_pytorch import InceptionResnetV1
    from facenet_pytorch.models.utils.detect_face import extract_face

    state = torch.load(facenet_file, map_location="cpu", weights_only=True)
    facenet = InceptionResnetV1(classify=True, num_classes=state["logits.weight"].shape[0])
    facenet.load_state_dict(state)
    facenet.classify = False  # the embedding, not the logits
    facenet = facenet.double().eval()
    detector = load_detector("cpu")

    def embed(image, boxes) -> torch.Tensor:
        crops = torch.stack([(extract_face(image, box, 160, 0) - 127.5) / 128 for box in boxes])
        with torch.no_grad():
            return torch.nn.functional.normalize(facenet(crops.double()), dim=1)

    scene = to_pil_images(picture)[0]
    faces = embed(scene, sorted((face.box for face in detect(detector, scene)), key=lambda box: box[0]))
    photos = torch.cat([embed(photo, [detect(detector, photo)[0].box]) for photo in to_pil_images(references)])
    return faces @ photos.T


@pytest.fixture(scope="module")
def swapped_faces(references, picture, facenet_file, comfy, loaded):
    """References on which FaceNet and the subject encoder disagree: [A, B] = man2's crop with man1's
    face pasted in (the middle half of the crop: about the face box at margin 0.5), and man1's crop
    with man2's face. FaceNet sees the face box alone, the encoder the whole crop (hair, background).
    Returns (references, FaceNet's [left/right face, A/B] similarities computed here, the person the
    subject encoder's matching gives the left face)."""
    man1, man2 = references
    middle = slice(64, 192)
    a, b = man2.clone(), man1.clone()
    a[middle, middle], b[middle, middle] = man1[middle, middle], man2[middle, middle]
    swapped = torch.stack([a, b])
    by_encoder = by_position(detail(comfy, loaded, picture, swapped, denoise=0.0)[3][0])
    return swapped, facenet_similarities(facenet_file, picture, swapped), by_encoder[0].person


def test_facenet_matching_pairs_and_scores_the_faces_as_facenet_does(comfy, loaded, picture, swapped_faces, facenet_file):
    """The pairing and similarities the FaceNet matching reports are FaceNet's (computed here with
    facenet-pytorch alone), on references where the subject encoder pairs the faces the other way:
    it fails if the FaceNet file is ignored."""
    swapped, expected, encoders_left = swapped_faces
    facenets_left = left_person(expected)
    assert facenets_left != encoders_left, expected  # the precondition: the two matchers disagree here
    (placed,) = detail(comfy, loaded, picture, swapped, denoise=0.0, facenet_path=str(facenet_file))[3]
    assert [p.person for p in by_position(placed)] == [facenets_left, 1 - facenets_left]
    got = torch.tensor([p.similarity for p in by_position(placed)], dtype=torch.float64)
    assert torch.allclose(got, torch.stack([expected[0, facenets_left], expected[1, 1 - facenets_left]]), atol=1e-5), (got, expected)


def test_the_node_renders_each_face_as_its_persons_with_a_facenet_file_from_its_folder(comfy, loaded, photos, picture, references, swapped_faces, facenet_file, monkeypatch):
    """The node itself (``execute``), FaceNet weights picked by ``facenet_name`` in models/facenet:
    both faces change inside their masks and nothing outside; each face's pixels are those the node
    gives when only its own man is asked for (the other face is then left as it was), and listing the
    men the other way round changes nothing. On references the subject encoder pairs the other way,
    its preview labels each face with FaceNet's person and similarity (computed here)."""
    import folder_paths

    node, folder = comfy.detailer.FaceDiffuserFaceDetailer, comfy.detailer.FACENET_FOLDER
    monkeypatch.setitem(folder_paths.folder_names_and_paths, folder, ([str(facenet_file.parent)], folder_paths.folder_names_and_paths[folder][1]))
    facenet_name = node.define_schema().inputs[-2]
    assert facenet_name.id == "facenet_name" and facenet_file.name in facenet_name.options
    _, sdm, clip, vae, encoder = loaded

    def run(prompt, people, output=slice(0, 2)):
        settings = (SETTINGS["seed"], SETTINGS["steps"], SETTINGS["cfg"], SETTINGS["sampler_name"], SETTINGS["scheduler"], SETTINGS["denoise"], SETTINGS["size"], SETTINGS["margin"], SETTINGS["feather"])
        outputs = node.execute(picture, vae, sdm, clip, encoder, prompt, *settings, "leave it", "error", 512, facenet_file.name, images=people).result
        return [value[0] for value in outputs[output]]

    image, masks = run(PROMPT, references)
    assert torch.equal(image[masks == 0], picture[0][masks == 0])
    assert torch.equal(run(PROMPT, references.flip(0))[0], image)
    split = side_by_side(photos[0]).shape[2]  # where man1's photo ends
    for alone, on_his_side in ((references[:1], lambda column: column < split), (references[1:], lambda column: column > split)):
        own, own_masks = run(ONE_PERSON, alone)
        square = own_masks > 0
        assert on_his_side(torch.nonzero(square)[:, 1].double().mean())  # one square, around this man's face
        assert torch.equal(own[~square], picture[0][~square])  # the other face left as it was
        assert (own[own_masks == 1] - picture[0][own_masks == 1]).abs().max() > 0.05  # re-rendered
        assert torch.equal(image[square], own[square])
    swapped, expected, encoders_left = swapped_faces
    assert left_person(expected) != encoders_left  # the precondition: the two matchers disagree here
    (preview,) = run(PROMPT, swapped, slice(2, 3))
    scene = to_pil_images(picture)[0]
    faces = detect(load_detector("cpu"), scene)  # largest first, as the node numbers them
    left_to_right = sorted(range(len(faces)), key=lambda k: faces[k].box[0])
    by_facenet = place_faces(faces, expected[[left_to_right.index(k) for k in range(len(faces))]], SETTINGS["margin"], "leave it", SETTINGS["seed"])
    assert [p.person for p in by_position(by_facenet)] == [left_person(expected), 1 - left_person(expected)]
    assert torch.equal(preview, detail_preview([scene], [by_facenet], ["man", "man"])[0])  # boxes, "1 man: 0.85" labels


@pytest.fixture(scope="module")
def detailed(comfy, loaded, picture, references):
    """detail() of the picture at the suite's settings, computed once for the module."""
    return detail(comfy, loaded, picture, references)


def test_pixels_outside_the_faces_are_unchanged_and_a_seed_repeats(comfy, loaded, picture, references, detailed):
    image, masks, preview, (placed,) = detailed
    assert image.shape == picture.shape and masks.shape == picture.shape[:3] and preview.shape == picture.shape
    outside = masks[0] == 0
    assert torch.equal(image[0][outside], picture[0][outside])
    for placement in placed:
        square = feather_mask(placement.square, *picture.shape[1:3], 0.15) == 1
        assert (image[0][square] - picture[0][square]).abs().max() > 0.05  # re-rendered
    again = detail(comfy, loaded, picture, references)[0]
    assert torch.equal(again, image)
    assert not torch.equal(detail(comfy, loaded, picture, references, seed=12)[0], image)


def test_denoise_zero_returns_the_input_exactly(comfy, loaded, picture, references):
    image, masks, _, (placed,) = detail(comfy, loaded, picture, references, denoise=0.0)
    assert torch.equal(image, picture) and masks.abs().max() == 0 and len(placed) == 2


@pytest.mark.oldest_host
def test_a_face_is_sampled_as_the_sampler_samples_its_crop_with_that_person_alone(comfy, loaded, picture, references):
    """The right face (man2) with references [man2, man1]: the Face-diffuser Sampler in one stage
    (start_merge = final = 0) on the crop, seeded seed + k (k: the face's rank by size), with
    "a photo of a man <|image|>" and man2's photo only, then resized back into the square."""
    tdm, sdm, clip, vae, encoder = loaded
    image, masks, _, (placed,) = detail(comfy, loaded, picture, references.flip(0))
    right = by_position(placed)[1]
    crop = face_crop(to_rgb(picture)[0], right.square, SETTINGS["size"])
    text, subject = comfy.encode.encode_subjects(clip, encoder, references[1:], "a photo of a man <|image|>", 512)
    latent = {"samples": vae.encode(crop)}
    sampled, _ = comfy.sampler.FaceDiffuserSampler.execute(
        tdm, sdm, text, subject, empty_conditioning(clip), latent, SETTINGS["seed"] + placed.index(right), SETTINGS["steps"], 5.0,
        "ddim", "ddim_uniform", 0.0, 0.0, SETTINGS["denoise"],
    ).result  # fmt: skip
    decoded = vae.decode(sampled["samples"]).float()
    expected = resize_square(decoded.permute(0, 3, 1, 2), right.square.size)[0].clamp(0, 1).permute(1, 2, 0)
    full = feather_mask(right.square, *picture.shape[1:3], 0.15) == 1
    rows, columns = torch.nonzero(full, as_tuple=True)
    got = image[0, rows, columns]
    want = expected[rows - right.square.top, columns - right.square.left]
    assert (got - want).abs().max() <= 1e-5
    # with the other person's photo the crop comes out different: the conditioning is that person's
    other_text, other_subject = comfy.encode.encode_subjects(clip, encoder, references[:1], "a photo of a man <|image|>", 512)
    other, _ = comfy.sampler.FaceDiffuserSampler.execute(
        tdm, sdm, other_text, other_subject, empty_conditioning(clip), latent, SETTINGS["seed"] + placed.index(right), SETTINGS["steps"], 5.0,
        "ddim", "ddim_uniform", 0.0, 0.0, SETTINGS["denoise"],
    ).result  # fmt: skip
    assert (vae.decode(other["samples"]).float() - decoded).abs().max() > 1e-3


def test_a_picture_without_a_face_stops_or_passes_through(comfy, loaded, references):
    blank = torch.full((1, 128, 128, 3), 0.4)
    with pytest.raises(ValueError, match="no face was found in picture 1 of 1") as raised:  # the pack's FaceNotFoundError
        detail(comfy, loaded, blank, references)
    assert type(raised.value).__name__ == "FaceNotFoundError"
    image, masks, _, placements = detail(comfy, loaded, blank, references, if_no_face="pass through")
    assert torch.equal(image, blank) and masks.abs().max() == 0 and placements == [()]


def test_a_face_that_matches_nobody_is_left_or_rendered_from_the_text(comfy, loaded, picture, references):
    one_person = ONE_PERSON
    image, masks, _, (placed,) = detail(comfy, loaded, picture, references[1:], prompt=one_person)  # man2 only
    left, right = by_position(placed)
    assert (left.person, left.rendered, right.person, right.rendered) == (None, False, 0, True)
    left_square = feather_mask(left.square, *picture.shape[1:3], 0.15) > 0
    assert masks[0][left_square].max() == 0 and torch.equal(image[0][left_square], picture[0][left_square])
    image, masks, _, (placed,) = detail(comfy, loaded, picture, references[1:], prompt=one_person, if_unmatched="text only")
    left = by_position(placed)[0]
    assert left.rendered and left.person is None
    full = feather_mask(left.square, *picture.shape[1:3], 0.15) == 1
    assert masks[0][full].min() == 1 and (image[0][full] - picture[0][full]).abs().max() > 0.05


def test_a_batch_is_detailed_picture_by_picture(comfy, loaded, photos, picture, references, detailed):
    swapped = side_by_side(photos[1], photos[0])
    assert swapped.shape == picture.shape
    batch = detail(comfy, loaded, torch.cat([picture, swapped]), references)
    alone = [detailed, detail(comfy, loaded, swapped, references)]
    assert torch.equal(batch[0], torch.cat([a[0] for a in alone])) and torch.equal(batch[1], torch.cat([a[1] for a in alone]))
    assert [p.person for p in by_position(batch[3][1])] == [1, 0]


def test_progress_counts_every_faces_steps(comfy, loaded, picture, references, monkeypatch):
    import comfy.utils as utils

    updates = []
    monkeypatch.setattr(utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None: updates.append((value, total)))
    detail(comfy, loaded, picture, references, steps=3)
    assert updates[-1] == (6, 6) and [v for v, _ in updates] == sorted(v for v, _ in updates)


def test_cancel_stops_the_detailer_at_the_next_step(comfy, loaded, picture, references, monkeypatch):
    """ComfyUI's Cancel (its interrupt flag) raised during the first face's first step stops the node
    at the next step: no second face is sampled and the flag is cleared for the next prompt."""
    import comfy.utils as utils

    mm = comfy.model_management
    updates = []

    def cancel_once(value, total, preview, node_id=None):
        updates.append(value)
        if len(updates) == 1:
            mm.interrupt_current_processing(True)

    monkeypatch.setattr(utils, "PROGRESS_BAR_HOOK", cancel_once)
    with pytest.raises(mm.InterruptProcessingException):
        detail(comfy, loaded, picture, references, steps=3)
    assert updates == [1] and not mm.processing_interrupted()


def test_node_errors_name_the_node_and_the_fix(comfy, loaded, picture, references, monkeypatch):
    _, sdm, clip, vae, encoder = loaded
    node = comfy.detailer.FaceDiffuserFaceDetailer
    args = (picture, vae, sdm, clip, encoder, PROMPT, 0, 2, 5.0, "ddim", "ddim_uniform", 0.5, 64, 0.5, 0.15, "leave it", "error", 512, comfy.detailer.MATCH_BY_SUBJECT_ENCODER)
    with pytest.raises(ValueError, match=r"^Face-diffuser Face Detailer: marker 2 \('man'\) has no photo"):
        node.execute(*args, images=references[:1])
    with pytest.raises(ValueError, match="^Face-diffuser Face Detailer: connect images"):
        node.execute(*args)
    no_marker = list(args)
    no_marker[5] = "a man at a cafe"
    with pytest.raises(ValueError, match="^Face-diffuser Face Detailer: the prompt marks no person"):
        node.execute(*no_marker, images=references)
    # without facenet-pytorch: the pip of the Python running ComfyUI (not a bare pip) and install.py
    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)
    importlib.import_module("facediffuser_pack.facediffuser_core.faces.detection").load_detector.cache_clear()  # loaded again by the next test
    with pytest.raises(Exception) as raised:
        node.execute(*args, images=references)
    pip, install = shlex.join([sys.executable, "-m", "pip", "install", "--no-deps", "facenet-pytorch"]), shlex.join([sys.executable, str(ROOT / "install.py")])
    assert type(raised.value).__name__ == "MissingDependencyError" and str(raised.value).startswith("Face-diffuser Face Detailer: face detection and identity scores need facenet-pytorch")
    assert f"into the Python that runs ComfyUI with `{pip}` (or run the pack's install.py with that Python: `{install}`)" in str(raised.value)
