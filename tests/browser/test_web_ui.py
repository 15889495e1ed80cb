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
MODEL_LOADERS = {"FaceDiffuserLoader", "CheckpointLoaderSimple", "ControlNetLoader", "LoraLoader"}


def template_model_files(name: str) -> frozenset:
    """The model files the API file ``name`` loads (its loaders' ``*_name`` inputs)."""
    api = load(API_WORKFLOWS / f"{name}.json")
    return frozenset(value for node in api.values() if node["class_type"] in MODEL_LOADERS for key, value in node["inputs"].items() if key.endswith("_name"))


def run_order(names: list[str]) -> list[str]:
    """The templates in the order the Run button test takes them: those that load the same models one
    after another, the most common set (the Face-diffuser pair) last, so that its server (--cache-classic
    keeps the outputs of the last prompt's nodes) loads each set once, and the editor tests that follow
    run on the pair already loaded. Those with extra models beside the pair (the pose's ControlNet) come
    just before it."""
    files = {name: template_model_files(name) for name in names}
    counts = {models: sum(found == models for found in files.values()) for models in files.values()}
    common = max(counts, key=lambda models: (counts[models], sorted(models)))
    return sorted(names, key=lambda name: (files[name] == common, files[name] >= common, sorted(files[name]), name))


RUN_ORDER = run_order(NAMES)
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
@pytest.mark.parametrize("name", RUN_ORDER)
def test_workflow_opens_converts_to_its_api_file_and_runs_from_the_run_button(shared_ui, server, name, screenshots):
    """Each template, opened from the template browser in a ComfyUI with only the pack's files and the
    models (the server fixture: its example portraits and pose reach input/ through the pack), runs to
    an image without any missing input or model. The one edit is SMALL (size and steps, for a CPU's
    speed): it changes no file the run needs. The templates share one page (``shared_ui``), in
    RUN_ORDER."""
    ui = shared_ui
    path = WORKFLOWS / f"{name}.json"
    workflow = load(path)
    ui.open_template(PACK_NAME, name, workflow)
    report = assert_clean_graph(ui, workflow)
    outputs = [node["id"] for node in workflow["nodes"] if node["type"] in ("SaveImage", "PreviewImage")]
    assert ui.node_images(outputs) == [], "an output node shows an image before the run (the template before's?)"
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

    entry = run_to_history(ui, server)
    # the UI sent what it showed, and the images appear in the output nodes
    sent = entry["prompt"][2]
    assert {key: (node["class_type"], node["inputs"]) for key, node in sent.items()} == {
        key: (node["class_type"], node["inputs"]) for key, node in expected_prompt(name, SMALL).items()
    }
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


# The regions editor (web/js/regions_editor.js, issue 35): a canvas on the Face-diffuser Regions node
# that draws the boxes widget's text and writes it back as boxes are dragged. Its geometry, which the
# tests read back from the screen: the picture's frame at the picture's aspect ratio, centred in the
# canvas element, EDITOR_PAD of the element's own (unzoomed) pixels from its nearest sides; each box
# filled in its marker's colour at TINT over BACKGROUND (overlaps mixed), as the node's preview draws it.
from facediffuser_core.method.regions import BACKGROUND, COLOURS, TINT, box_masks, marked_words, parse_boxes, region_preview  # noqa: E402

REGIONS = "facediffuser_two_regions"
EDITOR_SCRIPT = f"**/extensions/{PACK_NAME}/js/regions_editor.js"
EDITOR_PAD = 8
EDITOR_OUTSIDE = (18, 18, 18)  # the canvas around the frame
COLOUR_TOLERANCE = 6  # per channel, 0..255

EDITOR_CANVAS_JS = """(id) => {
  const node = app.graph.getNodeById(id);
  const editor = node?.widgets?.find(w => w.name === 'regions_editor');
  return editor ? editor.element.querySelector('canvas') : null;
}"""

HIT_JS = """([x, y]) => {
  const element = document.elementFromPoint(x, y);
  const editors = app.graph.findNodesByType('FaceDiffuserRegions').map(node => node.widgets?.find(w => w.name === 'regions_editor')?.element.querySelector('canvas'));
  return editors.includes(element) ? 'editor' : element ? `${element.tagName} id=${element.id} class=${element.className}` : 'nothing';
}"""

