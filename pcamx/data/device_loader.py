"""Host → device batches. On CUDA each uint8 batch goes through a reused pinned staging buffer and a
non-blocking copy on a side stream, issued one batch ahead, so the copy of batch i+1 runs while the model
works on batch i; elsewhere batches are moved as they come.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

Batch = tuple[torch.Tensor, torch.Tensor]


def to_device(batches: Iterable[Batch], device: torch.device) -> Iterator[Batch]:
    """(images, labels) CPU batches → the same batches on `device`, in order."""
    if device.type == "cuda":
        yield from _prefetch_cuda(batches, device)
        return
    for images, labels in batches:
        yield images.to(device), labels.to(device)


class _PinnedSlot:
    """A pinned host buffer pair, reused for every other batch; `copied` marks when its last copy to the
    device finished reading it, so it is refilled only after that."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = torch.empty(images.shape, dtype=images.dtype, pin_memory=True)
        self.labels = torch.empty(labels.shape, dtype=labels.dtype, pin_memory=True)
        self.copied = torch.cuda.Event()

    def fits(self, images: torch.Tensor, labels: torch.Tensor) -> bool:
        return (self.images.shape[0] >= images.shape[0] and self.images.shape[1:] == images.shape[1:]
                and self.images.dtype == images.dtype and self.labels.dtype == labels.dtype)


def _prefetch_cuda(batches: Iterable[Batch], device: torch.device) -> Iterator[Batch]:
    stream = torch.cuda.Stream(device)
    slots: list[_PinnedSlot | None] = [None, None]

    def send(index: int, images: torch.Tensor, labels: torch.Tensor) -> tuple[Batch, torch.cuda.Event]:
        slot = slots[index % 2]
        if slot is None or not slot.fits(images, labels):
            slot = slots[index % 2] = _PinnedSlot(images, labels)
        else:
            slot.copied.synchronize()  # the copy two batches ago read this buffer: let it finish first
        n = images.shape[0]
        slot.images[:n].copy_(images)
        slot.labels[:n].copy_(labels)
        with torch.cuda.stream(stream):
            on_device = (slot.images[:n].to(device, non_blocking=True), slot.labels[:n].to(device, non_blocking=True))
            slot.copied.record(stream)
        return on_device, slot.copied

    def ready(batch: Batch, copied: torch.cuda.Event) -> Batch:
        current = torch.cuda.current_stream(device)
        current.wait_event(copied)  # this batch's copy only, not the next one already queued behind it
        for tensor in batch:
            tensor.record_stream(current)  # allocated on the side stream, used on this one
        return batch

    pending = None
    for index, (images, labels) in enumerate(batches):
        sent = send(index, images, labels)
        if pending is not None:
            yield ready(*pending)
        pending = sent
    if pending is not None:
        yield ready(*pending)
