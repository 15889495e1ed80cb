"""Draw the example picture the "into a photo" template loads (photo_park.png), deterministically.

    python tools/draw_example_photo.py             # writes workflows/inputs/photo_park.png
    python tools/draw_example_photo.py -o DIR

A park without people (sky, trees, a path, a bench), drawn rather than photographed so that nothing
of anyone's ships with the pack: the template puts its two people into it, each in a box, and keeps
the rest of the picture. The pack copies it into ComfyUI's input folder on first load
(``nodes/common.py``, ``add_example_inputs``), where the template's Load Image node finds it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent.parent / "workflows" / "inputs"
NAME = "photo_park.png"
SIZE = 512


def draw_park() -> Image.Image:
    """The park, SIZE x SIZE RGB: a sky gradient, trees, grass, a path and a bench."""
    image = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(image)
    for y in range(SIZE):  # sky fading to the horizon, grass darkening to the front
        if y < 230:
            t = y / 230
            draw.line((0, y, SIZE, y), fill=(int(110 + 90 * t), int(160 + 60 * t), int(225 + 20 * t)))
        else:
            t = (y - 230) / (SIZE - 230)
            draw.line((0, y, SIZE, y), fill=(int(100 - 40 * t), int(170 - 50 * t), int(70 - 30 * t)))
    for x, top, r in ((40, 120, 70), (150, 90, 80), (360, 100, 85), (470, 130, 65)):  # trees
        draw.rectangle((x - 9, top + r - 10, x + 9, 250), fill=(90, 60, 40))
        draw.ellipse((x - r, top - r // 2, x + r, top + r + 10), fill=(40, 110 + r // 3, 50))
    draw.polygon([(220, 230), (292, 230), (420, SIZE), (92, SIZE)], fill=(196, 176, 140))  # the path
    draw.rectangle((300, 300, 470, 318), fill=(120, 80, 50))  # the bench: seat, back, legs
    draw.rectangle((300, 262, 470, 276), fill=(120, 80, 50))
    for x in (310, 455):
        draw.rectangle((x, 318, x + 8, 350), fill=(60, 60, 60))
    draw.ellipse((440, 30, 490, 80), fill=(255, 240, 180))  # the sun
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=OUT, help="folder to write into")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    draw_park().save(args.output / NAME, optimize=True)
    print(f"wrote {args.output / NAME}")


if __name__ == "__main__":
    main()