NODE_RECT_JS = """(id) => {
  const node = app.graph.getNodeById(id), title = LiteGraph.NODE_TITLE_HEIGHT;
  const [left, top] = app.canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1] - title]);
  const [right, bottom] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0], node.pos[1] + node.size[1]]);
  const box = app.canvas.canvas.getBoundingClientRect();
  return [box.left + left, box.top + top, box.left + right, box.top + bottom];
}"""


def regions_node_id(workflow: dict) -> str:
    (node,) = [n for n in workflow["nodes"] if n["type"] == "FaceDiffuserRegions"]
    return str(node["id"])


def show_node(ui: ComfyPage, node_id: str) -> None:
    """The node at zoom 1 in the middle of the canvas (the editor's canvas then has one screen pixel per
    pixel of its own), nothing selected."""
    ui.page.evaluate(
        """(id) => { const node = app.graph.getNodeById(id); app.canvas.ds.scale = 1; app.canvas.centerOnNode(node);
                     app.canvas.deselectAll(); app.canvas.setDirty(true, true) }""",
        node_id,
    )
    ui.page.wait_for_timeout(800)  # the DOM widget follows the canvas, the editor redraws (it polls)


def boxes_text_changes(ui: ComfyPage, node_id: str, text: str) -> None:
    """Until the boxes widget no longer says ``text`` (the editor picks up a change of people when it
    next polls the node, every 200 ms, and writes the text and draws at once)."""
    ui.page.wait_for_function("([id, text]) => app.graph.getNodeById(id).widgets.find(w => w.name === 'boxes')?.value !== text", arg=[node_id, text], timeout=10_000)


def regions_widget(ui: ComfyPage, node_id: str, name: str):
    return ui.page.evaluate("([id, name]) => app.graph.getNodeById(id).widgets.find(w => w.name === name)?.value", [node_id, name])


def editor_frame(ui: ComfyPage, node_id: str, width: int, height: int) -> tuple[float, float, float, float]:
    """The picture's frame on screen (left, top, width, height in CSS pixels), from the editor canvas's
    bounding box alone."""
    canvas = ui.page.evaluate_handle(EDITOR_CANVAS_JS, node_id).as_element()
    assert canvas is not None, "the Regions node has no editor canvas"
    box, settled = canvas.bounding_box(), None
    for _ in range(20):  # the node's layout settles after the canvas redraws (longer on a busy machine)
        ui.page.wait_for_timeout(250)
        settled = canvas.bounding_box()
        if settled == box:
            break
        box = settled
    assert settled == box, f"the editor keeps moving on screen: {box} then {settled}"
    client_w, client_h = canvas.evaluate("c => [c.clientWidth, c.clientHeight]")
    zoom = box["width"] / client_w
    scale = min((client_w - 2 * EDITOR_PAD) / width, (client_h - 2 * EDITOR_PAD) / height)
    frame_w, frame_h = width * scale, height * scale
    assert frame_w > 100 and frame_h > 100, f"the editor's frame is only {frame_w:.0f}x{frame_h:.0f}"
    return (box["x"] + zoom * (client_w - frame_w) / 2, box["y"] + zoom * (client_h - frame_h) / 2, zoom * frame_w, zoom * frame_h)


def expected_colour(boxes: list, fx: float, fy: float) -> tuple[float, ...]:
    """What the editor draws at fraction (fx, fy) of the frame: the mixed colour of the boxes there."""
    if not (0 <= fx < 1 and 0 <= fy < 1):
        return EDITOR_OUTSIDE
    inside = [k for k, (x0, y0, x1, y1) in enumerate(boxes) if x0 <= fx < x1 and y0 <= fy < y1]
    if not inside:
        return BACKGROUND
    mixed = np.mean([COLOURS[k % len(COLOURS)] for k in inside], axis=0)
    return tuple(np.array(BACKGROUND) * (1 - TINT) + mixed * TINT)


