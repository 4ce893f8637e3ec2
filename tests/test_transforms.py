"""Device transforms match the HF DINOv3 processor; the dihedral group and TTA behave as a group should."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from pcamx.data.transforms import (
    color_jitter,
    dihedral,
    dihedral_views,
    preprocess,
    random_dihedral,
)
from pcamx.evaluate import predict_batch
from pcamx.model import PCamClassifier, tiny_config


def random_images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 96, 96, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("resolution", [224, 96, 64])
def test_preprocess_matches_hf_image_processor(resolution: int) -> None:
    from transformers import DINOv3ViTImageProcessor

    images = random_images(4)
    processor = DINOv3ViTImageProcessor(size={"height": resolution, "width": resolution})
    expected = processor(images=[Image.fromarray(x.numpy()) for x in images], return_tensors="pt")["pixel_values"]
    ours = preprocess(images, resolution)
    assert ours.shape == expected.shape == (4, 3, resolution, resolution)
    assert (ours - expected).abs().max().item() < 1e-3


def test_eight_views_are_eight_distinct_transforms() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    views = [dihedral(x, k) for k in range(8)]
    flat = {tuple(v.flatten().tolist()) for v in views}
    assert len(flat) == 8
    # Each one is a permutation of the pixels (a symmetry of the square), and the group is closed.
    for v in views:
        assert sorted(v.flatten().tolist()) == list(range(16))
    for a in views:
        for k in range(8):
            assert tuple(dihedral(a, k).flatten().tolist()) in flat
    stacked = dihedral_views(torch.cat([x, x + 16]))
    assert stacked.shape == (16, 1, 4, 4)
    assert torch.equal(stacked[2 * 3 + 1], dihedral(x + 16, 3)[0])  # view-major layout


def test_random_dihedral_applies_one_group_element_per_image() -> None:
    x = torch.randn(64, 3, 8, 8)
    out = random_dihedral(x, torch.Generator().manual_seed(0))
    used = set()
    for i in range(64):
        matches = [k for k in range(8) if torch.equal(out[i], dihedral(x[i : i + 1], k)[0])]
        assert matches
        used.add(matches[0])
    assert len(used) > 4


def test_color_jitter_is_light_and_stays_in_range() -> None:
    x = torch.rand(16, 3, 8, 8)
    y = color_jitter(x, generator=torch.Generator().manual_seed(0))
    assert y.min() >= 0 and y.max() <= 1
    assert 0 < (y - x).abs().mean() < 0.1


def tiny_classifier() -> PCamClassifier:
    from transformers import DINOv3ViTModel

    torch.manual_seed(0)
    config = tiny_config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    return PCamClassifier(DINOv3ViTModel(config), 32).eval()


def test_tta_of_a_dihedral_symmetric_image_equals_plain_prediction() -> None:
    base = random_images(3)
    # Symmetrize under D4: average over the group orbit (in float, then round back to uint8).
    x = base.permute(0, 3, 1, 2).float()
    sym = torch.stack([dihedral(x, k) for k in range(8)]).mean(0)
    sym = sym.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    for k in range(8):
        assert torch.equal(dihedral(sym.permute(0, 3, 1, 2), k), sym.permute(0, 3, 1, 2))
    model = tiny_classifier()
    plain = predict_batch(model, sym, 64, tta=False)
    tta = predict_batch(model, sym, 64, tta=True)
    torch.testing.assert_close(tta, plain, atol=1e-5, rtol=0)
    # …while on ordinary images TTA really averages different predictions.
    assert not torch.allclose(predict_batch(model, base, 64, tta=True), predict_batch(model, base, 64, tta=False))


def test_tta_batched_equals_loop_over_views() -> None:
    images = random_images(5, seed=1)
    model = tiny_classifier()
    batched = predict_batch(model, images, 48, tta=True)
    # Views built independently: transform each uint8 image, then preprocess it alone.
    nchw = images.permute(0, 3, 1, 2)
    with torch.inference_mode():
        loop = torch.stack([
            torch.softmax(model(preprocess(dihedral(nchw, k).permute(0, 2, 3, 1), 48)), -1)[:, 1] for k in range(8)
        ]).mean(0)
    torch.testing.assert_close(batched, loop, atol=1e-5, rtol=0)
