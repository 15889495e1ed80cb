"""ComfyUI's web UI in a Playwright page: what a user does (menus, the Run button, the template
browser, the node info button) plus read-outs of the frontend's graph (``window.app``, the ComfyApp of
comfyui-frontend-package: ``app.graph._nodes``, ``app.graphToPrompt()``).

Controls are found by role and accessible name, not CSS class (the frontend restyles often); checked
with web UI 1.35.9 (ComfyUI 0.3.75), 1.49.6 (0.33.0) and 1.58.1. Node ids are compared as strings:
1.49.6 gives them as strings ('10'), older versions as numbers."""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional

from PIL import Image
from playwright.sync_api import TimeoutError as PlaywrightTimeout

# Everything but the ComfyUI server is blocked: the frontend asks for release notes and the like.
OUTSIDE = re.compile(r"^https?://(?!127\.0\.0\.1[:/])")
RUN_BUTTON = "Run"  # the queue button's text
MENU_BUTTON = "Menu"  # the main menu's button (1.58); older versions show the logo alone, by its alt text
MENU_LOGO = "ComfyUI Logo"
INFO_BUTTON = "Node Info"  # the selection toolbox's info button
ALERTS = ".p-dialog:visible, .p-toast-message:visible"

# The frontend's graph as the user sees it: node types and whether they are registered (a missing
# node type is not), the error flag LiteGraph sets on nodes it could not configure, and widget values
# that the widget itself would not accept (a combo value not among its choices, a number out of range),
# and whether the node's definition is deprecated: the frontend keeps each type's definition (a
# ComfyNodeDefImpl of its /object_info entry) as the registered class's nodeData, and badges the node
# "[DEPR]" from its deprecated flag (nodeLifeCycleBadgeText, in 1.32.9 and 1.49.6 alike); null when the
# frontend has no definition to ask.
GRAPH_REPORT_JS = """() => app.graph._nodes.map(node => {
  const definition = LiteGraph.registered_node_types[node.type]?.nodeData;
  const problems = [];
  for (const w of node.widgets ?? []) {
    const o = w.options ?? {};
    if (w.type === 'combo') {
      let values = o.values;
      if (typeof values === 'function') values = values(w, node);
      if (Array.isArray(values) && !values.includes(w.value))
        problems.push(`${w.name}: '${w.value}' is not one of its ${values.length} choices`);
    } else if (w.type === 'number') {
      if (typeof w.value !== 'number' || !Number.isFinite(w.value)) problems.push(`${w.name}: ${w.value} is not a number`);
      else if (o.min != null && w.value < o.min) problems.push(`${w.name}: ${w.value} < min ${o.min}`);
      else if (o.max != null && w.value > o.max) problems.push(`${w.name}: ${w.value} > max ${o.max}`);
    }
  }
  return {
    id: String(node.id), type: node.type, title: node.title, mode: node.mode,
    registered: node.type in LiteGraph.registered_node_types,
    has_errors: !!node.has_errors, problems,
    deprecated: definition ? !!definition.deprecated : null, badge: definition?.nodeLifeCycleBadgeText ?? null,
    widgets: Object.fromEntries((node.widgets ?? []).filter(w => w.type !== 'button').map(w => [w.name, w.value])),
  };
})"""

SET_WIDGETS_JS = """(changes) => {
  const done = [];
  for (const node of app.graph._nodes) {
    for (const w of node.widgets ?? []) {
      const value = changes[node.type]?.[w.name];
      if (value === undefined) continue;
      w.value = value;
      done.push(`${node.id}.${w.name}`);
    }
  }
  app.canvas.setDirty(true, true);
  return done;
}"""

# Screen rectangle (CSS pixels) of all nodes, titles included, in the canvas's current view.
GRAPH_RECT_JS = """() => {
  const nodes = app.graph._nodes, title = LiteGraph.NODE_TITLE_HEIGHT;
  const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1] - title));
  const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
  const [left, top] = app.canvas.ds.convertOffsetToCanvas([x0, y0]);
  const [right, bottom] = app.canvas.ds.convertOffsetToCanvas([x1, y1]);
  const box = app.canvas.canvas.getBoundingClientRect();
  return [box.left + left, box.top + top, box.left + right, box.top + bottom];
}"""


