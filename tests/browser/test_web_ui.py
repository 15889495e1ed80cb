"""The shipped workflows in ComfyUI's real web UI (Chromium, headless): opened from the template
browser in a ComfyUI that has only the pack and the models (the example pictures come from the pack),
they show no missing nodes, inputs or bad widget values, convert to exactly the shipped API files and
run from the Run button to an image; they are listed in the template browser, and every node's help
page opens.

The Run button test is also the suite's run of every shipped API file through a server: the UI sends
exactly that file (at test size), and the test checks what the server made of it."""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image

from comfy_page import ComfyPage, save_thumbnail
from harness import PACK_NAME, status_message
from workflow_format import API_WORKFLOWS, BYPASS, FRONTEND_ONLY, REPO, WORKFLOWS, load

NAMES = [path.stem for path in sorted(WORKFLOWS.glob("*.json"))]
DOCS = REPO / "web" / "docs"
SIZE = 64  # image pixels: an 8x8 latent keeps SD1.5-sized UNets quick on a CPU
STEPS = 3
SMALL = {
    "EmptyLatentImage": {"width": SIZE, "height": SIZE},
    "FaceDiffuserRegions": {"width": SIZE, "height": SIZE},
    "ImageScale": {"width": SIZE},  # your picture (square in the template) at SIZE wide
    "FaceDiffuserSampler": {"steps": STEPS},
    "BasicScheduler": {"steps": STEPS},
    "FaceDiffuserFaceDetailer": {"steps": STEPS, "size": SIZE},
}
RUN_TIMEOUT = 600  # seconds; a run takes about a minute on 2 CPU cores, most of it loading the models


def expected_prompt(name: str, changes: dict | None = None) -> dict:
    """The shipped API file (with ``changes`` applied the way set_widgets applies them)."""
    api = copy.deepcopy(load(API_WORKFLOWS / f"{name}.json"))
    for node in api.values():
        node["inputs"].update((changes or {}).get(node["class_type"], {}))
        node.setdefault("_meta", None)
    return api


def assert_clean_graph(ui: ComfyPage, workflow: dict) -> list[dict]:
    """No dialog or toast (missing node types, workflow validation, link fixes), every node type
    registered and configured, none that the web UI marks deprecated ([DEPR]), every widget value
    acceptable to its widget, nothing thrown. Exceptions: a Note (frontend-only) has no server
    definition to be deprecated in; a bypassed node, which the prompt leaves out, may name a file
    the server lacks (the scene template's LoRA loader: the user picks their own LoRA) and nothing else."""
    assert ui.alerts() == []
    report = ui.graph_report()
    assert sorted((n["id"], n["type"], n["mode"]) for n in report) == sorted((str(n["id"]), n["type"], n.get("mode", 0)) for n in workflow["nodes"])
    for node in report:
        assert node["registered"], f"node {node['id']}: the UI does not know the node type {node['type']}"
        assert not node["has_errors"], f"node {node['id']} ({node['type']}) is flagged with errors"
        if node["mode"] == BYPASS:
            assert all(problem.startswith("lora_name: ") for problem in node["problems"]), f"node {node['id']} ({node['type']}): {node['problems']}"
        else:
            assert node["problems"] == [], f"node {node['id']} ({node['type']}): {node['problems']}"
        if node["type"] in FRONTEND_ONLY:
            assert node["deprecated"] in (None, False) and node["badge"] != "[DEPR]"
            continue
        assert node["deprecated"] is False and node["badge"] != "[DEPR]", f"node {node['id']} ({node['type']}, '{node['title']}'): the web UI marks it deprecated ({node['badge']})"
    assert ui.page_errors == []
    return report


