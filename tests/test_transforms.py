"""Device transforms match the HF DINOv3 processor and torchvision's colour ops; the dihedral group and
the TTA view sets behave as they should."""

from __future__ import annotations

import itertools

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from conftest import tiny_model
from pcamx.data.transforms import (
    JITTER_OPS,
    TTA_VIEWS,
    ColorJitter,
    apply_color_jitter,
    dihedral,
    dihedral_views,
    preprocess,
    random_dihedral,
    resize_normalize,
    to_float,
)
from pcamx.evaluation.evaluate import predict_batch, view_count

TV_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


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


@pytest.mark.parametrize("size", [(40, 56), (56, 40)])
def test_a_non_square_input_is_resized_to_a_square_like_torchvision(size: tuple[int, int]) -> None:
    # One side already at the resolution: only a check of both sides resizes it.
    x = to_float(torch.randint(0, 256, (2, *size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)))
    expected = TF.normalize(TF.resize(x, [40, 40], interpolation=TF.InterpolationMode.BILINEAR, antialias=True),
                            mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    assert torch.allclose(resize_normalize(x, 40), expected, atol=1e-5)


def test_to_float_scales_to_the_asked_dtype() -> None:
    x = torch.tensor([[[[0, 51, 255]]]], dtype=torch.uint8)  # (1, 1, 1, 3) NHWC
    out = to_float(x, torch.float64)
    assert out.dtype == torch.float64 and out.shape == (1, 3, 1, 1)
    assert out.flatten().tolist() == [0.0, 0.2, 1.0]


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
    assert used == set(range(8))  # every element, the identity included


def jitter_inputs(n: int = 48) -> torch.Tensor:
    """Random images plus the cases HSV and clamping are delicate on: grey, saturated, two equal channels."""
    x = torch.rand(n, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    x[0] = 0.5
    x[1, :, :4] = 1.0
    x[2, 0] = x[2, 1]
    x[3, :, :, :6] = 0.0
    return x


def torchvision_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """torchvision's functional ops, one image at a time, each in its own order."""
    out = []
    for image, f, ops in zip(x, factors, order, strict=True):
        for op in ops.tolist():
            image = TV_OPS[op](image, f[op].item())
        out.append(image)
    return torch.stack(out)


def test_batched_jitter_equals_torchvision_per_image_with_fixed_factors_and_order() -> None:
    x = jitter_inputs()
    n = len(x)
    g = torch.Generator().manual_seed(0)
    # Wide factors (hue up to half a turn), every one of the 24 op orders.
    factors = torch.stack([0.3 + 1.4 * torch.rand(n, generator=g), 0.3 + 1.4 * torch.rand(n, generator=g),
                           0.3 + 1.4 * torch.rand(n, generator=g), torch.rand(n, generator=g) - 0.5], dim=1)
    perms = list(itertools.permutations(range(4)))
    order = torch.tensor([perms[i % len(perms)] for i in range(n)])
    ours = apply_color_jitter(x, factors, order)
    torch.testing.assert_close(ours, torchvision_jitter(x, factors, order), atol=1e-5, rtol=0)


def test_order_matters_so_the_batched_op_really_follows_each_images_order() -> None:
    x = jitter_inputs()[4:6]
    factors = torch.tensor([[1.5, 0.5, 1.5, 0.25]] * 2)
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    out = apply_color_jitter(x, factors, order)
    same_order = apply_color_jitter(x, factors, order[:1].expand(2, 4))
    assert not torch.allclose(out[1], same_order[1], atol=1e-3)
    torch.testing.assert_close(out, torchvision_jitter(x, factors, order), atol=1e-5, rtol=0)


def test_jitter_draws_torchvisions_factor_ranges_and_uniform_op_orders() -> None:
    jitter = ColorJitter(brightness=0.1, contrast=0.2, saturation=0.3, hue=0.03)  # distinct: no swaps pass
    factors, order = jitter.sample(48_000, torch.Generator().manual_seed(0))
    for i, (lo, hi) in enumerate([(0.9, 1.1), (0.8, 1.2), (0.7, 1.3), (-0.03, 0.03)]):
        f = factors[:, i].double()
        assert lo <= f.min() and f.max() <= hi
        assert f.min() < lo + 0.001 and f.max() > hi - 0.001  # the whole range is used
        assert f.mean().item() == pytest.approx((lo + hi) / 2, abs=0.002)  # uniform: mean and variance
        assert f.var().item() == pytest.approx((hi - lo) ** 2 / 12, rel=0.03)
    assert all(sorted(row) == [0, 1, 2, 3] for row in order[:1000].tolist())
    counts = torch.unique(order, dim=0, return_counts=True)[1]
    assert len(counts) == 24 and counts.min() > 1800 and counts.max() < 2200  # 2000 expected each
    # A strength above 1 clips the lower end at 0, as torchvision does.
    wide, _ = ColorJitter(1.5, 0.0, 0.0, 0.0).sample(1000, torch.Generator().manual_seed(1))
    assert wide[:, 0].min() >= 0 and wide[:, 0].max() <= 2.5


def test_jitter_call_is_sample_then_apply_and_zero_strength_skips_the_op() -> None:
    x = jitter_inputs()
    jitter = ColorJitter(0.2, 0.2, 0.2, 0.0)
    out = jitter(x, torch.Generator().manual_seed(5))
    factors, order = jitter.sample(len(x), torch.Generator().manual_seed(5))
    factors[:, JITTER_OPS.index("hue")] = 0.0
    torch.testing.assert_close(out, torchvision_jitter(x, factors, order), atol=1e-5, rtol=0)
    assert out.min() >= 0 and out.max() <= 1


def test_an_op_turned_off_does_not_stop_the_ops_after_it() -> None:
    x = jitter_inputs()
    jitter = ColorJitter(0.0, 0.3, 0.3, 0.05)  # brightness, the first op, off
    out = jitter(x, torch.Generator().manual_seed(6))
    factors, order = jitter.sample(len(x), torch.Generator().manual_seed(6))
    factors[:, JITTER_OPS.index("brightness")] = 1.0
    torch.testing.assert_close(out, torchvision_jitter(x, factors, order), atol=1e-5, rtol=0)
    assert not torch.allclose(out, x, atol=1e-3)
    assert ColorJitter(0.1, 0.1, 0.1, 0.5).hue == 0.5  # torchvision's upper bound is allowed


@pytest.mark.parametrize("bad", [{"hue": 0.6}, {"hue": -0.1}, {"brightness": -0.1}])
def test_bad_jitter_strengths_name_the_key(bad: dict) -> None:
    values = {"brightness": 0.1, "contrast": 0.1, "saturation": 0.1, "hue": 0.03, **bad}
    with pytest.raises(ValueError, match=f"data.jitter.{next(iter(bad))}"):
        ColorJitter(**values)
    assert ColorJitter.from_config(None) is None


def test_augmented_preprocess_is_dihedral_then_jitter_then_resize() -> None:
    images = random_images(6, seed=2)
    jitter = ColorJitter(0.3, 0.3, 0.3, 0.1)
    ours = preprocess(images, 64, augment=True, generator=torch.Generator().manual_seed(9), jitter=jitter)
    g = torch.Generator().manual_seed(9)
    x = random_dihedral(images.permute(0, 3, 1, 2).float() / 255, g)
    factors, order = jitter.sample(len(x), g)
    # resize_normalize itself is checked against the HF processor above.
    expected = resize_normalize(torchvision_jitter(x, factors, order), 64)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def test_tta_of_a_dihedral_symmetric_image_equals_plain_prediction() -> None:
    base = random_images(3)
    # Symmetrize under D4: average over the group orbit (in float, then round back to uint8).
    x = base.permute(0, 3, 1, 2).float()
    sym = torch.stack([dihedral(x, k) for k in range(8)]).mean(0)
    sym = sym.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    for k in range(8):
        assert torch.equal(dihedral(sym.permute(0, 3, 1, 2), k), sym.permute(0, 3, 1, 2))
    model = tiny_model()
    plain = predict_batch(model, sym, 64, 1)
    tta = predict_batch(model, sym, 64, 8)
    torch.testing.assert_close(tta, plain, atol=1e-5, rtol=0)
    # …while on ordinary images TTA really averages different predictions.
    assert not torch.allclose(predict_batch(model, base, 64, 8), predict_batch(model, base, 64, 1))


# The views as torchvision writes them, on uint8 NCHW images: the reference's six, then the other two of D4.
TORCHVISION_VIEWS = {
    "identity": lambda x: x,
    "hflip": TF.horizontal_flip,
    "vflip": TF.vertical_flip,
    "rot90": lambda x: TF.rotate(x, 90),
    "rot180": lambda x: TF.rotate(x, 180),
    "rot270": lambda x: TF.rotate(x, 270),
    "transpose": lambda x: TF.rotate(TF.horizontal_flip(x), 90),
    "antitranspose": lambda x: TF.rotate(TF.vertical_flip(x), 90),
}
REFERENCE_SIX = ("identity", "hflip", "vflip", "rot90", "rot180", "rot270")


@pytest.mark.parametrize("views", sorted(TTA_VIEWS))
def test_each_view_set_equals_a_loop_of_single_view_forwards(views: int) -> None:
    images = random_images(5, seed=1)
    model = tiny_model()
    batched = predict_batch(model, images, 48, views)
    names = {1: ("identity",), 6: REFERENCE_SIX, 8: tuple(TORCHVISION_VIEWS)}[views]
    nchw = images.permute(0, 3, 1, 2)
    with torch.inference_mode():
        loop = torch.stack([
            torch.softmax(model(preprocess(TORCHVISION_VIEWS[name](nchw).permute(0, 2, 3, 1), 48)), -1)[:, 1]
            for name in names
        ]).mean(0)
    torch.testing.assert_close(batched, loop, atol=1e-5, rtol=0)


def test_six_views_are_exactly_the_reference_transforms() -> None:
    x = random_images(2, seed=4).permute(0, 3, 1, 2)  # non-symmetric content: every view differs
    ours = dihedral_views(x, 6).view(6, *x.shape)
    for got, name in zip(ours, REFERENCE_SIX, strict=True):
        assert torch.equal(got, TORCHVISION_VIEWS[name](x)), name
    assert dihedral_views(x, 8).shape[0] == 8 * len(x) and torch.equal(dihedral_views(x, 1), x)
    with pytest.raises(ValueError, match="eval.tta_views must be one of"):
        dihedral_views(x, 4)


@pytest.mark.parametrize("tta,val_tta,views,expected", [
    (True, False, 6, (6, 1)), (False, False, 8, (1, 1)), (True, True, 8, (8, 8)), (False, True, 6, (1, 6)),
])
def test_view_count_follows_tta_switches(tta: bool, val_tta: bool, views: int, expected: tuple) -> None:
    cfg = {"tta": tta, "val_tta": val_tta, "tta_views": views}
    assert (view_count(cfg), view_count(cfg, validation=True)) == expected