def assert_boxes_drawn(ui: ComfyPage, node_id: str, boxes: list, size: tuple[int, int] = (512, 512)) -> None:
    """A screenshot shows ``boxes`` where the fractions put them in the editor's frame: each box's
    colour at its centre and, 4 screen pixels either side of each of its edges (a quarter of the way
    along), the colours inside and outside the box. Points near another box's outline, handles or
    label (its top-left corner) are not checked; at least 5 of each box's 9 are."""
    left, top, width, height = editor_frame(ui, node_id, *size)
    shot = np.asarray(Image.open(io.BytesIO(ui.page.screenshot())).convert("RGB"), dtype=np.float64)
    screen = [(left + x0 * width, top + y0 * height, left + x1 * width, top + y1 * height) for x0, y0, x1, y1 in boxes]
    wrong = []

    def clear(sx: float, sy: float, own: tuple[int, str]) -> bool:
        for j, (sx0, sy0, sx1, sy1) in enumerate(screen):
            if sx0 - 3 <= sx <= sx0 + 90 and sy0 - 3 <= sy <= sy0 + 28:  # its label
                return False
            edges = {"left": (sx0, sy0, sx0, sy1), "right": (sx1, sy0, sx1, sy1), "top": (sx0, sy0, sx1, sy0), "bottom": (sx0, sy1, sx1, sy1)}
            for side, (ax, ay, bx, by) in edges.items():  # within 6 pixels of the outline (Chebyshev distance)
                distance = max(max(ax - sx, 0, sx - bx), max(ay - sy, 0, sy - by))
                if (j, side) != own and distance <= 6:
                    return False
        return True

    def check(sx: float, sy: float, what: str, own: tuple[int, str] = (-1, "")) -> int:
        if not clear(sx, sy, own):
            return 0
        fx, fy = (sx - left) / width, (sy - top) / height
        expected = np.array(expected_colour(boxes, fx, fy))
        found = shot[int(sy), int(sx)]
        if np.abs(found - expected).max() > COLOUR_TOLERANCE:
            wrong.append(f"{what} at ({sx:.0f}, {sy:.0f}): {found.astype(int).tolist()}, expected {np.round(expected).astype(int).tolist()}")
        return 1

    for k, (sx0, sy0, sx1, sy1) in enumerate(screen):
        checked = check((sx0 + sx1) / 2, (sy0 + sy1) / 2, f"box {k + 1} centre")
        along_y, along_x = sy0 + 0.25 * (sy1 - sy0), sx0 + 0.75 * (sx1 - sx0)
        for side, sx, sy, dx, dy in (("left", sx0, along_y, 1, 0), ("right", sx1, along_y, -1, 0), ("top", along_x, sy0, 0, 1), ("bottom", along_x, sy1, 0, -1)):
            checked += check(sx + 4 * dx, sy + 4 * dy, f"box {k + 1} inside its {side} edge", (k, side))
            checked += check(sx - 4 * dx, sy - 4 * dy, f"box {k + 1} outside its {side} edge", (k, side))
        assert checked >= 5, f"box {k + 1}: only {checked} points clear of the other boxes' outlines and labels"
    assert wrong == [], "\n".join(wrong)


def assert_boxes_text(text: str, expected: list, step: float = 0.001) -> None:
    """The boxes widget's text says ``expected``, within a rounding step (the editor writes 3 decimals)."""
    found = parse_boxes(text)
    assert len(found) == len(expected), text
    assert np.abs(np.array(found) - np.array(expected)).max() <= step + 1e-9, f"{text!r} is not {expected}"
    assert all(len(value.strip().split(".")[-1]) <= 3 for value in text.replace(";", ",").split(",")), f"{text!r}: more than 3 decimals"


def corner(x: float, y: float) -> tuple[float, float]:
    """A press on a box's bottom-right corner at screen point (x, y): 2 pixels inside the box, well
    within the editor's grab distance (6 pixels), so that a rounding of the frame's position to the
    screen's pixels cannot put it outside."""
    return x - 2, y - 2


def drag(ui: ComfyPage, start: tuple[float, float], by: tuple[float, float]) -> None:
    """The real mouse: press at ``start``, move by ``by`` screen pixels in steps, release."""
    hit = ui.page.evaluate(HIT_JS, list(start))
    assert hit == "editor", f"the press at {start} would land on {hit}, not on a Regions editor"
    mouse = ui.page.mouse
    mouse.move(*start)
    mouse.down()
    mouse.move(start[0] + by[0], start[1] + by[1], steps=8)
    mouse.up()
    ui.page.wait_for_timeout(300)


