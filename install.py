"""Run by ComfyUI-Manager after installing the pack, with ComfyUI's Python.

facenet-pytorch (face detection for the face-crop and identity nodes) pins an old torch, so it is
installed without its dependencies, and only when missing: ComfyUI's torch is never touched.
"""

import importlib.util
import subprocess
import sys

if importlib.util.find_spec("facenet_pytorch") is None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--no-deps", "facenet-pytorch"])
