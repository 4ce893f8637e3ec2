"""The reference: PCam fine-tuning input and TTA code written the common way, to measure pcamx against.

* a `torch.utils.data.Dataset` that reads one patch per `__getitem__` from the HDF5 file with h5py
  (the file opened lazily in each worker, as usual with h5py and forked workers);
* PIL augmentation through torchvision transforms (flips, 90° rotations, ColorJitter);
* the Hugging Face `DINOv3ViTImageProcessor` per sample (rescale → resize to 224 → normalize), which
  yields a float32 (3, 224, 224) tensor: 21.8× the bytes of the 96×96×3 uint8 patch, to collate, pin
  and copy to the device;
* a `DataLoader` with worker processes and the default collate;
* TTA as a Python loop over views with one forward per view, fp32.

Nothing here is used by pcamx itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
# The reference protocol's ColorJitter (../shared/REFERENCE.md); pcamx's batched jitter runs the same.
JITTER = {"brightness": 0.1, "contrast": 0.1, "saturation": 0.1, "hue": 0.03}


class RandomRot90:
    """Rotate a PIL image by a random multiple of 90° (PIL transpose: exact, no resampling)."""

    _OPS = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)

    def __call__(self, img: Image.Image) -> Image.Image:
        op = self._OPS[int(torch.randint(0, 4, ()))]
        return img if op is None else img.transpose(op)


def reference_augmentation() -> Callable[[Image.Image], Image.Image]:
    try:  # torchvision only backs this reference pipeline: pcamx itself never needs it
        from torchvision import transforms as T
    except ImportError as err:
        raise ImportError("the benchmark's reference pipeline needs torchvision: pip install -e '.[bench]' "
                          "(`make bench` installs it)") from err
    return T.Compose([
        T.RandomHorizontalFlip(),
        T.RandomVerticalFlip(),
        RandomRot90(),
        T.ColorJitter(**JITTER),
    ])


class ReferencePCamDataset(Dataset):
    """One PCam split, one sample per `__getitem__`: h5py read → PIL → [augmentation] → image processor."""

    def __init__(self, root: str | Path, split: str, train: bool, resolution: int):
        self.x_path, self.y_path = split_paths(root, split)
        with h5py.File(self.x_path, "r") as f:
            self.n = f[X_KEY].shape[0]
        self.augment = reference_augmentation() if train else None
        from transformers import DINOv3ViTImageProcessor  # its import needs torchvision too

        self.processor = DINOv3ViTImageProcessor(size={"height": resolution, "width": resolution})
        self._x: h5py.Dataset | None = None
        self._y: h5py.Dataset | None = None

    def __len__(self) -> int:
        return self.n

    def _open(self) -> None:
        # Opened on first use, i.e. inside each worker: h5py handles must not cross a fork.
        self._fx, self._fy = h5py.File(self.x_path, "r"), h5py.File(self.y_path, "r")
        self._x, self._y = self._fx[X_KEY], self._fy[Y_KEY]

    def load(self, index: int) -> tuple[Image.Image, int]:
        """The raw patch as a PIL image and its label (HDF5 read + decode)."""
        if self._x is None:
            self._open()
        return Image.fromarray(self._x[index]), int(self._y[index].item())

    def transform(self, img: Image.Image) -> torch.Tensor:
        if self.augment is not None:
            img = self.augment(img)
        return self.processor(images=img, return_tensors="pt")["pixel_values"][0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img, label = self.load(index)
        return self.transform(img), label

    def close(self) -> None:
        if self._x is not None:
            self._fx.close()
            self._fy.close()
            self._x = self._y = None


class EndlessSampler(Sampler[int]):
    """Indices forever: fresh permutations (shuffle) or 0..n-1 again and again.

    One endless epoch keeps the workers busy across the benchmark's repeats; a new epoch per repeat
    would add the workers' restart stall to the reference's figure.
    """

    def __init__(self, n: int, shuffle: bool, seed: int = 0):
        self.n, self.shuffle = n, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[int]:
        while True:
            order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
            yield from order.tolist()

    def __len__(self) -> int:  # DataLoader only uses it for len(loader); never exhausted here
        return 2**62


def reference_loader(
    dataset: ReferencePCamDataset, batch_size: int, workers: int, shuffle: bool, pin_memory: bool, seed: int = 0
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EndlessSampler(len(dataset), shuffle, seed),
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=workers > 0,
        prefetch_factor=PREFETCH_FACTOR if workers > 0 else None,
    )


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


# The usual TTA list, on preprocessed NCHW batches. Same order as pcamx's dihedral(): the first six are
# the common "identity + 3 rotations + 2 flips" set.
REFERENCE_VIEWS: tuple[tuple[str, Callable[[torch.Tensor], torch.Tensor]], ...] = (
    ("identity", _identity),
    ("rot90", lambda x: torch.rot90(x, 1, dims=(2, 3))),
    ("rot180", lambda x: torch.rot90(x, 2, dims=(2, 3))),
    ("rot270", lambda x: torch.rot90(x, 3, dims=(2, 3))),
    ("hflip", lambda x: torch.flip(x, dims=(3,))),
    ("vflip", lambda x: torch.flip(x, dims=(2,))),
    ("transpose", lambda x: x.transpose(2, 3)),
    ("antitranspose", lambda x: torch.rot90(x, 2, dims=(2, 3)).transpose(2, 3)),
)


@torch.inference_mode()
def reference_tta(model: nn.Module, x: torch.Tensor, views: int = 8) -> torch.Tensor:
    """P(tumor) averaged over the first `views` views, one fp32 forward per view."""
    if not 1 <= views <= len(REFERENCE_VIEWS):
        raise ValueError(f"views must be in 1..{len(REFERENCE_VIEWS)}, got {views}")
    total = torch.zeros(x.shape[0], device=x.device)
    for _, view in REFERENCE_VIEWS[:views]:
        total += torch.softmax(model(view(x)), dim=-1)[:, 1]
    return total / views


def reference_train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor
) -> float:
    """One fp32 eager step on an already preprocessed batch (the same loss/clipping as pcamx's loop)."""
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return loss.item()
