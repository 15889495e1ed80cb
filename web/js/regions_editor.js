// Face-diffuser Regions: a box editor on the node (issue 35). The `boxes` widget stays the source of
// truth: the canvas reads its text ("x0, y0, x1, y1; ..." as fractions of the picture) and writes the
// same text, rounded to 3 decimals, so saved workflows, the API format and a ComfyUI without this file
// work alike. Built on the frontend's public extension API only (app.registerExtension,
// node.addDOMWidget, widgets by name, node.getInputNode, onExecuted); checked on web UI 1.35.9 and 1.49.6.
//
// This file is served at /extensions/<pack>/js/regions_editor.js: the frontend's module shims
// (scripts/app.js, scripts/api.js) sit three levels up.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const NODE_TYPE = "FaceDiffuserRegions";
const MARKER = "<|image|>";
const MAX_PEOPLE = 4;
// The node preview's palette and look (facediffuser_core/method/regions.py: COLOURS, BACKGROUND, TINT).
const COLOURS = [[230, 60, 60], [50, 120, 240], [60, 190, 80], [240, 180, 30]];
const BACKGROUND = [40, 40, 40];
const TINT = 0.55;
const OUTSIDE = "rgb(18, 18, 18)"; // around the picture's frame
// The frame: the picture's aspect ratio, centred in the canvas, PAD canvas pixels from its sides
// (tests/browser/test_web_ui.py computes box rectangles on screen from this).
const PAD = 8;
const CELL = 8; // a box is at least one latent cell (8 picture pixels) wide and high
const GRAB = 6; // how close (canvas pixels) to an edge or corner a press grabs it
const NUDGE = 0.01; // arrow keys move the selected box by this fraction (Shift: ten times)
const MIN_HEIGHT = 260;
const POLL_MS = 200;

/** The marked word of each marker, as facediffuser_core's marked_words: the last word before it. */
export function markedWords(prompt) {
  const pieces = String(prompt ?? "").split(MARKER);
  return pieces.slice(0, -1).map((piece) => piece.trim().split(/\s+/).pop() ?? "");
}

/** parse_boxes: boxes separated by ';' or new lines, four fractions each; null when the text is not valid. */
export function parseBoxes(text) {
  const parts = String(text ?? "").split(/[;\n]/).map((part) => part.trim()).filter(Boolean);
  if (!parts.length) return null;
  const boxes = [];
  for (const part of parts) {
    const values = part.split(",").map((value) => value.trim());
    if (values.length !== 4 || values.some((value) => value === "" || !Number.isFinite(Number(value)))) return null;
    const box = values.map(Number);
    if (box.some((value) => value < 0 || value > 1) || box[0] >= box[2] || box[1] >= box[3]) return null;
    boxes.push(box);
  }
  return boxes;
}

const round3 = (value) => Math.round(value * 1000) / 1000;
export function formatBoxes(boxes) {
  return boxes.map((box) => box.map((value) => String(round3(value))).join(", ")).join("; ");
}

const columnBox = (index, columns) => [index / columns, 0, (index + 1) / columns, 1];
const widget = (node, name) => node.widgets?.find((w) => w.name === name);
const rgb = (c) => `rgb(${c.map((v) => Math.round(v)).join(", ")})`;

/** What a node gives as a picture: its loaded image (a Load Image shows it), its width and height
 * widgets (an Empty Latent Image; an Upscale Image, whose 0 keeps the aspect ratio of what comes in),
 * else what its first linked input gives. */
function upstreamPicture(node, depth = 0) {
  if (!node || depth > 8) return null;
  const image = node.imgs?.[0];
  if (image?.complete && image.naturalWidth > 0) return { width: image.naturalWidth, height: image.naturalHeight, image };
  const width = Number(widget(node, "width")?.value) || 0, height = Number(widget(node, "height")?.value) || 0;
  if (width > 0 && height > 0 && !(node.inputs ?? []).some((input) => input.link != null && input.type === "IMAGE")) {
    return { width, height, image: null };
  }
  let above = null;
  for (let slot = 0; slot < (node.inputs ?? []).length && !above; slot++) {
    if (node.inputs[slot].link != null) above = upstreamPicture(node.getInputNode(slot), depth + 1);
  }
  if (width > 0 && height > 0) return { width, height, image: above?.image ?? null };
  if (!above) return null;
  if (width > 0) return { width, height: Math.max(1, Math.round((above.height * width) / above.width)), image: above.image };
  if (height > 0) return { width: Math.max(1, Math.round((above.width * height) / above.height)), height, image: above.image };
  return above;
}