def boxes_textbox(ui: ComfyPage, text: str):
    """The boxes widget's text box on the canvas (the one whose text is ``text``)."""
    matches = [box for box in ui.page.get_by_role("textbox").all() if box.is_visible() and box.input_value() == text]
    assert len(matches) == 1, f"{len(matches)} text boxes say {text!r}"
    return matches[0]


def run_to_history(ui: ComfyPage, server) -> dict:
    """Press Run and wait for the prompt's history entry, which must be a success (an error dialog fails at once)."""
    before = set(server.get("/history"))
    ui.click_run()

    def finished():
        assert not ui.page.locator(".p-dialog:visible").count(), f"the UI shows an error: {ui.alerts()}"
        return next(iter(set(server.get("/history")) - before), None)

    prompt_id = ui.wait_until(finished, RUN_TIMEOUT, "the run")
    entry = server.get(f"/history/{prompt_id}")[prompt_id]
    assert entry["status"]["status_str"] == "success", (status_message(entry, "execution_error"), ui.alerts())
    return entry


def assert_run_used_boxes(server, entry: dict, workflow: dict, text: str) -> None:
    """The run queued layout boxes with ``text``, and the regions it made (the Regions preview the
    workflow shows, drawn from the masks that go into Subject Encode) are exactly those boxes."""
    node_id = regions_node_id(workflow)
    sent = entry["prompt"][2][node_id]["inputs"]
    assert sent["layout"] == "boxes" and sent["boxes"] == text
    (link,) = [link for link in workflow["links"] if str(link[1]) == node_id and link[2] == 1]  # Regions' preview output
    (shown,) = entry["outputs"][str(link[3])]["images"]
    preview = np.asarray(Image.open(io.BytesIO(server.view(shown))).convert("RGB"))
    expected = region_preview(box_masks(parse_boxes(text), SIZE, SIZE), marked_words(sent["prompt"]))
    assert np.array_equal(preview, np.round(expected[0].numpy() * 255).astype(np.uint8))
    # the masks Subject Encode receives: the Regions node's masks output, linked to its masks input
    encode = next(key for key, node in entry["prompt"][2].items() if node["class_type"] == "FaceDiffuserSubjectEncode")
    assert entry["prompt"][2][encode]["inputs"]["masks"] == [node_id, 0]


