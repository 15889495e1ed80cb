"""The faces: detection and crops (``detection``, MTCNN from facenet-pytorch, imported lazily), the
paper's scores (``identity``: FaceNet Identity Preservation; ``consistency``: CLIP Prompt Consistency)
and the Face Detailer's placement and matching (``detailer``).
May import the method and weights wings and ``facediffuser_core.errors``; never the commands.
"""