class RegionsEditor {
  constructor(node) {
    this.node = node;
    this.boxes = [];
    this.text = null; // the boxes text the canvas shows
    this.people = null; // the people value last seen (a change adds or removes boxes)
    this.selected = -1;
    this.drag = null;
    this.preview = null; // the node's last preview image (layout pose)
    this.signature = "";

    this.element = document.createElement("div");
    this.element.style.cssText = "width: 100%; height: 100%; box-sizing: border-box; padding: 0; overflow: hidden;";
    this.canvas = document.createElement("canvas");
    this.canvas.tabIndex = 0;
    this.canvas.setAttribute("role", "img");
    this.canvas.setAttribute("aria-label", "Face-diffuser regions: drag a box to move it, its edges or corners to resize it");
    this.canvas.style.cssText = "display: block; width: 100%; height: 100%; outline: none; touch-action: none;";
    this.element.appendChild(this.canvas);

    this.widget = node.addDOMWidget("regions_editor", "facediffuser_regions_editor", this.element, {
      serialize: false, // not part of the workflow's widgets_values nor of the prompt: the boxes text is
      hideOnZoom: false,
      getValue: () => "",
      setValue: () => {},
      getMinHeight: () => MIN_HEIGHT,
    });
    this.widget.serialize = false;

    this.canvas.addEventListener("pointerdown", (event) => this.onPointerDown(event));
    this.canvas.addEventListener("pointermove", (event) => this.onPointerMove(event));
    this.canvas.addEventListener("pointerup", (event) => this.onPointerUp(event));
    this.canvas.addEventListener("pointercancel", (event) => this.onPointerUp(event));
    this.canvas.addEventListener("keydown", (event) => this.onKeyDown(event));
    this.timer = setInterval(() => this.poll(), POLL_MS);
  }

  remove() {
    clearInterval(this.timer);
  }

  value(name, fallback) {
    const w = widget(this.node, name);
    return w ? w.value : fallback;
  }

  layout() {
    return this.value("layout", "columns");
  }

  /** The picture's size and, where size_from comes from a Load Image (directly or through nodes such
   * as Upscale Image and VAE Encode), the picture itself; else the width and height widgets. */
  picture() {
    const slot = this.node.findInputSlot?.("size_from") ?? -1;
    const found = slot >= 0 ? upstreamPicture(this.node.getInputNode(slot)) : null;
    if (found) return found;
    return { width: Number(this.value("width", 512)) || 512, height: Number(this.value("height", 512)) || 512, image: null };
  }

  /** Picks up what changed on the node (the boxes text, people, size, prompt, layout, the canvas's size). */
  poll() {
    if (!this.canvas.isConnected) return;
    const text = String(this.value("boxes", ""));
    const people = Number(this.value("people", 2));
    if (this.layout() === "boxes" && !this.drag) {
      if (text !== this.text) {
        const parsed = parseBoxes(text);
        if (parsed) this.boxes = parsed;
        this.text = text;
      }
      if (this.people !== null && people !== this.people && parseBoxes(text)) this.setPeople(people);
    }
    this.people = people;
    if (this.state(this.canvas.getBoundingClientRect(), this.picture()) !== this.signature) this.draw();
  }

  /** Everything the drawing depends on, to redraw only on a change. */
  state(rect, picture) {
    return JSON.stringify([
      this.text, this.boxes, this.selected, this.layout(), Number(this.value("people", 2)), String(this.value("prompt", "")),
      picture.width, picture.height, picture.image?.src ?? null, this.preview?.src ?? null, rect.width, rect.height,
    ]);
  }

  /** Changing people keeps the first boxes, removes the last ones or adds new ones at the next free column. */
  setPeople(people) {
    const count = Math.max(1, Math.min(MAX_PEOPLE, people));
    const boxes = this.boxes.slice(0, count);
    for (let index = boxes.length; index < count; index++) boxes.push(columnBox(index, count));
    this.boxes = boxes;
    if (this.selected >= count) this.selected = -1;
    this.write();
  }

