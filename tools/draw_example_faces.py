"""Draw the two example portraits the shipped workflows load (face_1.png, face_2.png), deterministically.

    python tools/draw_example_faces.py             # writes workflows/inputs/face_1.png and face_2.png
    python tools/draw_example_faces.py -o DIR

Drawn, not photographed: nobody's likeness ships with the pack, and the pictures taken of the workflows
for the README show them. MTCNN (the Face Crop node's detector) finds the face in each, so every
template runs as it is opened; the pack copies them into ComfyUI's input folder on first load
(``nodes/common.py``, ``add_example_inputs``), where the templates' Load Image nodes find them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent.parent / "workflows" / "inputs"
SIZE = 512
LOOKS = (  # background, skin, hair, shirt
    ((176, 208, 232), (236, 194, 160), (70, 46, 30), (60, 90, 150)),
    ((232, 214, 170), (196, 140, 104), (30, 26, 24), (150, 60, 60)),
)


def draw_portrait(background: tuple, skin: tuple, hair: tuple, shirt: tuple) -> Image.Image:
    """One head-and-shoulders portrait, SIZE x SIZE RGB."""
    image = Image.new("RGB", (SIZE, SIZE), background)
    draw = ImageDraw.Draw(image)
    draw.ellipse((96, 400, 416, 640), fill=shirt)  # shoulders
    draw.rectangle((226, 330, 286, 420), fill=skin)  # neck
    draw.ellipse((146, 70, 366, 250), fill=hair)  # hair
    draw.ellipse((156, 110, 356, 370), fill=skin)  # face
    for x in (210, 302):
        draw.ellipse((x - 22, 208, x + 22, 236), fill=(250, 250, 250))  # eyes
        draw.ellipse((x - 10, 212, x + 10, 232), fill=(50, 40, 35))
        draw.line((x - 26, 192, x + 24, 188), fill=hair, width=7)  # brows
    draw.line((256, 240, 248, 290, 262, 292), fill=tuple(c - 40 for c in skin), width=4)  # nose
    draw.arc((216, 290, 296, 340), 20, 160, fill=(150, 60, 60), width=6)  # mouth
    return image


def example_faces() -> dict[str, Image.Image]:
    """{"face_1.png": portrait, "face_2.png": portrait}: the names the shipped workflows load."""
    return {f"face_{index}.png": draw_portrait(*look) for index, look in enumerate(LOOKS, start=1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=OUT, help="folder to write into")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    for name, image in example_faces().items():
        image.save(args.output / name, optimize=True)
        print(f"wrote {args.output / name}")


if __name__ == "__main__":
    main()