@pytest.mark.oldest_host
def test_regions_editor_draws_drags_types_saves_and_runs_the_boxes(shared_ui, server, screenshots, tmp_path):
    """The editor on the Regions node of the two-regions workflow, layout boxes: the canvas shows the
    boxes where the text says; dragging the right person's box with the mouse and a corner of it writes
    the expected fractions; typed boxes are redrawn; a saved and reopened workflow shows the same boxes;
    the run's regions are the boxes drawn."""
    ui = shared_ui
    workflow = load(WORKFLOWS / f"{REGIONS}.json")
    node_id = regions_node_id(workflow)
    ui.open_workflow_file(WORKFLOWS / f"{REGIONS}.json")
    assert ui.set_widgets({"FaceDiffuserRegions": {"layout": "boxes"}}) == [f"{node_id}.layout"]
    show_node(ui, node_id)
    text = regions_widget(ui, node_id, "boxes")
    boxes = parse_boxes(text)
    assert len(boxes) == 2 == regions_widget(ui, node_id, "people")
    assert_boxes_drawn(ui, node_id, boxes)

    # drag the right person's box 40 screen pixels left, by its middle
    left, top, width, height = editor_frame(ui, node_id, 512, 512)
    x0, y0, x1, y1 = boxes[1]
    drag(ui, (left + (x0 + x1) / 2 * width, top + (y0 + y1) / 2 * height), (-40, 0))
    moved = [boxes[0], [x0 - 40 / width, y0, x1 - 40 / width, y1]]
    text = regions_widget(ui, node_id, "boxes")
    assert_boxes_text(text, moved)
    # then its bottom-right corner 30 pixels left and 50 up
    x0, y0, x1, y1 = parse_boxes(text)[1]
    left, top, width, height = editor_frame(ui, node_id, 512, 512)  # where the frame is now
    drag(ui, corner(left + x1 * width, top + y1 * height), (-30, -50))
    resized = [moved[0], [x0, y0, x1 - 30 / width, y1 - 50 / height]]
    text = regions_widget(ui, node_id, "boxes")
    assert_boxes_text(text, resized)
    ui.page.mouse.move(0, 0)
    ui.page.wait_for_timeout(400)
    assert_boxes_drawn(ui, node_id, parse_boxes(text))
    image = ui.screenshot(screenshots / "facediffuser_regions_editor.png", clip=tuple(v + d for v, d in zip(ui.page.evaluate(NODE_RECT_JS, node_id), (-12, -28, 12, 12))))
    assert image.size[0] > 300

    # type new boxes in the widget (overlapping): the canvas redraws them
    typed = "0.1, 0.2, 0.55, 0.9; 0.45, 0.1, 0.9, 0.8"
    boxes_textbox(ui, text).fill(typed)
    ui.page.wait_for_timeout(800)
    assert regions_widget(ui, node_id, "boxes") == typed
    assert_boxes_drawn(ui, node_id, parse_boxes(typed))

    # save the workflow (the graph as the UI serializes it) and reopen it with File > Open
    saved = tmp_path / f"{REGIONS}_edited.json"
    saved.write_text(ui.page.evaluate("() => JSON.stringify(app.graph.serialize())"))  # in the page: JSON leaves out what is undefined
    ui.set_widgets({"FaceDiffuserRegions": {"boxes": "0, 0, 1, 1; 0, 0, 1, 1"}})
    ui.open_workflow_file(saved)
    ui.page.wait_for_function("([id, text]) => app.graph.getNodeById(id)?.widgets.find(w => w.name === 'boxes')?.value === text", arg=[node_id, typed])
    show_node(ui, node_id)
    assert regions_widget(ui, node_id, "boxes") == typed and regions_widget(ui, node_id, "layout") == "boxes"
    assert_boxes_drawn(ui, node_id, parse_boxes(typed))

    # run it (at test size): the regions are the boxes drawn
    assert ui.alerts() == []
    ui.set_widgets(SMALL)
    entry = run_to_history(ui, server)
    assert_run_used_boxes(server, entry, workflow, typed)
    assert ui.page_errors == []