@pytest.mark.oldest_host
@pytest.mark.parametrize("name", NAMES)
def test_workflow_opens_converts_to_its_api_file_and_runs_from_the_run_button(ui, server, name, screenshots):
    """Each template, opened from the template browser in a ComfyUI with only the pack's files and the
    models (the server fixture: its example portraits and pose reach input/ through the pack), runs to
    an image without any missing input or model. The one edit is SMALL (size and steps, for a CPU's
    speed): it changes no file the run needs."""
    path = WORKFLOWS / f"{name}.json"
    workflow = load(path)
    ui.open_template(PACK_NAME, name, workflow)
    report = assert_clean_graph(ui, workflow)
    titles = {node["id"]: node["title"] for node in report}
    assert all(titles.values())
    # the frontend's own UI -> API conversion gives exactly the shipped API file: same nodes, links,
    # widget values and titles
    assert ui.prompt() == expected_prompt(name)
    ui.show_saved_view(workflow)  # the pictures at the file's own zoom, where node text is drawn
    image = ui.screenshot(screenshots / f"{name}.png", clip=ui.graph_rect())
    save_thumbnail(image, screenshots / f"{name}.jpg")

    edited = ui.set_widgets(SMALL)
    assert len(edited) == sum(len(SMALL.get(node["type"], {})) for node in workflow["nodes"])
    assert ui.prompt() == expected_prompt(name, SMALL)

    before = set(server.get("/history"))
    ui.click_run()

    def finished():
        assert not ui.page.locator(".p-dialog:visible").count(), f"the UI shows an error: {ui.alerts()}"
        return next(iter(set(server.get("/history")) - before), None)

    prompt_id = ui.wait_until(finished, RUN_TIMEOUT, "the run")
    entry = server.get(f"/history/{prompt_id}")[prompt_id]
    assert entry["status"]["status_str"] == "success", (status_message(entry, "execution_error"), ui.alerts())
    # the UI sent what it showed, and the images appear in the output nodes
    sent = entry["prompt"][2]
    assert {key: (node["class_type"], node["inputs"]) for key, node in sent.items()} == {
        key: (node["class_type"], node["inputs"]) for key, node in expected_prompt(name, SMALL).items()
    }
    outputs = [node["id"] for node in workflow["nodes"] if node["type"] in ("SaveImage", "PreviewImage")]
    ui.wait_for_images(outputs, timeout=60)
    assert all(size == [SIZE, SIZE] for size in ui.node_image_sizes(outputs).values())
    assert ui.alerts() == [] and ui.page_errors == []
    check_outputs(server, entry, sent)
    ui.screenshot(screenshots / f"{name}_run.png", clip=ui.graph_rect())


def output_images(entry: dict, kind: str) -> list[dict]:
    return [image for output in entry["outputs"].values() for image in output.get("images", []) if image["type"] == kind]


def check_outputs(server, entry: dict, graph: dict) -> None:
    """The history ``entry`` of API ``graph`` holds one saved RGB picture of SIZE x SIZE that is an
    image (not blank, many colours) and carries ``graph``, and one preview of that size per PreviewImage
    (the subject mask's black and white only)."""
    saved = output_images(entry, "output")
    assert len(saved) == 1
    image = Image.open(io.BytesIO(server.view(saved[0])))
    assert image.size == (SIZE, SIZE) and image.mode == "RGB"
    # SaveImage embedded the queued API workflow, so dropping the PNG on the canvas reopens exactly what ran
    embedded = json.loads(image.info["prompt"])  # ComfyUI adds its own keys (is_changed) to each node
    assert {key: (node["class_type"], node["inputs"]) for key, node in embedded.items()} == {
        key: (node["class_type"], node["inputs"]) for key, node in graph.items()
    }
    pixels = np.asarray(image, dtype=np.float64)
    assert np.isfinite(pixels).all() and pixels.std() > 2.0  # an image, not a blank (NaN or constant) one
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > SIZE  # many distinct colours, not a flat fill
    previews = {key: node["inputs"]["images"][0] for key, node in graph.items() if node["class_type"] == "PreviewImage"}
    regions = [key for key, node in graph.items() if node["class_type"] == "FaceDiffuserRegions"]  # each shows its preview on itself
    assert len(output_images(entry, "temp")) == len(previews) + len(regions)
    assert all(len(entry["outputs"][key]["images"]) == 1 for key in regions)
    for key, source in previews.items():
        (shown,) = entry["outputs"][key]["images"]
        preview = Image.open(io.BytesIO(server.view(shown)))
        assert preview.size == (SIZE, SIZE)
        if graph[source]["class_type"] == "MaskToImage":  # the subject mask: pure black / white
            assert set(np.unique(np.asarray(preview.convert("L")))) <= {0, 255}


@pytest.mark.oldest_host
def test_the_servers_input_folder_holds_the_packs_example_inputs_only(server):
    """The suite put nothing in input/: what is there the pack copied on load, byte for byte the files
    of workflows/inputs/, every picture the templates' Load Image nodes open among them."""
    shipped = {path.name: path.read_bytes() for path in (WORKFLOWS / "inputs").glob("*.png")}
    found = {path.name: path.read_bytes() for path in (server.base / "input").iterdir() if path.is_file()}
    assert found == shipped
    opened = {n["widgets_values"][0] for path in WORKFLOWS.glob("*.json") for n in load(path)["nodes"] if n["type"] == "LoadImage"}
    assert opened == {"face_1.png", "face_2.png", "photo_park.png", "pose_two_people.png"} and opened <= set(found)
    assert not (server.base / "models" / "loras").exists() or not any((server.base / "models" / "loras").iterdir())


