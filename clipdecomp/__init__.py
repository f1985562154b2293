"""clipdecomp: exact text-based decomposition of CLIP-ViT image representations."""

__version__ = "0.1.0"