class ComfyPage:
    def __init__(self, context, url: str) -> None:
        self.url = url
        context.route(OUTSIDE, lambda route: route.abort())
        self.page = context.new_page()
        self.page.set_default_timeout(30_000)
        self.page_errors: list[str] = []  # uncaught exceptions in the page
        self.page.on("pageerror", lambda error: self.page_errors.append(str(error)))

    # what the user does

    def open(self) -> None:
        """Load the UI and wait until it has set up and opened its first workflow."""
        self.page.goto(self.url)
        self.page.wait_for_function("() => window.app?.graph && window.app.graph._nodes.length > 0", timeout=120_000)
        self.run_button.wait_for()

    @property
    def run_button(self):
        return self.page.get_by_role("button", name=RUN_BUTTON, exact=True).first  # 1.49.6 also labels its options button "Run"

    def menu(self, *path: str) -> None:
        """Click through the main menu (the Comfy logo): ``menu("File", "Open")``."""
        button = self.page.get_by_role("button", name=MENU_BUTTON, exact=True)
        button.or_(self.page.get_by_alt_text(MENU_LOGO, exact=True)).first.click()
        for label, child in zip(path, path[1:]):
            item, submenu = (self.page.get_by_role("menuitem", name=name, exact=True).first for name in (label, child))
            for _ in range(5):  # a hover while the menu still opens can miss its submenu
                item.hover()
                try:
                    submenu.wait_for(state="visible", timeout=2_000)
                    break
                except PlaywrightTimeout:
                    self.page.mouse.move(0, 0)
        self.page.get_by_role("menuitem", name=path[-1], exact=True).first.click()

    def open_workflow_file(self, path: Path) -> None:
        """Main menu > File > Open, and pick ``path`` in the file chooser (the same code path as
        dropping the file on the canvas: ``app.handleFile`` > ``app.loadGraphData``)."""
        with self.page.expect_file_chooser() as chooser:
            self.menu("File", "Open")
        chooser.value.set_files(str(path))
        self.wait_for_graph(json.loads(path.read_text()))

    def open_template(self, pack: str, name: str, workflow: dict) -> None:
        """Main menu > Browse Templates, ``pack`` under Extensions, and the card of template ``name``
        (the frontend fetches /api/workflow_templates/<pack>/<name>.json and opens it); waits until
        the canvas holds ``workflow``'s nodes."""
        self.menu("Browse Templates")
        self.page.locator("[data-testid='template-workflows-content']").wait_for()
        self.page.get_by_text(pack, exact=True).click()
        card = self.page.locator(f"[data-testid='template-workflow-{name}']")
        card.wait_for()
        card.click()
        self.wait_for_graph(workflow)

    def show_saved_view(self, workflow: dict) -> None:
        """Zoom and pan the canvas as the file saved it (``extra.ds``), as File > Open shows it: the
        template browser fits the graph to the window instead, too small for LiteGraph to draw text."""
        self.page.evaluate(
            "(ds) => { app.canvas.ds.scale = ds.scale; app.canvas.ds.offset[0] = ds.offset[0]; app.canvas.ds.offset[1] = ds.offset[1]; app.canvas.setDirty(true, true) }",
            workflow["extra"]["ds"],
        )  # graph_rect, which a picture needs next, waits for the canvas to redraw

    def wait_for_graph(self, workflow: dict) -> None:
        ids = sorted(str(node["id"]) for node in workflow["nodes"])
        self.page.wait_for_function("(ids) => JSON.stringify(app.graph._nodes.map(n => String(n.id)).sort()) === JSON.stringify(ids)", arg=ids)
        self.page.wait_for_timeout(500)  # let the canvas draw and any dialog or toast show up

    def set_widgets(self, changes: dict[str, dict[str, Any]]) -> list[str]:
        """Edit widget values through the graph: ``{node type: {widget name: value}}``."""
        return self.page.evaluate(SET_WIDGETS_JS, changes)

    def click_run(self) -> None:
        self.run_button.click()

    def show_node_info(self, node_id: int, name: str) -> str:
        """Select a node on the canvas and press the selection toolbox's info button; returns the
        text of the help panel once it shows the node's page (its first heading is ``name``, the node
        type's display name, whatever title the node has on the canvas)."""
        self.page.evaluate(
            """(id) => {
              const node = app.graph.getNodeById(id);
              app.canvas.ds.scale = 1;
              app.canvas.centerOnNode(node);
              app.canvas.deselectAll();
              app.canvas.selectNode(node);
              app.canvas.setDirty(true, true);
            }""",
            node_id,
        )
        self.page.get_by_role("button", name=INFO_BUTTON, exact=True).first.click()
        heading = self.page.get_by_role("heading", level=1, name=name, exact=True).first
        heading.wait_for()
        return heading.locator("xpath=..").inner_text()  # the rendered page the heading opens

    # what the frontend says

    def graph_report(self) -> list[dict]:
        return self.page.evaluate(GRAPH_REPORT_JS)

    def alerts(self) -> list[str]:
        """Texts of the dialogs and toasts on screen (missing nodes, validation, errors...)."""
        return [element.inner_text() for element in self.page.locator(ALERTS).all()]

    def prompt(self) -> dict:
        """The API-format prompt the frontend would queue: ``app.graphToPrompt().output``."""
        output = self.page.evaluate("async () => (await app.graphToPrompt()).output")
        return {key: {"class_type": n["class_type"], "inputs": n["inputs"], "_meta": n.get("_meta")} for key, n in output.items()}

    def wait_for_images(self, node_ids: list[int], timeout: float) -> None:
        """Until each node shows a loaded image (what the frontend draws in SaveImage / PreviewImage)."""
        self.page.wait_for_function(
            "(ids) => ids.every(id => { const img = app.graph.getNodeById(id)?.imgs?.[0]; return img && img.complete && img.naturalWidth > 0 })",
            arg=node_ids,
            timeout=timeout * 1000,
            polling=100,
        )  # a picture of them needs graph_rect first, which waits for the canvas to redraw

    def node_images(self, node_ids: list[int]) -> list[str]:
        """The nodes of ``node_ids`` that show an image."""
        return self.page.evaluate("(ids) => ids.filter(id => app.graph.getNodeById(id)?.imgs?.length).map(String)", node_ids)

    def node_image_sizes(self, node_ids: list[int]) -> dict[str, list[int]]:
        return self.page.evaluate(
            "(ids) => Object.fromEntries(ids.map(id => { const img = app.graph.getNodeById(id).imgs[0]; return [id, [img.naturalWidth, img.naturalHeight]] }))",
            node_ids,
        )

    def wait_until(self, condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = condition()
            if result:
                return result
            self.page.wait_for_timeout(interval * 1000)
        raise TimeoutError(f"{what} did not happen within {timeout:.0f}s; on screen: {self.alerts()}")

    # pictures

    def screenshot(self, path: Path, clip: Optional[tuple[float, float, float, float]] = None) -> Image.Image:
        """Save a PNG of the page (or of ``clip`` = left, top, right, bottom), reduced to 256 colours."""
        image = Image.open(io.BytesIO(self.page.screenshot())).convert("RGB")
        if clip:
            image = image.crop(tuple(round(v) for v in clip))
        save_png(image, path)
        return image

    def graph_rect(self, margin: float = 12) -> tuple[float, float, float, float]:
        """The graph's rectangle on screen, after moving the view down a little so that the node
        badges above the top row of titles are not under the top menu."""
        self.page.evaluate("() => { app.canvas.ds.offset[1] += 60 / app.canvas.ds.scale; app.canvas.setDirty(true, true) }")
        self.page.wait_for_timeout(300)
        left, top, right, bottom = self.page.evaluate(GRAPH_RECT_JS)
        top -= 16  # the node badges (pack name) above the titles
        width, height = self.page.viewport_size["width"], self.page.viewport_size["height"]
        return max(0, left - margin), max(0, top - margin), min(width, right + margin), min(height, bottom + margin)


def save_png(image: Image.Image, path: Path) -> None:
    """A small PNG for the README: 256 colours (UI pictures stay crisp; photos dither a little)."""
    image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


def save_thumbnail(image: Image.Image, path: Path, size: int = 512) -> None:
    """A square JPEG for the template browser's card: the left of the graph picture (where the
    reference photos and the Face-diffuser nodes are), as a square."""
    side = min(image.size)
    image.convert("RGB").crop((0, 0, side, side)).resize((size, size), Image.Resampling.LANCZOS).save(path, quality=85, optimize=True)
