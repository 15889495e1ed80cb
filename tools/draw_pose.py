"""Draw the two-person OpenPose skeleton image the pose workflow ships with, deterministically.

    python tools/draw_pose.py                  # writes workflows/inputs/pose_two_people.png
    python tools/draw_pose.py -o other.png

It draws as the OpenPose annotator of ControlNet 1.1 does (COCO's 18 body keypoints, its limb pairs
and colours): each joint a filled circle of radius 4, each limb an ellipse 4 px thick blended at 0.6
over a black 512 x 512 canvas. Two people stand side by side, so ``facediffuser_core.method.pose`` finds two
skeletons, left (the first marker's person) and right.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = (512, 512)
OUT = Path(__file__).resolve().parent.parent / "workflows" / "inputs" / "pose_two_people.png"
JOINT_RADIUS = 4
STICK_WIDTH = 4
# COCO-18 order: nose, neck, right shoulder/elbow/wrist, left shoulder/elbow/wrist, right hip/knee/ankle,
# left hip/knee/ankle, right eye, left eye, right ear, left ear (the person's right is the image's left)
STANDING = [
    (0, 110), (0, 160), (-45, 160), (-60, 235), (-65, 305), (45, 160), (60, 235), (65, 305),
    (-28, 300), (-30, 390), (-32, 475), (28, 300), (30, 390), (32, 475), (-10, 100), (10, 100), (-22, 105), (22, 105),
]  # fmt: skip
PEOPLE = (150, 362)  # the two people's horizontal centres
LIMBS = [(1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17)]
COLOURS = [
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0), (0, 255, 85), (0, 255, 170),
    (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
]  # fmt: skip


def ellipse(a: tuple[float, float], b: tuple[float, float], width: float) -> list[tuple[float, float]]:
    """The outline of the ellipse from joint ``a`` to joint ``b`` with semi-minor axis ``width``."""
    (x1, y1), (x2, y2) = a, b
    centre_x, centre_y, half = (x1 + x2) / 2, (y1 + y2) / 2, math.hypot(x2 - x1, y2 - y1) / 2
    angle = math.atan2(y2 - y1, x2 - x1)
    points = []
    for degrees in range(0, 360, 5):
        t = math.radians(degrees)
        u, v = half * math.cos(t), width * math.sin(t)
        points.append((centre_x + u * math.cos(angle) - v * math.sin(angle), centre_y + u * math.sin(angle) + v * math.cos(angle)))
    return points


def draw(people: list[list[tuple[float, float]]], size: tuple[int, int] = SIZE) -> Image.Image:
    """An OpenPose render of ``people`` (each 18 (x, y) keypoints in pixels), RGB on black."""
    canvas = Image.new("RGB", size)
    pen = ImageDraw.Draw(canvas)
    for keypoints in people:
        for (x, y), colour in zip(keypoints, COLOURS):
            pen.ellipse((x - JOINT_RADIUS, y - JOINT_RADIUS, x + JOINT_RADIUS, y + JOINT_RADIUS), fill=colour)
    for keypoints in people:
        for (start, end), colour in zip(LIMBS, COLOURS):
            layer = canvas.copy()
            ImageDraw.Draw(layer).polygon(ellipse(keypoints[start], keypoints[end], STICK_WIDTH), fill=colour)
            canvas = Image.blend(canvas, layer, 0.6)
    return canvas


def two_people() -> Image.Image:
    return draw([[(centre + dx, y) for dx, y in STANDING] for centre in PEOPLE])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", type=Path, default=OUT, help=f"where to write the PNG (default {OUT})")
    args = parser.parse_args()
    two_people().save(args.out, optimize=True)
    print(args.out)


if __name__ == "__main__":
    main()
