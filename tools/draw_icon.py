"""Draw the pack's icon (the Comfy Registry's and ComfyUI-Manager's picture of it), deterministically.

    python tools/draw_icon.py                  # writes icon.png
    python tools/draw_icon.py -o other.png

A square: two people, head and shoulders, side by side in the first two markers' region colours
(``facediffuser_core.method.regions.COLOURS``, as the Regions node's preview draws them), each framed
by a region box, on a dark ground; drawn at 4x and scaled down for smooth edges.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw

SIZE = 400  # pixels, square
SCALE = 4  # supersampling
OUT = Path(__file__).resolve().parent.parent / "icon.png"
GROUND = (24, 26, 33)
COLOURS = ((230, 60, 60), (50, 120, 240))  # facediffuser_core.method.regions.COLOURS[:2]
# Per person: the region box (x0, y0, x1, y1) and the head's centre and radius, in fractions of the side
PEOPLE = (((0.07, 0.16, 0.57, 0.93), (0.32, 0.42), 0.12), ((0.43, 0.07, 0.93, 0.84), (0.68, 0.33), 0.12))


def draw_icon(size: int = SIZE) -> Image.Image:
    """The icon as an RGB image of ``size`` x ``size`` pixels."""
    side = size * SCALE
    image = Image.new("RGB", (side, side), GROUND)
    line = side // 60
    for (box, (cx, cy), radius), colour in zip(PEOPLE, COLOURS):
        x0, y0, x1, y1 = (round(v * side) for v in box)
        person = Image.new("L", (side, side), 0)  # the person, cut off at the box's inner edge
        draw = ImageDraw.Draw(person)
        head = radius * side
        draw.ellipse((cx * side - 1.9 * head, cy * side + 1.3 * head, cx * side + 1.9 * head, cy * side + 5.0 * head), fill=255)
        draw.ellipse((cx * side - head - line, cy * side - head - line, cx * side + head + line, cy * side + head + line), fill=0)
        draw.ellipse((cx * side - head, cy * side - head, cx * side + head, cy * side + head), fill=255)
        inside = Image.new("L", (side, side), 0)
        ImageDraw.Draw(inside).rounded_rectangle((x0, y0, x1, y1), radius=side // 40, fill=255)
        image.paste(GROUND, mask=inside)  # the box hides what lies behind it
        image.paste(colour, mask=ImageChops.darker(person, inside))
        ImageDraw.Draw(image).rounded_rectangle((x0, y0, x1, y1), radius=side // 40, outline=colour, width=line)
    return image.resize((size, size), Image.LANCZOS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=OUT)
    parser.add_argument("--size", type=int, default=SIZE)
    args = parser.parse_args()
    draw_icon(args.size).save(args.output, optimize=True)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
