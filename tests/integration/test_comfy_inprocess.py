"""The nodes' code inside an imported ComfyUI: parity with the headless sampler, stage mapping for
every kind of sampler, model loading and ComfyUI's real SD1 tokenizer."""

from __future__ import annotations

import pytest
import torch

from comfy_inprocess import headless_reference, run_guider
from conftest import image_tensor
from facediffuser_core.method.guidance import Conditionings
from facediffuser_core.method.schedule import bounds_from_fractions, stage_at, step_index
from paths import FACES


@pytest.mark.oldest_host
def test_guider_in_comfy_ddim_matches_the_headless_sampler(comfy, loaded, conditionings):
    """Same UNets, noise and conditionings; 5 steps cover all three stages (bounds 2 / 3: three scene
    steps, one fusion step, one subject step; a step count that divides 1000, so that ComfyUI's
    ddim_uniform sigmas are DDIM's timesteps).

    Step mapping: ComfyUI's "ddim" is Euler on the ddim_uniform sigmas (t = 981, 961, ... 1), which
    is DDIM written in sigma space, with two differences handled here: it starts from
    sigma(981) * noise, i.e. sqrt(1 - alphabar_981) * noise in DDIM's space, and its last step goes
    to sigma 0 (the predicted x0) where DDIM with set_alpha_to_one=False stops at alphabar_0.
    So the headless sampler starts from the scaled noise and its final predicted x0 is compared."""
    tdm, sdm, *_ = loaded
    text, subject, negative = conditionings
    steps = 5
    guider = comfy.guider.build_guider(tdm, sdm, text, subject, negative, 5.0, 0.3, 0.6)
    comfy_latent, noise, _ = run_guider(comfy, guider, steps)
    conds = Conditionings(negative[0][0], text[0][0], subject[0][0])

    bounds = bounds_from_fractions(steps, 0.3, 0.6)
    assert (bounds.start_merge_step, bounds.final_step) == (2, 3)
    reference = headless_reference(comfy, tdm, sdm, conds, noise, steps, 5.0, bounds)
    scale = reference.abs().max().item()
    difference = (comfy_latent - reference).abs().max().item()
    assert difference <= 2e-3 * scale, f"max |difference| {difference:.3g} vs max |latent| {scale:.3g}"
    off_by_one = type(bounds)(bounds.start_merge_step + 1, bounds.final_step)  # stage mapping off by one
    shifted = headless_reference(comfy, tdm, sdm, conds, noise, steps, 5.0, off_by_one)
    assert (comfy_latent - shifted).abs().max().item() > 10 * max(difference, 1e-6 * scale)


@pytest.fixture
def recorded_calls(comfy, loaded, monkeypatch):
    """Replace UNet evaluations by x0 = x / 2 and record (model, sigma) of each."""
    tdm, sdm, *_ = loaded
    calls = []
    names = {id(tdm.model): "tdm", id(sdm.model): "sdm"}

    def fake_calc_cond_batch(model, conds, x, timestep, model_options):
        calls.append((names[id(model)], float(timestep[0]), len(conds)))
        return [x / 2 for _ in conds]

    monkeypatch.setattr(comfy.samplers, "calc_cond_batch", fake_calc_cond_batch)
    return calls


@pytest.mark.oldest_host
@pytest.mark.parametrize(
    "sampler, scheduler, denoise",
    [
        ("euler", "normal", 1.0),
        ("ddim", "ddim_uniform", 1.0),
        ("euler_ancestral", "karras", 1.0),
        ("heun", "normal", 1.0),
        ("dpm_2", "karras", 1.0),
        ("dpmpp_2m", "karras", 1.0),
        ("dpmpp_sde", "normal", 1.0),
        ("uni_pc", "simple", 1.0),
        ("lcm", "sgm_uniform", 1.0),
        ("euler", "normal", 0.5),
    ],
)
def test_stages_follow_the_sigma_schedule_for_every_sampler(comfy, loaded, conditionings, recorded_calls, sampler, scheduler, denoise):
    tdm, sdm, *_ = loaded
    steps = 20
    guider = comfy.guider.build_guider(tdm, sdm, *conditionings, 5.0, 0.3, 0.6)
    _, _, sigmas = run_guider(comfy, guider, steps, sampler, scheduler, denoise, size=8)
    bounds = bounds_from_fractions(steps)
    assert (bounds.start_merge_step, bounds.final_step) == (6, 12)
    grid = sigmas.tolist()
    by_sigma = {}
    for model, sigma, count in recorded_calls:
        assert count == 2  # each model: one batched call with its two conditionings
        by_sigma.setdefault(sigma, set()).add(model)
    for sigma, models in by_sigma.items():
        stage = stage_at(step_index(sigma, sigmas), bounds)
        assert models == {"scene": {"tdm"}, "fusion": {"tdm", "sdm"}, "subject": {"sdm"}}[stage.value]
    tdm_sigmas = [s for m, s, _ in recorded_calls if m == "tdm"]
    sdm_sigmas = [s for m, s, _ in recorded_calls if m == "sdm"]
    # the TDM never runs past step 12's interval, the SDM never before step 7's noise level
    assert min(tdm_sigmas) > grid[13] * (1 + 1e-4) and max(sdm_sigmas) <= grid[7] * (1 + 1e-4)
    if sampler in ("euler", "ddim", "euler_ancestral", "lcm"):  # one evaluation per step, on the grid
        assert tdm_sigmas == pytest.approx(grid[:13]) and sdm_sigmas == pytest.approx(grid[7:20])


