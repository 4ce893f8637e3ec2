"""The reference: PCam fine-tuning input, training and TTA code written the common way, to measure pcamx against.

h5py reads one patch per `__getitem__` (the file opened lazily in each worker), PIL augmentation through
torchvision, the Hugging Face `DINOv3ViTImageProcessor` per sample (a float32 (3, 224, 224) tensor: 21.8× the bytes
of the uint8 patch, to collate, pin and copy), a `DataLoader` with workers, fp32 eager AdamW steps, and TTA as a
loop of one fp32 forward per view. Nothing here is used by pcamx itself.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import h5py
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from pcamx.data.layout import X_KEY, Y_KEY
from pcamx.data.pcam import split_paths

PREFETCH_FACTOR = 2  # DataLoader's default


class ReferencePCamDataset(Dataset):
    """One PCam split, one sample per `__getitem__`: h5py read → PIL → [augmentation] → image processor.
    `jitter` (the ColorJitter strengths) turns the training augmentation on; None is eval mode."""

    def __init__(self, root: str | Path, split: str, resolution: int, jitter: Mapping[str, float] | None = None):
        # torchvision (the `bench` extra, which `make bench` installs) backs the reference and the HF processor.
        from torchvision import transforms as T
        from transformers import DINOv3ViTImageProcessor

        self.x_path, self.y_path = split_paths(root, split)
        with h5py.File(self.x_path, "r") as f:
            self.n = f[X_KEY].shape[0]
        # Rotations by multiples of 90° are exact in PIL (a transpose, no resampling).
        rot90 = T.RandomChoice([T.RandomRotation((angle, angle)) for angle in (0, 90, 180, 270)])
        self.augment = None if jitter is None else T.Compose(
            [T.RandomHorizontalFlip(), T.RandomVerticalFlip(), rot90, T.ColorJitter(**jitter)])
        self.processor = DINOv3ViTImageProcessor(size={"height": resolution, "width": resolution})
        self._files: tuple[h5py.File, h5py.File] | None = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self._files is None:  # opened on first use, i.e. inside each worker: h5py handles must not cross a fork
            self._files = h5py.File(self.x_path, "r"), h5py.File(self.y_path, "r")
        fx, fy = self._files
        img = Image.fromarray(fx[X_KEY][index])
        if self.augment is not None:
            img = self.augment(img)
        return self.processor(images=img, return_tensors="pt")["pixel_values"][0], int(fy[Y_KEY][index].item())

    def close(self) -> None:
        for f in self._files or ():
            f.close()
        self._files = None


def reference_loader(dataset: ReferencePCamDataset, batch_size: int, workers: int, shuffle: bool, pin_memory: bool,
                     seed: int = 0) -> DataLoader:
    """Batches forever (fresh permutations, or the file order again and again): one endless epoch keeps the
    workers busy across the repeats, where a new epoch per repeat would add the workers' restart stall."""
    sampler = RandomSampler(dataset, num_samples=2**62, generator=torch.Generator().manual_seed(seed)) if shuffle \
        else itertools.cycle(range(len(dataset)))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      drop_last=True, persistent_workers=workers > 0,
                      prefetch_factor=PREFETCH_FACTOR if workers > 0 else None)


# The usual TTA list on preprocessed NCHW batches, in the order of pcamx's dihedral(): identity and the 3 rotations,
# the 2 flips (the first six: the common set), the 2 diagonal reflections.
REFERENCE_VIEWS: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = (
    *(lambda x, k=k: torch.rot90(x, k, dims=(2, 3)) for k in range(4)), lambda x: torch.flip(x, dims=(3,)),
    lambda x: torch.flip(x, dims=(2,)), lambda x: x.transpose(2, 3), lambda x: torch.rot90(x, 2, (2, 3)).mT)


@torch.inference_mode()
def reference_tta(model: nn.Module, x: torch.Tensor, views: int) -> torch.Tensor:
    """P(tumour) averaged over the first `views` views, one fp32 forward per view."""
    if not 1 <= views <= len(REFERENCE_VIEWS):
        raise ValueError(f"views must be in 1..{len(REFERENCE_VIEWS)}, got {views}")
    return sum(torch.softmax(model(view(x)), dim=-1)[:, 1] for view in REFERENCE_VIEWS[:views]) / views


def reference_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                   label_smoothing: float, grad_clip: float) -> float:
    """One fp32 eager step on an already preprocessed batch (the same loss and clipping as pcamx's loop)."""
    loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip or math.inf)
    optimizer.step()
    return loss.item()