  /** The boxes widget gets the rounded text; the canvas keeps what the text says. */
  write() {
    const text = formatBoxes(this.boxes);
    this.boxes = parseBoxes(text) ?? this.boxes;
    this.text = text;
    const w = widget(this.node, "boxes");
    if (w && w.value !== text) w.value = text; // a widget's value setter calls its callback
    this.node.setDirtyCanvas?.(true, true);
    this.draw();
  }

  // geometry: canvas pixels (CSS pixels of the element before the canvas zoom) <-> fractions

  size() {
    return [this.canvas.clientWidth, this.canvas.clientHeight];
  }

  frame(width, height) {
    const [cw, ch] = this.size();
    const scale = Math.max(0, Math.min((cw - 2 * PAD) / width, (ch - 2 * PAD) / height));
    const fw = width * scale, fh = height * scale;
    return { x: (cw - fw) / 2, y: (ch - fh) / 2, w: fw, h: fh };
  }

  local(event) {
    const rect = this.canvas.getBoundingClientRect();
    const [cw, ch] = this.size();
    return [((event.clientX - rect.left) * cw) / (rect.width || 1), ((event.clientY - rect.top) * ch) / (rect.height || 1)];
  }

  draw() {
    const rect = this.canvas.getBoundingClientRect();
    const picture = this.picture();
    this.signature = this.state(rect, picture);
    const [cw, ch] = this.size();
    if (!cw || !ch) return;
    // one backing pixel per screen pixel at the canvas's current zoom
    const ratio = (rect.width / cw) * (window.devicePixelRatio || 1);
    const bw = Math.max(1, Math.round(cw * ratio)), bh = Math.max(1, Math.round(ch * ratio));
    if (this.canvas.width !== bw || this.canvas.height !== bh) {
      this.canvas.width = bw;
      this.canvas.height = bh;
    }
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(bw / cw, 0, 0, bh / ch, 0, 0);
    ctx.fillStyle = OUTSIDE;
    ctx.fillRect(0, 0, cw, ch);
    const layout = this.layout();
    if (layout === "pose") return this.drawPose(ctx, picture);
    const frame = this.frame(picture.width, picture.height);
    if (picture.image) ctx.drawImage(picture.image, frame.x, frame.y, frame.w, frame.h);
    const people = Number(this.value("people", 2));
    const boxes = layout === "boxes" ? this.boxes : Array.from({ length: people }, (_, index) => columnBox(index, people));
    this.drawBoxes(ctx, frame, boxes, picture.image ? null : BACKGROUND, layout === "boxes");
  }

  drawPose(ctx, picture) {
    const image = this.preview?.complete && this.preview.naturalWidth > 0 ? this.preview : null;
    const frame = image ? this.frame(image.naturalWidth, image.naturalHeight) : this.frame(picture.width, picture.height);
    if (image) return ctx.drawImage(image, frame.x, frame.y, frame.w, frame.h);
    ctx.fillStyle = rgb(BACKGROUND);
    ctx.fillRect(frame.x, frame.y, frame.w, frame.h);
    this.caption(ctx, frame, "Run to see the pose's boxes");
  }

  caption(ctx, frame, text) {
    ctx.font = "12px sans-serif";
    ctx.fillStyle = "rgb(200, 200, 200)";
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText(text, frame.x + frame.w / 2, frame.y + frame.h / 2);
    ctx.textAlign = "start";
  }