@pytest.mark.oldest_host
def test_regions_editor_people_and_arrow_keys(shared_ui, server):
    """Changing people adds a box at the next free column and removes the last; the arrow keys nudge
    the selected box by 0.01 (Shift: 0.1) once the canvas has the focus; a box stays inside the frame."""
    ui = shared_ui
    workflow = load(WORKFLOWS / f"{REGIONS}.json")
    node_id = regions_node_id(workflow)
    ui.open_workflow_file(WORKFLOWS / f"{REGIONS}.json")
    ui.set_widgets({"FaceDiffuserRegions": {"layout": "boxes", "boxes": "0, 0, 0.4, 1; 0.5, 0.1, 0.9, 0.9"}})
    show_node(ui, node_id)
    ui.set_widgets({"FaceDiffuserRegions": {"people": 3}})
    boxes_text_changes(ui, node_id, "0, 0, 0.4, 1; 0.5, 0.1, 0.9, 0.9")
    assert_boxes_text(regions_widget(ui, node_id, "boxes"), [[0, 0, 0.4, 1], [0.5, 0.1, 0.9, 0.9], [2 / 3, 0, 1, 1]])
    assert_boxes_drawn(ui, node_id, parse_boxes(regions_widget(ui, node_id, "boxes")))
    before = regions_widget(ui, node_id, "boxes")
    ui.set_widgets({"FaceDiffuserRegions": {"people": 2}})
    boxes_text_changes(ui, node_id, before)
    assert regions_widget(ui, node_id, "boxes") == "0, 0, 0.4, 1; 0.5, 0.1, 0.9, 0.9"

    left, top, width, height = editor_frame(ui, node_id, 512, 512)
    ui.page.mouse.click(left + 0.2 * width, top + 0.5 * height)  # selects the first box, focuses the canvas
    for key in ("ArrowRight", "ArrowRight", "ArrowDown", "Shift+ArrowLeft"):
        ui.page.keyboard.press(key)
    ui.page.wait_for_timeout(300)
    # right twice (0.02), down is blocked by the frame's bottom, then 0.1 left is blocked at 0
    assert regions_widget(ui, node_id, "boxes") == "0, 0, 0.4, 1; 0.5, 0.1, 0.9, 0.9"
    ui.page.mouse.click(left + 0.7 * width, top + 0.5 * height)  # the second box
    for key in ("ArrowRight", "ArrowRight", "ArrowUp", "Shift+ArrowLeft"):
        ui.page.keyboard.press(key)
    ui.page.wait_for_timeout(300)
    assert_boxes_text(regions_widget(ui, node_id, "boxes"), [[0, 0, 0.4, 1], [0.42, 0.09, 0.82, 0.89]])
    # a corner dragged past the box's opposite corner stops one latent cell (8 of 512 pixels) from it
    x0, y0, x1, y1 = parse_boxes(regions_widget(ui, node_id, "boxes"))[1]
    left, top, width, height = editor_frame(ui, node_id, 512, 512)  # where the frame is now
    drag(ui, corner(left + x1 * width, top + y1 * height), (-width, -height))
    assert_boxes_text(regions_widget(ui, node_id, "boxes"), [[0, 0, 0.4, 1], [x0, y0, x0 + 8 / 512, y0 + 8 / 512]])

    # layout columns: the columns, read-only
    text = regions_widget(ui, node_id, "boxes")
    ui.set_widgets({"FaceDiffuserRegions": {"layout": "columns"}})
    ui.page.wait_for_timeout(800)
    assert_boxes_drawn(ui, node_id, [[0, 0, 0.5, 1], [0.5, 0, 1, 1]])
    drag(ui, (left + 0.75 * width, top + 0.5 * height), (-60, 0))
    ui.page.keyboard.press("ArrowLeft")
    assert regions_widget(ui, node_id, "boxes") == text
    assert_boxes_drawn(ui, node_id, [[0, 0, 0.5, 1], [0.5, 0, 1, 1]])
    assert ui.page_errors == []


@pytest.mark.oldest_host
def test_regions_editor_shows_the_pose_boxes_after_a_run(shared_ui, server):
    """Layout pose (the pose workflow): after a run the editor shows the node's preview, the pose's
    boxes over the pose, and dragging changes nothing."""
    ui = shared_ui
    name = "facediffuser_two_people_pose"
    workflow = load(WORKFLOWS / f"{name}.json")
    node_id = regions_node_id(workflow)
    ui.open_workflow_file(WORKFLOWS / f"{name}.json")
    assert regions_widget(ui, node_id, "layout") == "pose"
    # the editor has no preview before this run (an earlier run's in the shared page would pass for it)
    assert ui.page.evaluate("(id) => app.graph.getNodeById(id).facediffuserRegionsEditor.preview", node_id) is None
    ui.set_widgets(SMALL)
    entry = run_to_history(ui, server)
    (shown,) = entry["outputs"][node_id]["images"]
    preview = Image.open(io.BytesIO(server.view(shown))).convert("RGB")
    show_node(ui, node_id)
    text = regions_widget(ui, node_id, "boxes")
    left, top, width, height = editor_frame(ui, node_id, *preview.size)
    drag(ui, (left + 0.5 * width, top + 0.5 * height), (-50, 20))
    assert regions_widget(ui, node_id, "boxes") == text
    shot = Image.open(io.BytesIO(ui.page.screenshot())).convert("RGB")
    inner = (round(left) + 3, round(top) + 3, round(left + width) - 3, round(top + height) - 3)  # clear of the frame's rim
    shown_frame = np.asarray(shot.crop(inner), dtype=np.float64)
    expected = np.asarray(preview.resize((round(width), round(height)), Image.Resampling.BILINEAR).crop((3, 3, inner[2] - inner[0] + 3, inner[3] - inner[1] + 3)), dtype=np.float64)
    difference = np.abs(shown_frame - expected).mean()
    assert difference < 8 and np.abs(shown_frame - np.array(BACKGROUND)).mean() > 10, difference
    assert ui.page_errors == []