def test_template_browser_lists_our_workflows(ui, server, screenshots):
    assert sorted(server.get("/workflow_templates")[PACK_NAME]) == NAMES
    for name in NAMES:
        served = requests.get(f"{server.url}/api/workflow_templates/{PACK_NAME}/{name}.json", timeout=30)
        assert served.ok and served.json() == load(WORKFLOWS / f"{name}.json")
        thumbnail = requests.get(f"{server.url}/api/workflow_templates/{PACK_NAME}/{name}.jpg", timeout=30)
        assert thumbnail.ok and thumbnail.content == (WORKFLOWS / f"{name}.jpg").read_bytes()

    ui.menu("Browse Templates")
    ui.page.locator("[data-testid='template-workflows-content']").wait_for()
    ui.page.get_by_text(PACK_NAME, exact=True).click()  # our pack, under Extensions
    cards = {name: ui.page.locator(f"[data-testid='template-workflow-{name}']") for name in NAMES}
    for name, card in cards.items():
        card.wait_for()
        assert name in card.inner_text()
        # its thumbnail, workflows/<name>.jpg, shows (a missing one gives a generic picture instead)
        thumbnail = card.locator("img").first
        thumbnail.wait_for()
        ui.page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=thumbnail.element_handle())
        assert "default-template" not in thumbnail.get_attribute("src")
    assert ui.page.locator("[data-testid^='template-workflow-']").count() == len(NAMES)
    ui.page.mouse.move(0, 0)  # no card hovered (zoomed) in the picture
    ui.page.wait_for_timeout(500)
    ui.screenshot(screenshots / "template_browser.png")

    # picking one opens it, as cleanly as opening the file
    name = "facediffuser_one_subject"
    cards[name].click()
    workflow = load(WORKFLOWS / f"{name}.json")
    ui.wait_for_graph(workflow)
    assert_clean_graph(ui, workflow)
    assert ui.prompt() == expected_prompt(name)


def test_every_node_has_a_help_page_that_opens(ui, server, screenshots):
    info = server.get("/object_info")
    ours = {node: spec for node, spec in info.items() if spec["python_module"] == f"custom_nodes.{PACK_NAME}"}
    assert {"FaceDiffuserLoader", "FaceDiffuserSubjectEncode", "FaceDiffuserGuider", "FaceDiffuserSampler"} <= set(ours)
    assert {path.stem for path in DOCS.glob("*.md")} == set(ours), "web/docs/ needs one <NodeId>.md per node, and no others"
    for node in ours:
        served = requests.get(f"{server.url}/extensions/{PACK_NAME}/docs/{node}.md", timeout=30)
        assert served.ok and served.text == (DOCS / f"{node}.md").read_text()

    # a shipped workflow, plus the nodes it does not use placed below it
    ui.open_workflow_file(WORKFLOWS / "facediffuser_one_subject.json")
    ids = ui.page.evaluate(
        """(types) => {
          const ids = {}, bottom = Math.max(...app.graph._nodes.map(n => n.pos[1] + n.size[1]));
          types.forEach((type, i) => {
            let node = app.graph._nodes.find(n => n.type === type);
            if (!node) {
              node = LiteGraph.createNode(type);
              node.pos = [450 * (i % 4), bottom + 150 + 500 * Math.floor(i / 4)];
              app.graph.add(node);
            }
            ids[type] = node.id;
          });
          return ids;
        }""",
        list(ours),
    )
    for node, node_id in ids.items():
        spec = ours[node]
        text = ui.show_node_info(node_id, spec["display_name"])
        assert text.splitlines()[0] == spec["display_name"]
        names = [n for section in ("required", "optional") for n in spec["input_order"].get(section, [])] + spec["output_name"]
        missing = [n for n in names if n not in text]
        assert missing == [], f"the help page of {node} does not mention {missing}"
        if node == "FaceDiffuserSubjectEncode":
            ui.screenshot(screenshots / "node_help.png")
    assert ui.alerts() == [] and ui.page_errors == []