def test_both_unets_load_in_one_model_management_call(comfy, loaded, conditionings, recorded_calls, monkeypatch):
    tdm, sdm, *_ = loaded
    loads = []
    original = comfy.model_management.load_models_gpu

    def recording(models, *args, **kwargs):
        loads.append({id(m.model) for m in models})
        return original(models, *args, **kwargs)

    monkeypatch.setattr(comfy.model_management, "load_models_gpu", recording)
    guider = comfy.guider.build_guider(tdm, sdm, *conditionings, 5.0, 0.3, 0.6)
    run_guider(comfy, guider, 4, size=8)
    assert any({id(tdm.model), id(sdm.model)} <= ids for ids in loads)
    assert tdm.model.current_patcher is None and sdm.model.current_patcher is None  # both cleaned up


def test_guider_refuses_one_model_on_both_inputs(comfy, loaded, conditionings):
    tdm, sdm, *_ = loaded
    with pytest.raises(ValueError, match="tdm and sdm are the same model"):
        comfy.guider.build_guider(sdm, sdm.clone(), *conditionings, 5.0, 0.3, 0.6)


def test_guider_refuses_mismatched_model_sampling(comfy, loaded, conditionings):
    import comfy_extras.nodes_model_advanced as advanced

    tdm, sdm, *_ = loaded
    (v_prediction,) = advanced.ModelSamplingDiscrete().patch(tdm, "v_prediction", False)
    with pytest.raises(ValueError, match="different model sampling"):
        comfy.guider.build_guider(v_prediction, sdm, *conditionings, 5.0, 0.3, 0.6)


@pytest.mark.parametrize(
    "prompt",
    [
        "a photo of a man <|image|> in a garden",
        "A Man <|image|>, smiling, and a woman <|image|> at a café!",
        "an astronaut <|image|> riding a horse, photorealistic, 8k",
        "(a man:1.2) <|image|> in a park",
    ],
)
def test_comfy_tokenizer_positions_match_the_clip_bpe(comfy, loaded, clip_tokenize, prompt):
    from facediffuser_core.method.prompt import parse_prompt

    clip = loaded[2]
    ours = parse_prompt(prompt, comfy.encode.comfy_tokenizer(clip))
    plain = parse_prompt(prompt.replace("(a man:1.2)", "a man"), clip_tokenize)
    assert ours.positions == plain.positions
    first_chunk = clip.tokenize(ours.text)["l"][0]
    assert [first_chunk[p][0] for p in ours.positions] == [plain.token_ids[p - 1] for p in plain.positions]