@pytest.mark.oldest_host
def test_regions_editor_refused_the_workflow_opens_and_runs_from_the_text(browser, server, tmp_path):
    """With the editor's script refused (a ComfyUI that lacks it, or an extension that fails), the
    regions workflow opens cleanly and runs with the boxes typed into the widget."""
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    try:
        ui = ComfyPage(context, server.url)
        refused = []
        context.route(EDITOR_SCRIPT, lambda route: (refused.append(route.request.url), route.abort()))
        ui.open()
        assert refused, "the web UI did not ask for the editor's script"
        workflow = load(WORKFLOWS / f"{REGIONS}.json")
        node_id = regions_node_id(workflow)
        ui.open_workflow_file(WORKFLOWS / f"{REGIONS}.json")
        assert_clean_graph(ui, workflow)
        assert ui.page.evaluate(EDITOR_CANVAS_JS, node_id) is None
        text = "0.05, 0.1, 0.5, 0.95; 0.55, 0, 0.95, 0.9"
        ui.set_widgets({**SMALL, "FaceDiffuserRegions": {**SMALL["FaceDiffuserRegions"], "layout": "boxes", "boxes": text}})
        entry = run_to_history(ui, server)
        assert_run_used_boxes(server, entry, workflow, text)
        assert ui.page_errors == []
    finally:
        context.close()


@pytest.mark.oldest_host
def test_regions_editor_shows_your_picture_behind_the_boxes(shared_ui, server):
    """In the into-a-photo workflow the Regions node's size comes from your picture (Load Image >
    Upscale Image > VAE Encode > size_from): the editor's frame has the picture's aspect ratio and shows
    the picture, each box tinted over it."""
    ui = shared_ui
    name = "facediffuser_into_a_photo"
    workflow = load(WORKFLOWS / f"{name}.json")
    node_id = regions_node_id(workflow)
    ui.open_workflow_file(WORKFLOWS / f"{name}.json")
    (loader,) = [n for n in workflow["nodes"] if n["type"] == "LoadImage" and n["widgets_values"][0].startswith("photo_")]
    picture = Image.open(WORKFLOWS / "inputs" / loader["widgets_values"][0]).convert("RGB")
    ui.page.wait_for_function("(id) => app.graph.getNodeById(id).imgs?.[0]?.naturalWidth > 0", arg=str(loader["id"]))
    show_node(ui, node_id)
    boxes = parse_boxes(regions_widget(ui, node_id, "boxes"))
    left, top, width, height = editor_frame(ui, node_id, *picture.size)
    shot = np.asarray(Image.open(io.BytesIO(ui.page.screenshot())).convert("RGB"), dtype=np.float64)
    w, h = round(width), round(height)
    shown = shot[round(top) : round(top) + h, round(left) : round(left) + w]
    expected = np.asarray(picture.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float64)
    ys, xs = np.mgrid[0:h, 0:w]
    fx, fy = (xs + 0.5) / w, (ys + 0.5) / h
    keep = (xs > 6) & (xs < w - 6) & (ys > 6) & (ys < h - 6)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        inside = (x0 * w <= xs + 0.5) & (xs + 0.5 < x1 * w) & (y0 * h <= ys + 0.5) & (ys + 0.5 < y1 * h)
        expected[inside] = expected[inside] * (1 - TINT) + np.array(COLOURS[k]) * TINT
        edge = (np.abs(fx - x0) * w < 6) | (np.abs(fx - x1) * w < 6) | (np.abs(fy - y0) * h < 6) | (np.abs(fy - y1) * h < 6)
        label = (xs > x0 * w - 3) & (xs < x0 * w + 90) & (ys > y0 * h - 3) & (ys < y0 * h + 28)
        keep &= ~(edge & (fx > x0 - 0.02) & (fx < x1 + 0.02) & (fy > y0 - 0.02) & (fy < y1 + 0.02)) & ~label
    assert abs(width / height - picture.width / picture.height) < 0.01
    difference = np.abs(shown - expected)[keep].mean()
    flat = np.abs(shown - np.array(BACKGROUND))[keep].mean()
    assert difference < 8 and flat > 30, (difference, flat)
    assert ui.page_errors == []
