"""The method: Face-diffuser itself, as tensors in and tensors out.

Prompt parsing, the subject encoder (CLIP ViT-L/14 + postfuse) and its preprocessing, subjects with
several photos, the stage schedule, Saliency-adaptive Noise Fusion, per-stage guidance, the reference
DDIM sampler, regions (per-person masks, regional cross-attention) and pose boxes.
Imports no other wing: only ``facediffuser_core.errors`` and third-party libraries.
"""
