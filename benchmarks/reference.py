"""The reference: PCam fine-tuning input, training and TTA code written the common way, to measure pcamx against.

A `Dataset` that reads one patch per `__getitem__` with h5py (the file opened lazily in each worker, as usual
with h5py and forked workers), PIL augmentation through torchvision (flips, 90° rotations, ColorJitter), the
Hugging Face `DINOv3ViTImageProcessor` per sample (a float32 (3, 224, 224) tensor: 21.8× the bytes of the uint8
patch, to collate, pin and copy), a `DataLoader` with worker processes, fp32 eager training with AdamW, and TTA
as a Python loop of one fp32 forward per view. Nothing here is used by pcamx itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import h5py
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from pcamx.data.layout import X_KEY, Y_KEY
from pcamx.data.pcam import split_paths

PREFETCH_FACTOR = 2  # DataLoader's default


class RandomRot90:
    """Rotate a PIL image by a random multiple of 90° (PIL transpose: exact, no resampling)."""

    _OPS = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)

    def __call__(self, img: Image.Image) -> Image.Image:
        op = self._OPS[int(torch.randint(0, 4, ()))]
        return img if op is None else img.transpose(op)


class ReferencePCamDataset(Dataset):
    """One PCam split, one sample per `__getitem__`: h5py read → PIL → [augmentation] → image processor.
    `jitter` (the ColorJitter strengths) turns the training augmentation on; None is eval mode."""

    def __init__(self, root: str | Path, split: str, resolution: int, jitter: Mapping[str, float] | None = None):
        try:  # torchvision only backs the reference (and the HF processor's import): pcamx never needs it
            from torchvision import transforms as T
            from transformers import DINOv3ViTImageProcessor
        except ImportError as err:
            raise ImportError("the benchmark's reference pipeline needs torchvision: pip install -e '.[bench]' "
                              "(`make bench` installs it)") from err
        self.x_path, self.y_path = split_paths(root, split)
        with h5py.File(self.x_path, "r") as f:
            self.n = f[X_KEY].shape[0]
        self.augment = None if jitter is None else T.Compose(
            [T.RandomHorizontalFlip(), T.RandomVerticalFlip(), RandomRot90(), T.ColorJitter(**jitter)])
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


class EndlessSampler(Sampler[int]):
    """Indices forever: fresh permutations (shuffle) or 0..n-1 again and again. One endless epoch keeps the
    workers busy across the repeats; a new epoch per repeat would add the workers' restart stall."""

    def __init__(self, n: int, shuffle: bool, seed: int = 0):
        self.n, self.shuffle = n, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[int]:
        while True:
            order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
            yield from order.tolist()

    def __len__(self) -> int:  # DataLoader only uses it for len(loader); never exhausted here
        return 2**62


def reference_loader(dataset: ReferencePCamDataset, batch_size: int, workers: int, shuffle: bool, pin_memory: bool,
                     seed: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=EndlessSampler(len(dataset), shuffle, seed),
                      num_workers=workers, pin_memory=pin_memory, drop_last=True, persistent_workers=workers > 0,
                      prefetch_factor=PREFETCH_FACTOR if workers > 0 else None)


# The usual TTA list, on preprocessed NCHW batches, in the order of pcamx's dihedral(): the first six are the
# common "identity + 3 rotations + 2 flips" set.
REFERENCE_VIEWS: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = (
    lambda x: x,
    lambda x: torch.rot90(x, 1, dims=(2, 3)),
    lambda x: torch.rot90(x, 2, dims=(2, 3)),
    lambda x: torch.rot90(x, 3, dims=(2, 3)),
    lambda x: torch.flip(x, dims=(3,)),
    lambda x: torch.flip(x, dims=(2,)),
    lambda x: x.transpose(2, 3),
    lambda x: torch.rot90(x, 2, dims=(2, 3)).transpose(2, 3),
)


@torch.inference_mode()
def reference_tta(model: nn.Module, x: torch.Tensor, views: int) -> torch.Tensor:
    """P(tumour) averaged over the first `views` views, one fp32 forward per view."""
    if not 1 <= views <= len(REFERENCE_VIEWS):
        raise ValueError(f"views must be in 1..{len(REFERENCE_VIEWS)}, got {views}")
    return sum(torch.softmax(model(view(x)), dim=-1)[:, 1] for view in REFERENCE_VIEWS[:views]) / views


def reference_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                         label_smoothing: float, grad_clip: float) -> float:
    """One fp32 eager step on an already preprocessed batch (the same loss and clipping as pcamx's loop)."""
    loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip or math.inf)
    optimizer.step()
    return loss.item()