def test_subject_conditioning_changes_only_marked_tokens_even_past_77_tokens(comfy, loaded, face):
    _, _, clip, _, encoder = loaded
    filler = ", ".join(["highly detailed photograph"] * 20)
    text, subject = comfy.encode.encode_subjects(clip, encoder, face, f"a man <|image|> in a garden, {filler}", 512)
    text_cond, subject_cond = text[0][0], subject[0][0]
    assert text_cond.shape == subject_cond.shape and text_cond.shape[1] >= 154
    changed = (text_cond - subject_cond).abs().amax(dim=-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == [2]  # BOS, "a", "man"


@pytest.mark.oldest_host
def test_subject_encoder_runs_under_model_management(comfy, loaded, face, monkeypatch):
    _, _, clip, _, encoder = loaded
    loads = []
    original = comfy.model_management.load_models_gpu
    # every load funnels through load_models_gpu: ComfyUI 0.3.75's CLIP.load_model calls load_model_gpu
    # (which calls it), 0.33's calls it directly
    monkeypatch.setattr(comfy.model_management, "load_models_gpu", lambda models, *a, **k: (loads.extend(models), original(models, *a, **k))[1])
    comfy.encode.encode_subjects(clip, encoder, face, "a man <|image|>", 512)
    assert encoder.patcher in loads and clip.patcher in loads  # each loaded through ComfyUI
    assert next(encoder.encoder.parameters()).device == encoder.patcher.load_device


def test_marked_word_past_the_first_chunk_is_an_error(comfy, loaded, face):
    _, _, clip, _, encoder = loaded
    filler = " ".join(["red"] * 80)
    with pytest.raises(ValueError, match="within the first 75 tokens"):
        comfy.encode.encode_subjects(clip, encoder, face, f"{filler} a man <|image|>", 512)


def subject_chain(comfy, *people: dict) -> tuple:
    """The subjects output of Face-diffuser Subject nodes chained in order, one per ``people`` entry
    (that node's inputs)."""
    subjects = None
    for inputs in people:
        (subjects,) = comfy.subject.FaceDiffuserSubject.execute(**{"combine": "average", **inputs}, previous_subjects=subjects).args
    return subjects


def encode_node(comfy, loaded, prompt: str, **references):
    _, _, clip, _, encoder = loaded
    return comfy.encode.FaceDiffuserSubjectEncode.execute(clip=clip, subject_encoder=encoder, prompt=prompt, object_resolution=512, **references).args


TWO_PEOPLE = "a man <|image|> and a woman <|image|> in a garden"


@pytest.mark.parametrize("combine", ["average", "norm average"])
def test_one_photo_per_subject_through_the_nodes_is_bit_identical_to_images(comfy, loaded, face, combine):
    people = torch.cat([face, face.flip(2)])  # two people, same size: one batch on the existing images input
    text, subject = encode_node(comfy, loaded, TWO_PEOPLE, images=people)
    subjects = subject_chain(comfy, {"images": face, "combine": combine}, {"images": face.flip(2), "combine": combine})
    chained_text, chained_subject = encode_node(comfy, loaded, TWO_PEOPLE, subjects=subjects)
    for old, new in ((text, chained_text), (subject, chained_subject)):
        assert torch.equal(new[0][0], old[0][0]) and torch.equal(new[0][1]["pooled_output"], old[0][1]["pooled_output"])
    assert not torch.equal(subject[0][0], text[0][0])


def test_two_photos_of_different_sizes_through_the_nodes(comfy, loaded):
    """man1 (1080x607) on images, man2 (554x704) on images_2: one person whose image embedding is the
    mean of the two photos' (restated in float64), fused by the postfuse MLP into 'man'."""
    from facediffuser_core.method.preprocess import preprocess_references

    first, second = image_tensor(FACES / "man1.jpeg"), image_tensor(FACES / "man2.jpeg")
    encoder = loaded[4].encoder
    prompt, man = "a photo of a man <|image|> in a garden", 5  # BOS a photo of a man
    text, subject = encode_node(comfy, loaded, prompt, subjects=subject_chain(comfy, {"images": first, "images_2": second}))
    with torch.no_grad():
        own = torch.cat([encoder.embed(preprocess_references(image)) for image in (first, second)]).double()
        expected = encoder.postfuse_module(text[0][0], (own.sum(dim=0) / 2).float()[None], [man])
    torch.testing.assert_close(subject[0][0], expected, rtol=0, atol=1e-5)  # measured 5e-7: float32 batch vs single, mean
    single = encode_node(comfy, loaded, prompt, images=first)[1]
    assert (subject[0][0][0, man] - single[0][0][0, man]).abs().max() > 1e-2  # the second photo counts


NODE_ERRORS = [
    pytest.param({"subjects": "one"}, TWO_PEOPLE, "Face-diffuser Subject Encode: marker 2 ('woman') has no photo: the prompt marks 2 subject(s)", id="marker-without-photo"),
    pytest.param(
        {"subjects": "two"},
        "a man <|image|> in a garden",
        "Face-diffuser Subject Encode: 2 subject(s) were given but the prompt marks only 1 subject(s) with <|image|> (marker 1 ('man')): subject 2 has no marker",
        id="more-subjects-than-markers",
    ),
    pytest.param(
        {"subjects": "empty"},
        TWO_PEOPLE,
        "Face-diffuser Subject Encode: marker 2 ('woman'): the photos in input images_2 of its Face-diffuser Subject node are an empty batch (0 images)",
        id="empty-batch",
    ),
    pytest.param({}, TWO_PEOPLE, "Face-diffuser Subject Encode: connect images (one photo per <|image|> marker) or subjects", id="neither"),
    pytest.param({"images": True, "subjects": "two"}, TWO_PEOPLE, "Face-diffuser Subject Encode: connect either images", id="both"),
]


@pytest.mark.parametrize(("references", "prompt", "message"), NODE_ERRORS)
def test_subject_errors_name_the_node_and_the_marker(comfy, loaded, face, references, prompt, message):
    chains = {
        "one": [{"images": face}],
        "two": [{"images": face}, {"images": face}],
        "empty": [{"images": face}, {"images": face, "images_2": face[:0]}],
    }
    inputs = {}
    if "subjects" in references:
        inputs["subjects"] = subject_chain(comfy, *chains[references["subjects"]])
    if "images" in references:
        inputs["images"] = torch.cat([face, face])
    with pytest.raises(ValueError) as error:
        encode_node(comfy, loaded, prompt, **inputs)
    assert str(error.value).startswith(message), str(error.value)
