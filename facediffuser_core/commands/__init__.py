"""The commands (``python -m facediffuser_core generate | download | convert | evaluate``, entry in
``facediffuser_core.__main__``): ``generate``, ``evaluate`` with its ``report``, ``download``, and the
ComfyUI they drive (``comfy_client``: graphs and ComfyUI's HTTP/websocket API; ``comfy_launch``: a
headless ComfyUI for one run). The top wing: may import every other; nothing but ``__main__`` imports it.
"""
