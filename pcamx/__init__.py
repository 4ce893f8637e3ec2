"""pcamx: specialize and compress DINOv3 ViT-S/16 for PatchCamelyon."""

__version__ = "0.1.0"
