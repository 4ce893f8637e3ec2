"""Structured compression of the DINOv3 backbone (heads, MLP neurons, blocks, truncated SVD), compressed
checkpoints, and quantization for inference."""