  /** The regions as the node's preview draws them: each tinted in its colour (overlaps mixed), outlined,
   * labelled "#k word"; with ``editable``, the selected box's handles. */
  drawBoxes(ctx, frame, boxes, background, editable) {
    if (background) {
      ctx.fillStyle = rgb(background);
      ctx.fillRect(frame.x, frame.y, frame.w, frame.h);
    }
    const colour = (index) => COLOURS[index % COLOURS.length];
    // cells between all box edges: each covered by a fixed set of boxes, filled with their mixed colour
    const xs = [...new Set(boxes.flatMap((b) => [b[0], b[2]]))].sort((a, b) => a - b);
    const ys = [...new Set(boxes.flatMap((b) => [b[1], b[3]]))].sort((a, b) => a - b);
    for (let i = 0; i + 1 < xs.length; i++) {
      for (let j = 0; j + 1 < ys.length; j++) {
        const cx = (xs[i] + xs[i + 1]) / 2, cy = (ys[j] + ys[j + 1]) / 2;
        const inside = boxes.map((b, k) => [b, k]).filter(([b]) => b[0] <= cx && cx < b[2] && b[1] <= cy && cy < b[3]);
        if (!inside.length) continue;
        const mixed = [0, 1, 2].map((c) => inside.reduce((sum, [, k]) => sum + colour(k)[c], 0) / inside.length);
        // cell edges on whole backing pixels: neighbouring cells of one box meet without a seam
        const snap = (v, ratio) => Math.round(v * ratio) / ratio;
        const rx = this.canvas.width / this.size()[0], ry = this.canvas.height / this.size()[1];
        const x0 = snap(frame.x + xs[i] * frame.w, rx), x1 = snap(frame.x + xs[i + 1] * frame.w, rx);
        const y0 = snap(frame.y + ys[j] * frame.h, ry), y1 = snap(frame.y + ys[j + 1] * frame.h, ry);
        if (background) {
          ctx.fillStyle = rgb(mixed.map((v, c) => background[c] * (1 - TINT) + v * TINT));
        } else {
          ctx.fillStyle = `rgba(${mixed.map(Math.round).join(", ")}, ${TINT})`;
        }
        ctx.fillRect(x0, y0, x1 - x0, y1 - y0);
      }
    }
    const words = markedWords(this.value("prompt", ""));
    const size = Math.max(10, Math.min(16, Math.round(Math.min(frame.w, frame.h) / 16)));
    boxes.forEach((b, k) => {
      const x0 = frame.x + b[0] * frame.w, y0 = frame.y + b[1] * frame.h;
      const w = (b[2] - b[0]) * frame.w, h = (b[3] - b[1]) * frame.h;
      ctx.strokeStyle = rgb(colour(k));
      ctx.lineWidth = 2;
      ctx.strokeRect(x0 + 1, y0 + 1, Math.max(0, w - 2), Math.max(0, h - 2));
      const label = `#${k + 1} ${words[k] ?? ""}`.trimEnd();
      ctx.font = `bold ${size}px sans-serif`;
      ctx.textBaseline = "top";
      ctx.lineWidth = 3;
      ctx.strokeStyle = "white";
      ctx.strokeText(label, x0 + 5, y0 + 5);
      ctx.fillStyle = rgb(colour(k));
      ctx.fillText(label, x0 + 5, y0 + 5);
    });
    if (editable && this.selected >= 0 && this.selected < boxes.length) {
      const b = boxes[this.selected];
      const xs3 = [b[0], (b[0] + b[2]) / 2, b[2]], ys3 = [b[1], (b[1] + b[3]) / 2, b[3]];
      ctx.fillStyle = "white";
      ctx.strokeStyle = rgb(colour(this.selected));
      ctx.lineWidth = 1;
      for (const x of xs3) {
        for (const y of ys3) {
          if (x === xs3[1] && y === ys3[1]) continue;
          const px = frame.x + x * frame.w, py = frame.y + y * frame.h;
          ctx.fillRect(px - 3, py - 3, 6, 6);
          ctx.strokeRect(px - 3, py - 3, 6, 6);
        }
      }
    }
  }

  // editing

  /** What a press at canvas point (x, y) grabs: {index, edges: {x0, y0, x1, y1}} or null. */
  hit(x, y) {
    const picture = this.picture();
    const frame = this.frame(picture.width, picture.height);
    const order = [...this.boxes.keys()].reverse(); // the box drawn last is on top
    if (this.selected >= 0) order.splice(order.indexOf(this.selected), 1), order.unshift(this.selected);
    const near = (a, b) => Math.abs(a - b) <= GRAB;
    for (const index of order) {
      const [b0, b1, b2, b3] = this.boxes[index];
      const x0 = frame.x + b0 * frame.w, x1 = frame.x + b2 * frame.w, y0 = frame.y + b1 * frame.h, y1 = frame.y + b3 * frame.h;
      if (x < x0 - GRAB || x > x1 + GRAB || y < y0 - GRAB || y > y1 + GRAB) continue;
      const edges = { x0: near(x, x0), x1: near(x, x1) && !near(x, x0), y0: near(y, y0), y1: near(y, y1) && !near(y, y0) };
      if (edges.x0 || edges.x1 || edges.y0 || edges.y1) return { index, edges };
    }
    for (const index of order) {
      const [b0, b1, b2, b3] = this.boxes[index];
      const fx = (x - frame.x) / frame.w, fy = (y - frame.y) / frame.h;
      if (b0 <= fx && fx <= b2 && b1 <= fy && fy <= b3) return { index, edges: null };
    }
    return null;
  }

