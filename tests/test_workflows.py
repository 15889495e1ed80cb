"""The shipped workflows: UI and API formats agree, graphs are well-formed, prompts match images."""

import pytest

from facediffuser_core.method.prompt import parse_prompt
from workflow_format import API_WORKFLOWS, BYPASS, DEPRECATED_NODES, FRONTEND_ONLY, REPO, WIDGETS, WORKFLOWS, load, ui_to_api, workflow_pairs

PAIRS = workflow_pairs()
MODEL_FILES = {"facediffuser_sdm.safetensors", "facediffuser_tdm.safetensors"}


def test_every_workflow_has_both_formats():
    assert len(PAIRS) >= 3
    assert {p.name for p in WORKFLOWS.glob("*.json")} == {p.name for p in API_WORKFLOWS.glob("*.json")}
    names = {p.stem for p, _ in PAIRS}
    assert {"facediffuser_one_subject", "facediffuser_two_subjects", "facediffuser_guider_custom_sampler", "facediffuser_two_photos", "facediffuser_scene_checkpoint", "facediffuser_fastcomposer", "facediffuser_face_detailer", "facediffuser_two_regions", "facediffuser_two_people_pose", "facediffuser_into_a_photo"} <= names


@pytest.mark.parametrize("ui_path, api_path", PAIRS, ids=[p.stem for p, _ in PAIRS])
def test_ui_and_api_formats_agree(ui_path, api_path):
    api = {key: {"class_type": node["class_type"], "inputs": node["inputs"]} for key, node in load(api_path).items()}
    assert ui_to_api(load(ui_path)) == api


