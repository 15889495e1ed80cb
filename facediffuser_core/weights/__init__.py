"""The weights: reading, classifying and converting checkpoints (official ``pytorch_model.bin`` to
safetensors), the folders a ComfyUI searches for each kind of model, and the ``download`` command line
that fills them. Imports only ``facediffuser_core.errors`` (no method, faces or commands module).
"""