  onPointerDown(event) {
    if (this.layout() !== "boxes" || event.button !== 0) return;
    event.stopPropagation(); // the press is the editor's, not the graph canvas's (no node drag)
    this.canvas.focus();
    const [x, y] = this.local(event);
    const grabbed = this.hit(x, y);
    this.selected = grabbed ? grabbed.index : -1;
    if (grabbed) {
      this.canvas.setPointerCapture(event.pointerId);
      this.drag = { ...grabbed, start: [x, y], box: [...this.boxes[grabbed.index]], moved: false };
    }
    this.draw();
  }

  onPointerMove(event) {
    if (this.layout() !== "boxes") return;
    const [x, y] = this.local(event);
    if (!this.drag) {
      const over = this.hit(x, y);
      const e = over?.edges;
      this.canvas.style.cursor = !over ? "default" : !e ? "move"
        : (e.x0 && e.y0) || (e.x1 && e.y1) ? "nwse-resize" : (e.x1 && e.y0) || (e.x0 && e.y1) ? "nesw-resize" : e.x0 || e.x1 ? "ew-resize" : "ns-resize";
      return;
    }
    event.stopPropagation();
    const picture = this.picture();
    const frame = this.frame(picture.width, picture.height);
    const dx = (x - this.drag.start[0]) / frame.w, dy = (y - this.drag.start[1]) / frame.h;
    this.boxes[this.drag.index] = this.moved(this.drag.box, this.drag.edges, dx, dy, picture);
    this.drag.moved = true;
    this.draw();
  }

  /** ``box`` moved by (dx, dy), or with ``edges`` those edges moved: inside the frame, at least a cell. */
  moved(box, edges, dx, dy, picture) {
    let [x0, y0, x1, y1] = box;
    const minW = Math.min(1, CELL / picture.width), minH = Math.min(1, CELL / picture.height);
    if (!edges) {
      dx = Math.min(Math.max(dx, -x0), 1 - x1);
      dy = Math.min(Math.max(dy, -y0), 1 - y1);
      return [x0 + dx, y0 + dy, x1 + dx, y1 + dy];
    }
    if (edges.x0) x0 = Math.min(Math.max(0, x0 + dx), x1 - minW);
    if (edges.x1) x1 = Math.max(Math.min(1, x1 + dx), x0 + minW);
    if (edges.y0) y0 = Math.min(Math.max(0, y0 + dy), y1 - minH);
    if (edges.y1) y1 = Math.max(Math.min(1, y1 + dy), y0 + minH);
    return [x0, y0, x1, y1];
  }

  onPointerUp(event) {
    if (!this.drag) return;
    event.stopPropagation();
    const moved = this.drag.moved;
    this.drag = null;
    if (this.canvas.hasPointerCapture?.(event.pointerId)) this.canvas.releasePointerCapture(event.pointerId);
    if (moved) this.write();
  }

  onKeyDown(event) {
    const step = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] }[event.key];
    if (!step || this.layout() !== "boxes" || this.selected < 0 || this.selected >= this.boxes.length) return;
    event.preventDefault();
    event.stopPropagation();
    const amount = event.shiftKey ? NUDGE * 10 : NUDGE;
    this.boxes[this.selected] = this.moved(this.boxes[this.selected], null, step[0] * amount, step[1] * amount, this.picture());
    this.write();
  }

  /** After a run: the node's preview (layout pose shows it). */
  showPreview(output) {
    const image = output?.images?.[0];
    if (!image) return;
    const params = new URLSearchParams({ filename: image.filename, type: image.type ?? "temp", subfolder: image.subfolder ?? "" });
    const picture = new Image();
    picture.onload = () => {
      this.preview = picture;
      this.draw();
    };
    picture.src = api.apiURL(`/view?${params}`);
  }
}

app.registerExtension({
  name: "facediffuser.regions_editor",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_TYPE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      this.facediffuserRegionsEditor = new RegionsEditor(this);
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      const result = onExecuted?.apply(this, arguments);
      this.facediffuserRegionsEditor?.showPreview(output);
      return result;
    };
    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      this.facediffuserRegionsEditor?.remove();
      return onRemoved?.apply(this, arguments);
    };
  },
});