@pytest.mark.parametrize("ui_path", [p for p, _ in PAIRS], ids=[p.stem for p, _ in PAIRS])
def test_ui_graph_is_well_formed(ui_path):
    ui = load(ui_path)
    nodes = {node["id"]: node for node in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"]) and ui["last_node_id"] >= max(nodes)
    assert ui["last_link_id"] >= max(link[0] for link in ui["links"])
    for link_id, origin, slot, target, target_slot, kind in ui["links"]:
        output = nodes[origin]["outputs"][slot]
        assert link_id in output["links"] and output["type"] == kind
        socket = nodes[target]["inputs"][target_slot]
        # a link's type is the output's; an input taking several types lists them ("LATENT,IMAGE")
        assert socket["link"] == link_id and kind in socket["type"].split(",")
    linked = {link[0] for link in ui["links"]}
    for node in nodes.values():
        assert node["type"] in WIDGETS or node["type"] in FRONTEND_ONLY
        # an unconnected (optional) input is saved with link null, as the frontend does
        assert all(s["link"] is None or s["link"] in linked for s in node["inputs"]), f"node {node['id']} has a dangling input"
        assert all(set(o["links"]) <= linked for o in node["outputs"])


@pytest.mark.parametrize("ui_path, api_path", PAIRS, ids=[p.stem for p, _ in PAIRS])
def test_models_are_the_converted_files_the_readme_names(ui_path, api_path):
    api = load(api_path)
    loaders = [n for n in api.values() if n["class_type"] == "FaceDiffuserLoader"]
    assert len(loaders) == 1
    readme = (REPO / "README.md").read_text()
    assert all(name in readme for name in MODEL_FILES)
    if loaders[0]["inputs"]["sdm_name"] == "fastcomposer.safetensors":  # FastComposer's one model, no TDM
        assert "fastcomposer.safetensors" in readme and loaders[0]["inputs"]["tdm_name"] == "none (another scene model)"
        assert {n["class_type"] for n in api.values()} >= {"FastComposerGuider"} and not any("FaceDiffuser" + kind in {n["class_type"] for n in api.values()} for kind in ("Guider", "Sampler"))
        return
    assert loaders[0]["inputs"]["sdm_name"] == "facediffuser_sdm.safetensors"
    if loaders[0]["inputs"]["tdm_name"] == "facediffuser_tdm.safetensors":
        return
    # no TDM loaded: an SD1.5 checkpoint (through a LoRA) is the scene model of every Face-diffuser sampler
    assert loaders[0]["inputs"]["tdm_name"] == "none (another scene model)"
    samplers = [n for n in api.values() if n["class_type"] in ("FaceDiffuserSampler", "FaceDiffuserGuider")]
    assert samplers
    for sampler in samplers:
        source = api[sampler["inputs"]["tdm"][0]]
        while source["class_type"] == "LoraLoader":
            source = api[source["inputs"]["model"][0]]
        assert source["class_type"] == "CheckpointLoaderSimple" and source["inputs"]["ckpt_name"] in readme


# The ComfyUI web UI 1.49.6 (missingModelMetadata-*.js) offers a missing model for download when a node's
# properties.models has an entry whose name is the widget's value, whose url starts with one of these and
# whose name ends with one of these. The official Face-diffuser, FastComposer and FaceNet files are
# none of them (.bin on the hub, .pt on GitHub): only the scene checkpoint's and the ControlNet's entries qualify.
WEB_UI_DOWNLOAD_SOURCES = ("https://civitai.com/", "https://civitai.red/", "https://huggingface.co/", "http://localhost:")
WEB_UI_DOWNLOAD_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pth", ".pt")
WEB_UI_MODEL_FOLDERS = {"CheckpointLoaderSimple": "checkpoints", "ControlNetLoader": "controlnet"}  # node -> the folder its file goes in


@pytest.mark.parametrize("ui_path", [ui for ui, _ in PAIRS], ids=[p.stem for p, _ in PAIRS])
def test_model_download_entries_follow_the_web_uis_rules(ui_path):
    graph = load(ui_path)
    for node in graph["nodes"]:
        entries = node.get("properties", {}).get("models", [])
        if node["type"] in WEB_UI_MODEL_FOLDERS:
            assert entries, f"{node['type']}'s file can be offered for download: say where it is"
        for entry in entries:
            assert set(entry) == {"name", "url", "directory"} and entry["directory"] == WEB_UI_MODEL_FOLDERS[node["type"]]
            assert entry["name"] in node["widgets_values"] and entry["url"].endswith("/" + entry["name"])
            assert entry["url"].startswith(WEB_UI_DOWNLOAD_SOURCES) and entry["name"].endswith(WEB_UI_DOWNLOAD_SUFFIXES)
    assert "models" not in graph  # per node, as ComfyUI's own templates carry them


def test_the_scene_checkpoint_workflow_encodes_the_scene_prompts_with_the_scene_models_clip():
    api = load(API_WORKFLOWS / "facediffuser_scene_checkpoint.json")
    (sampler,) = [n["inputs"] for n in api.values() if n["class_type"] == "FaceDiffuserSampler"]
    scene = sampler["tdm"][0]  # the checkpoint itself: its LoRA is bypassed as shipped
    assert api[scene]["class_type"] == "CheckpointLoaderSimple" and sampler["tdm"][1] == 0
    assert not [n for n in api.values() if n["class_type"] == "LoraLoader"]
    for name in ("scene_positive", "scene_negative"):
        assert api[sampler[name][0]]["class_type"] == "CLIPTextEncode" and api[sampler[name][0]]["inputs"]["clip"] == [scene, 1]
    (encoder,) = [n["inputs"] for n in api.values() if n["class_type"] == "FaceDiffuserSubjectEncode"]
    scene_prompt = api[sampler["scene_positive"][0]]["inputs"]["text"]
    assert "<|image|>" not in scene_prompt and encoder["prompt"].replace(" <|image|>", "") in scene_prompt


def test_the_scene_checkpoint_workflows_lora_is_bypassed_with_a_note_and_un_bypassing_puts_it_on_the_scene_model():
    """The template needs no LoRA file (none is downloadable for it): its LoRA loader ships bypassed,
    a Note says how to use one, and un-bypassing the node (Ctrl+B, mode 0) puts the LoRA between the
    checkpoint and everything that uses the scene model or its CLIP."""
    ui = load(WORKFLOWS / "facediffuser_scene_checkpoint.json")
    (lora,) = [n for n in ui["nodes"] if n["type"] == "LoraLoader"]
    assert lora["mode"] == BYPASS
    notes = [n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "Note"]
    assert any("bypassed" in text and "Ctrl+B" in text and "models/loras" in text for text in notes)
    lora["mode"] = 0
    api = ui_to_api(ui)
    key = str(lora["id"])
    assert api[key]["class_type"] == "LoraLoader" and api[api[key]["inputs"]["model"][0]]["class_type"] == "CheckpointLoaderSimple"
    assert api[key]["inputs"]["clip"] == [api[key]["inputs"]["model"][0], 1]
    (sampler,) = [n["inputs"] for n in api.values() if n["class_type"] == "FaceDiffuserSampler"]
    assert sampler["tdm"] == [key, 0]
    for name in ("scene_positive", "scene_negative"):
        assert api[sampler[name][0]]["inputs"]["clip"] == [key, 1]
    shipped = load(API_WORKFLOWS / "facediffuser_scene_checkpoint.json")
    assert {k: v for k, v in api.items() if k != key} != shipped and set(api) - set(shipped) == {key}


@pytest.mark.parametrize("ui_path", [p for p, _ in PAIRS], ids=[p.stem for p, _ in PAIRS])
def test_every_workflow_has_a_note_naming_the_load_image_nodes_for_your_own_photos(ui_path):
    """The template runs on the example pictures the pack copies into ComfyUI's input folder
    (workflows/inputs/); one Note, above the photos, names each Load Image node a user points at
    their own photos (and the pose), by its title on the canvas."""
    ui = load(ui_path)
    (note,) = [n for n in ui["nodes"] if n["type"] == "Note" and n["title"] == "Your photos"]
    text = note["widgets_values"][0]
    loads = [n for n in ui["nodes"] if n["type"] == "LoadImage"]
    assert loads and all(f"• {n['title']}" in text.splitlines() for n in loads)
    assert all((WORKFLOWS / "inputs" / n["widgets_values"][0]).is_file() for n in loads)  # the pack ships what it opens
    assert "example portraits" in text and "input folder" in text
    # placed in the free corner above the photos: it overlaps no node
    x, y, w, h = *note["pos"], *note["size"]
    title = 30
    for node in ui["nodes"]:
        if node is not note:
            nx, ny, nw, nh = *node["pos"], *node["size"]
            assert x + w <= nx or nx + nw <= x or y + h <= ny - title or ny + nh <= y - title, f"the note overlaps node {node['id']}"


def canonical(api: dict, link: list):
    """The graph upstream of a link as a nested tuple, free of node ids."""
    node = api[link[0]]
    inputs = tuple(sorted((name, canonical(api, value) if isinstance(value, list) else value) for name, value in node["inputs"].items()))
    return (node["class_type"], inputs, link[1])


PHOTO_INPUTS = ("images", "images_2", "images_3", "images_4")  # Face-diffuser Subject's


def loaded_photos(api: dict, source: list) -> list[str]:
    """The Load Image files behind an IMAGE link (through Face Crops), in batch order."""
    node = api[source[0]]
    if node["class_type"] == "LoadImage":
        return [node["inputs"]["image"]]
    if node["class_type"] == "FaceDiffuserFaceCrop":  # one crop per photo
        return loaded_photos(api, node["inputs"]["images"])
    raise AssertionError(f"unexpected image source {node['class_type']}")


def count_images(api: dict, source: list) -> int:
    return len(loaded_photos(api, source))


def subject_chain(api: dict, source: list) -> list[dict]:
    """The Face-diffuser Subject nodes of a chain, first marker first, from the link of its last one."""
    node = api[source[0]]
    assert node["class_type"] == "FaceDiffuserSubject" and source[1] == 0
    previous = node["inputs"].get("previous_subjects")
    return [*(subject_chain(api, previous) if previous else []), node]


def photos_of_subjects(api: dict, source: list) -> list[list[str]]:
    """The photo files of each person of a chain of Face-diffuser Subject nodes, in marker order."""
    return [[photo for name in PHOTO_INPUTS if name in node["inputs"] for photo in loaded_photos(api, node["inputs"][name])] for node in subject_chain(api, source)]


def photos_per_subject(api: dict, source: list) -> list[int]:
    """The photo count of each person of a chain of Face-diffuser Subject nodes, in marker order."""
    return [len(photos) for photos in photos_of_subjects(api, source)]


def subject_photo_counts(api: dict, encoder: dict) -> list[int]:
    """Photos per marker that a Subject Encode node receives: its images, one per marker; or its subjects."""
    inputs = encoder["inputs"]
    assert ("images" in inputs) != ("subjects" in inputs), "Subject Encode takes images or subjects, one of them"
    if "images" in inputs:
        return [1] * count_images(api, inputs["images"])
    return photos_per_subject(api, inputs["subjects"])


@pytest.mark.parametrize("api_path", [a for _, a in PAIRS], ids=[p.stem for p, _ in PAIRS])
def test_prompts_mark_one_subject_per_reference_image(api_path, clip_tokenize):
    api = load(api_path)
    encoders = [n for n in api.values() if n["class_type"] == "FaceDiffuserSubjectEncode"]
    assert encoders
    for encoder in encoders:
        parsed = parse_prompt(encoder["inputs"]["prompt"], clip_tokenize)
        counts = subject_photo_counts(api, encoder)
        assert parsed.num_subjects == len(counts) >= 1 and min(counts) >= 1


def test_the_multi_photo_workflow_gives_one_person_two_photos_of_different_sizes():
    api = load(API_WORKFLOWS / "facediffuser_two_photos.json")
    (encoder,) = [n for n in api.values() if n["class_type"] == "FaceDiffuserSubjectEncode"]
    assert subject_photo_counts(api, encoder) == [2]
    (subject,) = [n for n in api.values() if n["class_type"] == "FaceDiffuserSubject"]
    # two Load Image nodes on two inputs: photos of different sizes cannot share one IMAGE batch
    crops = [api[subject["inputs"][name][0]] for name in ("images", "images_2")]  # each photo cropped on its own
    assert [api[crop["inputs"]["images"][0]]["inputs"]["image"] for crop in crops] == ["face_1.png", "face_2.png"]


TWO_PEOPLE = ["facediffuser_two_subjects", "facediffuser_two_regions", "facediffuser_two_people_pose", "facediffuser_face_detailer", "facediffuser_into_a_photo"]


@pytest.mark.parametrize("name", TWO_PEOPLE)
def test_two_people_come_as_one_subject_node_each_chained_in_marker_order(name):
    """Each face crop goes into its own Face-diffuser Subject node, titled after its marker; the first
    node's subjects go into the second's previous_subjects, the second's into Subject Encode (and the
    Face Detailer): face_1 is the person of the first <|image|>, face_2 of the second."""
    api = load(API_WORKFLOWS / f"{name}.json")
    (encode,) = [n["inputs"] for n in api.values() if n["class_type"] == "FaceDiffuserSubjectEncode"]
    assert "images" not in encode and photos_of_subjects(api, encode["subjects"]) == [["face_1.png"], ["face_2.png"]]
    chain = subject_chain(api, encode["subjects"])
    assert [node["_meta"]["title"] for node in chain] == ["Person of the 1st <|image|>", "Person of the 2nd <|image|>"]
    for node in chain:  # one photo, its crop in images; no region of its own (regions, where any, come as Subject Encode's masks)
        assert set(node["inputs"]) - {"previous_subjects"} == {"images", "combine"} and node["inputs"]["combine"] == "average"
    assert len([n for n in api.values() if n["class_type"] == "FaceDiffuserSubject"]) == 2
    ui = load(WORKFLOWS / f"{name}.json")
    crops = {n["id"]: n["title"] for n in ui["nodes"] if n["type"] == "FaceDiffuserFaceCrop"}
    subjects = {n["id"]: n["title"] for n in ui["nodes"] if n["type"] == "FaceDiffuserSubject"}
    # on the canvas: crop -> Person of the same marker
    pairs = sorted((crops[origin], subjects[target]) for _, origin, _, target, _, _ in ui["links"] if origin in crops and target in subjects)
    assert pairs == [("Crop face of the 1st <|image|>", "Person of the 1st <|image|>"), ("Crop face of the 2nd <|image|>", "Person of the 2nd <|image|>")]


@pytest.mark.parametrize("ui_path, api_path", PAIRS, ids=[p.stem for p, _ in PAIRS])
def test_no_workflow_uses_a_node_comfyui_marks_deprecated(ui_path, api_path):
    used = {n["type"] for n in load(ui_path)["nodes"]} | {n["class_type"] for n in load(api_path).values()}
    assert not used & DEPRECATED_NODES, f"{ui_path.name} uses {sorted(used & DEPRECATED_NODES)}, which the web UI shows as [DEPR]"
    assert not set(WIDGETS) & DEPRECATED_NODES  # the widget table lists what the workflows may use


def test_the_fastcomposer_workflow_has_fastcomposers_settings():
    api = load(API_WORKFLOWS / "facediffuser_fastcomposer.json")
    (guider,) = [n["inputs"] for n in api.values() if n["class_type"] == "FastComposerGuider"]
    assert (guider["cfg"], guider["start_merge"]) == (5.0, 0.2)  # step 10 of 50
    assert api[guider["model"][0]]["class_type"] == "FaceDiffuserLoader" and guider["model"][1] == 1  # its sdm output
    (encoder,) = [n["inputs"] for n in api.values() if n["class_type"] == "FaceDiffuserSubjectEncode"]
    assert encoder["object_resolution"] == 224 and api[guider["negative"][0]]["inputs"]["text"] == ""
    scheduler = next(n["inputs"] for n in api.values() if n["class_type"] == "BasicScheduler")
    sampler = next(n["inputs"] for n in api.values() if n["class_type"] == "KSamplerSelect")
    assert (sampler["sampler_name"], scheduler["scheduler"], scheduler["steps"]) == ("ddim", "ddim_uniform", 50)


def test_the_face_detailer_workflow_details_the_sampled_picture_with_the_same_people_and_prompt():
    api = load(API_WORKFLOWS / "facediffuser_face_detailer.json")
    (detailer,) = [n["inputs"] for n in api.values() if n["class_type"] == "FaceDiffuserFaceDetailer"]
    (encode,) = [n["inputs"] for n in api.values() if n["class_type"] == "FaceDiffuserSubjectEncode"]
    assert detailer["subjects"] == encode["subjects"] and detailer["prompt"] == encode["prompt"]  # the same Subject chain
    assert "images" not in detailer and "images" not in encode
    assert detailer["clip"] == encode["clip"] and detailer["subject_encoder"] == encode["subject_encoder"]
    assert api[detailer["image"][0]]["class_type"] == "VAEDecode"
    (save,) = [n["inputs"] for n in api.values() if n["class_type"] == "SaveImage"]
    assert api[save["images"][0]]["class_type"] == "FaceDiffuserFaceDetailer"
    # the rest is the two-subject workflow, unchanged
    two = load(API_WORKFLOWS / "facediffuser_two_subjects.json")
    samplers = [next([key, 0] for key, n in graph.items() if n["class_type"] == "FaceDiffuserSampler") for graph in (api, two)]
    assert canonical(api, samplers[0]) == canonical(two, samplers[1])


def test_the_regions_workflow_places_each_marker_in_its_region_with_a_preview():
    api = load(API_WORKFLOWS / "facediffuser_two_regions.json")
    (encode,) = [n["inputs"] for n in api.values() if n["class_type"] == "FaceDiffuserSubjectEncode"]
    regions = api[encode["masks"][0]]
    assert regions["class_type"] == "FaceDiffuserRegions" and encode["masks"][1] == 0  # its masks output
    settings = regions["inputs"]
    assert settings["people"] == encode["prompt"].count("<|image|>") == len(subject_photo_counts(api, {"inputs": encode})) == 2
    assert settings["prompt"] == encode["prompt"] and settings["layout"] == "columns"
    (latent,) = [key for key, n in api.items() if n["class_type"] == "EmptyLatentImage"]
    assert settings["size_from"] == [latent, 0]  # the masks take the latent's size: they cannot mismatch it
    previews = [n["inputs"]["images"] for n in api.values() if n["class_type"] == "PreviewImage"]
    assert [encode["masks"][0], 1] in previews  # the regions preview is shown


def test_the_pose_workflow_puts_the_pose_controlnet_on_every_conditioning_and_takes_the_regions_from_the_same_pose():
    api = load(API_WORKFLOWS / "facediffuser_two_people_pose.json")
    (encode_id,) = [key for key, n in api.items() if n["class_type"] == "FaceDiffuserSubjectEncode"]
    encode = api[encode_id]["inputs"]
    (apply_id,) = [key for key, n in api.items() if n["class_type"] == "FaceDiffuserApplyControlNet"]
    control = api[apply_id]["inputs"]
    (sampler,) = [n["inputs"] for n in api.values() if n["class_type"] == "FaceDiffuserSampler"]
    negative = api[control["negative"][0]]
    assert (control["text"], control["subject"]) == ([encode_id, 0], [encode_id, 1]) and negative["class_type"] == "CLIPTextEncode"
    assert (sampler["text"], sampler["subject"], sampler["negative"]) == ([apply_id, 0], [apply_id, 1], [apply_id, 2])
    assert (control["strength"], control["start_percent"], control["end_percent"]) == (1.0, 0.0, 1.0)
    assert api[control["control_net"][0]]["inputs"] == {"control_net_name": "control_v11p_sd15_openpose_fp16.safetensors"}
    pose = api[control["image"][0]]
    assert pose["class_type"] == "LoadImage" and (WORKFLOWS / "inputs" / pose["inputs"]["image"]).is_file()  # shipped with the example inputs
    regions = api[encode["masks"][0]]["inputs"]
    assert regions["layout"] == "pose" and regions["pose"] == control["image"]  # the regions come from the pose the ControlNet follows
    assert regions["people"] == encode["prompt"].count("<|image|>") == len(subject_photo_counts(api, {"inputs": encode})) == 2
    assert regions["prompt"] == encode["prompt"]
    # the masks take the latent's size (as the ControlNet stretches the pose to it): changing the Empty
    # Latent Image's size or aspect ratio cannot make them mismatch the picture
    (latent,) = [key for key, n in api.items() if n["class_type"] == "EmptyLatentImage"]
    assert regions["size_from"] == [latent, 0]
    previews = [n["inputs"]["images"] for n in api.values() if n["class_type"] == "PreviewImage"]
    assert [encode["masks"][0], 1] in previews


def test_the_into_a_photo_workflow_repaints_only_the_peoples_boxes_of_your_picture_and_keeps_the_rest():
    """Your picture (Load Image, scaled to 512 wide, aspect kept) encoded; the regions take the encoded
    latent's size (they cannot mismatch it); their union is the noise mask the sampler (denoise 1.0)
    repaints, each person confined to their box by Subject Encode's masks; the decoded picture is
    composited over yours through the same union, so every other pixel is yours."""
    api = load(API_WORKFLOWS / "facediffuser_into_a_photo.json")
    (photo_id,) = [key for key, n in api.items() if n["class_type"] == "LoadImage" and not n["inputs"]["image"].startswith("face_")]
    assert (WORKFLOWS / "inputs" / api[photo_id]["inputs"]["image"]).is_file()
    (scale_id,) = [key for key, n in api.items() if n["class_type"] == "ImageScale"]
    assert api[scale_id]["inputs"] == {"image": [photo_id, 0], "upscale_method": "lanczos", "width": 512, "height": 0, "crop": "disabled"}
    (encode_id,) = [key for key, n in api.items() if n["class_type"] == "VAEEncode"]
    assert api[encode_id]["inputs"]["pixels"] == [scale_id, 0]
    (encode,) = [n["inputs"] for n in api.values() if n["class_type"] == "FaceDiffuserSubjectEncode"]
    regions = api[encode["masks"][0]]["inputs"]
    assert regions["size_from"] == [encode_id, 0] and regions["layout"] == "boxes" and regions["prompt"] == encode["prompt"]
    assert regions["people"] == encode["prompt"].count("<|image|>") == 2
    (union_id,) = [key for key, n in api.items() if n["class_type"] == "FaceDiffuserRegionsUnion"]
    assert api[union_id]["inputs"] == {"masks": encode["masks"]}
    (sampler,) = [n["inputs"] for n in api.values() if n["class_type"] == "FaceDiffuserSampler"]
    noise_mask = api[sampler["latent_image"][0]]
    assert noise_mask["class_type"] == "SetLatentNoiseMask" and noise_mask["inputs"] == {"samples": [encode_id, 0], "mask": [union_id, 0]}
    assert sampler["denoise"] == 1.0
    (save,) = [n["inputs"] for n in api.values() if n["class_type"] == "SaveImage"]
    composite = api[save["images"][0]]
    assert composite["class_type"] == "ImageCompositeMasked"
    assert composite["inputs"]["destination"] == [scale_id, 0] and composite["inputs"]["mask"] == [union_id, 0]
    assert api[composite["inputs"]["source"][0]]["class_type"] == "VAEDecode" and (composite["inputs"]["x"], composite["inputs"]["y"]) == (0, 0)


# what generate does to each --face photo (facediffuser_core.commands.generate: reference_png with the defaults)
GENERATE_CROP = {"face_index": 0, "margin": 0.5, "size": 512, "if_no_face": "error"}


@pytest.mark.parametrize("api_path", [a for _, a in PAIRS], ids=[p.stem for p, _ in PAIRS])
def test_every_face_photo_is_cropped_as_generate_crops_it(api_path):
    """The GUI and the command give the same picture from the same photo: each face Load Image goes
    through its own Face Crop with generate's settings, and nothing else takes the photo uncropped."""
    api = load(api_path)
    faces = {key for key, n in api.items() if n["class_type"] == "LoadImage" and n["inputs"]["image"].startswith("face_")}
    assert faces
    users = [(n["class_type"], value) for n in api.values() for value in n["inputs"].values() if isinstance(value, list) and value[0] in faces]
    assert sorted(value[0] for _, value in users) == sorted(faces) and {kind for kind, _ in users} == {"FaceDiffuserFaceCrop"}
    for node in api.values():
        if node["class_type"] == "FaceDiffuserFaceCrop":
            assert {k: v for k, v in node["inputs"].items() if k != "images"} == GENERATE_CROP


def test_the_crop_settings_are_generates_defaults():
    from facediffuser_core.faces.detection import DEFAULT_CROP_SIZE, DEFAULT_MARGIN, IF_NO_FACE

    assert (GENERATE_CROP["margin"], GENERATE_CROP["size"], GENERATE_CROP["if_no_face"]) == (DEFAULT_MARGIN, DEFAULT_CROP_SIZE, IF_NO_FACE[0])



def test_the_into_a_photo_workflows_picture_is_drawn_by_its_script(tmp_path):
    """workflows/inputs/photo_park.png is what tools/draw_example_photo.py draws (nobody's photo ships)."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    subprocess.run([sys.executable, str(REPO / "tools" / "draw_example_photo.py"), "-o", str(tmp_path)], check=True, capture_output=True)
    drawn, shipped = (np.asarray(Image.open(folder / "photo_park.png")) for folder in (tmp_path, WORKFLOWS / "inputs"))
    assert drawn.shape == (512, 512, 3) and np.array_equal(drawn, shipped)
