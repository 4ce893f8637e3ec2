"""Energy-based structured compression of the DINOv3 backbone: heads, MLP neurons, truncated SVD."""

from pcamx.compress.chain import METHODS, compress
from pcamx.compress.energy import keep_by_energy, validate_tau
from pcamx.compress.heads import prune_attention_heads
from pcamx.compress.mlp import prune_mlp_neurons
from pcamx.compress.spec import (
    CheckpointMismatchError,
    architecture_spec,
    load_compressed,
    save_compressed,
)
from pcamx.compress.svd import SVD_TARGETS, LowRankLinear, truncated_svd

__all__ = [
    "METHODS",
    "SVD_TARGETS",
    "CheckpointMismatchError",
    "LowRankLinear",
    "architecture_spec",
    "compress",
    "keep_by_energy",
    "load_compressed",
    "prune_attention_heads",
    "prune_mlp_neurons",
    "save_compressed",
    "truncated_svd",
    "validate_tau",
]
