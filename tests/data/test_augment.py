"""advreg.data.augment against independent references: brute-force crop/flip/cutout checks, Pillow for every
AutoAugment op, numpy for channel statistics.

Tolerances (uint8 levels): equalize, invert, solarize, posterize exact; autocontrast and the four enhance ops
within 1 (Pillow truncates, we round); geometric ops with NEAREST exact on all but ≤ 1% of the pixels
(Pillow's 16.16 fixed point can fall on the other side of an exact tie), BILINEAR / BICUBIC within 1.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from advreg.data import augment as A

GRAY = (128, 128, 128)
RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def _images(n: int, channels: int = 3, seed: int = 0, size: int = 32) -> np.ndarray:
    """(N, H, W, C) uint8: blocky structure plus noise, each image squeezed into its own random range."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = np.kron(rng.uniform(0, 1, (size // 4, size // 4, channels)), np.ones((4, 4, 1)))
        img = 0.7 * base + 0.3 * rng.uniform(0, 1, (size, size, channels))
        lo, hi = sorted(rng.uniform(0, 255, 2))
        out.append(np.round(lo + (hi - lo) * img).astype(np.uint8))
    return np.stack(out)


def _tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _pil(a: np.ndarray) -> Image.Image:
    return Image.fromarray(a if a.shape[2] == 3 else a[:, :, 0])


def _array(img: Image.Image) -> np.ndarray:
    a = np.asarray(img)
    return a if a.ndim == 3 else a[:, :, None]


def _diff(ours: torch.Tensor, reference: np.ndarray) -> np.ndarray:
    if ours.dtype != torch.uint8:
        ours = (ours.double() * 255).round().to(torch.uint8)
    return np.abs(ours.permute(0, 2, 3, 1).numpy().astype(int) - reference.astype(int))


ARR = _images(4)
X = _tensor(ARR)


# ------------------------------------------------------------------------------------ crop, flip, cutout


def test_crop_is_a_window_of_the_zero_padded_input_and_every_offset_is_reachable():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (3000, 1, 6, 6), dtype=torch.uint8, generator=gen)  # no zeros: windows unique
    out = A.random_crop(x, 4, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    found = torch.full((len(x),), -1)
    for k in range(81):
        oy, ox = divmod(k, 9)
        match = (out == padded[:, :, oy : oy + 6, ox : ox + 6]).flatten(1).all(1)
        assert not (match & (found >= 0)).any()  # exactly one window matches
        found[match] = k
    assert (found >= 0).all()
    assert set(found.tolist()) == set(range(81))
    again = A.random_crop(x, 4, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    assert not torch.equal(out, A.random_crop(x, 4, torch.Generator().manual_seed(2)))


def test_crop_keeps_dtype_and_pads_with_fill():
    x = torch.rand(5, 3, 8, 8, dtype=torch.float64)
    out = A.random_crop(x, 2, torch.Generator().manual_seed(0), fill=0.5)
    assert out.dtype == torch.float64 and out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=0.5)
    for i in range(len(x)):
        assert any(torch.equal(out[i], padded[i, :, a : a + 8, b : b + 8]) for a in range(5) for b in range(5))
    assert torch.equal(A.random_crop(x, 0, torch.Generator()), x)
    with pytest.raises(ValueError):
        A.random_crop(x, -1)


def test_flip_is_identity_or_mirror_and_about_half():
    x = torch.randint(0, 256, (2000, 3, 4, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = A.horizontal_flip(x, torch.Generator().manual_seed(3))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all()
    assert 0.45 < mirrored.float().mean() < 0.55
    assert torch.equal(A.horizontal_flip(x, torch.Generator(), p=0.0), x)
    assert torch.equal(A.horizontal_flip(x, torch.Generator(), p=1.0), x.flip(-1))


@pytest.mark.parametrize("size", [16, 8, 5])
def test_cutout_zeroes_exactly_one_clipped_square(size):
    x = torch.randint(1, 256, (400, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = A.cutout(x, size, torch.Generator().manual_seed(1))
    zero = out == 0
    assert torch.equal(zero[:, :1].expand_as(zero), zero)  # the same square in every channel
    assert torch.equal(out[~zero], x[~zero])  # the rest unchanged
    rows, cols = zero[:, 0].any(2), zero[:, 0].any(1)  # (N, H), (N, W)
    assert torch.equal(zero[:, 0], rows[:, :, None] & cols[:, None, :])  # a rectangle...
    clipped = 0
    for r, c in zip(rows, cols):
        r_idx, c_idx = r.nonzero().flatten(), c.nonzero().flatten()
        for idx, n in ((r_idx, 32), (c_idx, 32)):
            assert len(idx) >= 1 and idx[-1] - idx[0] + 1 == len(idx)  # ...of contiguous rows and columns
            touches = idx[0] == 0 or idx[-1] == n - 1
            assert len(idx) == size or (touches and len(idx) < size)  # size×size unless clipped
            clipped += int(len(idx) < size)
    assert clipped > 0
    assert torch.equal(A.cutout(x, 0, torch.Generator()), x)


# ------------------------------------------------------------------------------------ ops vs Pillow


@pytest.mark.parametrize(
    "name, ours, reference",
    [
        ("equalize", A.equalize, ImageOps.equalize),
        ("invert", A.invert, ImageOps.invert),
    ],
)
def test_exact_ops_match_pillow(name, ours, reference):
    ref = np.stack([_array(reference(_pil(a))) for a in ARR])
    assert _diff(ours(X), ref).max() == 0
    assert _diff(ours(X.float() / 255), ref).max() == 0


def test_solarize_and_posterize_match_pillow_exactly():
    for threshold in (0, 26, 100.5, 128, 256):
        ref = np.stack([_array(ImageOps.solarize(_pil(a), threshold)) for a in ARR])
        assert _diff(A.solarize(X, threshold), ref).max() == 0
    for bits in (1, 4, 6, 8):
        ref = np.stack([_array(ImageOps.posterize(_pil(a), bits)) for a in ARR])
        assert _diff(A.posterize(X, bits), ref).max() == 0
        assert _diff(A.posterize(X.double() / 255, bits), ref).max() == 0
    per_image = A.posterize(X, torch.tensor([1, 4, 6, 8]))
    for i, bits in enumerate((1, 4, 6, 8)):
        assert _diff(per_image[i : i + 1], _array(ImageOps.posterize(_pil(ARR[i]), bits))[None]).max() == 0


def test_equalize_matches_pillow_on_sparse_and_flat_histograms():
    sparse = np.full((32, 32, 3), 10, np.uint8)
    sparse.reshape(-1, 3)[:524] = 200  # step = (1024 - 524) // 255 = 1: Pillow's table overflows 255
    flat = np.full((32, 32, 3), 77, np.uint8)
    arr = np.stack([sparse, flat])
    ref = np.stack([_array(ImageOps.equalize(_pil(a))) for a in arr])
    assert _diff(A.equalize(_tensor(arr)), ref).max() == 0


def test_autocontrast_matches_pillow_within_one_level():
    arr = np.concatenate([ARR, np.full((1, 32, 32, 3), 90, np.uint8)])  # + a flat image, kept as is
    ref = np.stack([_array(ImageOps.autocontrast(_pil(a))) for a in arr])
    assert _diff(A.auto_contrast(_tensor(arr)), ref).max() <= 1
    assert _diff(A.auto_contrast(_tensor(arr).float() / 255), ref).max() <= 1


@pytest.mark.parametrize("name", ["Color", "Contrast", "Brightness", "Sharpness"])
def test_enhance_ops_match_pillow_within_one_level(name):
    ours = {"Color": A.color, "Contrast": A.contrast, "Brightness": A.brightness, "Sharpness": A.sharpness}[name]
    enhancer = getattr(ImageEnhance, name)
    for factor in (0.1, 0.55, 1.0, 1.62, 1.9):
        ref = np.stack([_array(enhancer(_pil(a)).enhance(factor)) for a in ARR])
        assert _diff(ours(X, factor), ref).max() <= 1, factor
        assert _diff(ours(X.float() / 255, factor), ref).max() <= 1, factor
    factors = [0.1, 0.7, 1.3, 1.9]  # one per image
    ref = np.stack([_array(enhancer(_pil(a)).enhance(f)) for a, f in zip(ARR, factors)])
    assert _diff(ours(X, torch.tensor(factors)), ref).max() <= 1


def test_sharpness_keeps_border_pixels():
    out = A.sharpness(X, 0.1)
    interior = torch.zeros(32, 32, dtype=torch.bool)
    interior[1:-1, 1:-1] = True
    assert torch.equal(out[..., ~interior], X[..., ~interior])
    assert not torch.equal(out[..., interior], X[..., interior])


def _pil_affine(data, interpolation):
    return lambda img: img.transform(img.size, Image.AFFINE, data, RESAMPLE[interpolation], fillcolor=GRAY)


GEOMETRIC = [  # (op, argument, Pillow reference) at the reference magnitudes and a few others
    *[(A.shear_x, s, lambda s: (1, s, 0, 0, 1, 0)) for s in (-0.3, -0.21, 0.1 * 7 / 3, 0.27)],
    *[(A.shear_y, s, lambda s: (1, 0, 0, s, 1, 0)) for s in (-0.3 * 8 / 9, 0.13, 0.3)],
    *[(A.translate_x, t, lambda t: (1, 0, t, 0, 1, 0)) for t in (-150 / 331 * 32, -3, 9, 150 / 331 * 8 / 9 * 32)],
    *[(A.translate_y, t, lambda t: (1, 0, 0, 0, 1, t)) for t in (-9, 4.3, 150 / 331 * 32)],
]


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic"])
def test_geometric_ops_match_pillow_transform(interpolation):
    for op, arg, data in GEOMETRIC:
        ref = np.stack([_array(_pil_affine(data(arg), interpolation)(_pil(a))) for a in ARR])
        d = _diff(op(X, arg, interpolation=interpolation), ref)
        if interpolation == "nearest":
            assert (d > 0).mean() <= 0.01, (op.__name__, arg)
        else:
            assert d.max() <= 1, (op.__name__, arg)


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_rotate_matches_pillow_rotate(interpolation):
    for degrees in (-30, -20 / 3, 13.3, 27, 30):
        ref = np.stack([_array(_pil(a).rotate(degrees, resample=RESAMPLE[interpolation], fillcolor=GRAY)) for a in ARR])
        d = _diff(A.rotate(X, degrees, interpolation=interpolation), ref)
        assert (d > 0).mean() <= 0.01 if interpolation == "nearest" else d.max() <= 1, degrees


def test_geometric_ops_take_one_argument_per_image_and_a_per_channel_fill():
    shears = torch.tensor([-0.3, -0.1, 0.1, 0.3])
    out = A.shear_x(X, shears, fill=(0.0, 0.5, 1.0))
    for i, s in enumerate(shears.tolist()):
        img = _pil(ARR[i]).transform((32, 32), Image.AFFINE, (1, s, 0, 0, 1, 0), Image.NEAREST, fillcolor=(0, 128, 255))
        assert (_diff(out[i : i + 1], _array(img)[None]) > 0).mean() <= 0.01
    with pytest.raises(ValueError):
        A.shear_x(X, torch.tensor([0.1, 0.2]))


def test_grayscale_ops_match_pillow_mode_l():
    arr = _images(3, channels=1, seed=5)
    x = _tensor(arr)
    assert x.shape[1] == 1
    for ours, ref in [(A.equalize, ImageOps.equalize), (A.invert, ImageOps.invert)]:
        assert _diff(ours(x), np.stack([_array(ref(_pil(a))) for a in arr])).max() == 0
    for name, ours in [("Contrast", A.contrast), ("Sharpness", A.sharpness), ("Color", A.color)]:
        ref = np.stack([_array(getattr(ImageEnhance, name)(_pil(a)).enhance(0.3)) for a in arr])
        assert _diff(ours(x, 0.3), ref).max() <= 1, name
    assert torch.equal(A.color(x, 0.3), x)  # a gray image has no color to remove
    ref = np.stack([_array(_pil(a).rotate(20, fillcolor=128)) for a in arr])
    assert (_diff(A.rotate(x, 20), ref) > 0).mean() <= 0.01


# ------------------------------------------------------------------------------------ policy and mapping


def test_cifar10_policy_table():
    policy = A.CIFAR10_POLICY
    assert len(policy) == 25
    for sub in policy:
        assert len(sub) == 2
        for op, p, level in sub:
            assert op in A.OPS and 0 <= p <= 1 and isinstance(level, int) and 0 <= level <= 9
    assert len(A.OPS) == 14
    assert policy[0] == (("Invert", 0.1, 7), ("Contrast", 0.2, 6))  # the paper's first and last rows
    assert policy[16] == (("Equalize", 0.2, 8), ("Equalize", 0.6, 4))
    assert policy[24] == (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, 1))


def test_magnitude_mappings():
    def arg(op, level, sign=1, scheme="amp"):
        return float(A.op_argument(op, level, sign, scheme=scheme, size=(32, 32)))

    assert arg("ShearX", 9) == pytest.approx(0.3) and arg("ShearY", 9, -1) == pytest.approx(-0.3)
    assert arg("TranslateX", 9) == pytest.approx(150 / 331 * 32)
    assert arg("Rotate", 9, -1) == pytest.approx(-30)
    assert arg("Solarize", 0) == 256 and arg("Solarize", 9) == pytest.approx(0)
    assert [arg("Posterize", level) for level in range(10)] == list(np.round(np.linspace(8, 4, 10)))
    assert arg("Color", 9, 1) == pytest.approx(1.9) and arg("Contrast", 9, -1) == pytest.approx(0.1)
    assert arg("Sharpness", 0, -1) == 1
    assert arg("ShearX", 9, scheme="tf") == pytest.approx(0.27)
    assert arg("TranslateY", 9, -1, scheme="tf") == -9 and arg("Rotate", 9, scheme="tf") == 27
    assert arg("Solarize", 9, scheme="tf") == 256 - 230 and arg("Posterize", 9, scheme="tf") == 1
    assert arg("Brightness", 9, -1, scheme="tf") == pytest.approx(1.72)  # no sign in the official code
    assert A.op_argument("Equalize", 5) is None
    with pytest.raises(ValueError):
        A.op_argument("Rotate", 3, scheme="torchvision")


# ------------------------------------------------------------------------------------ AutoAugment


def test_autoaugment_applies_each_image_one_sub_policy_in_order():
    policy = ((("Invert", 1.0, 0), ("Equalize", 1.0, 0)), (("Solarize", 1.0, 4), ("Posterize", 1.0, 9)))
    x = _tensor(_images(40, seed=2))
    out = A.autoaugment(x, torch.Generator().manual_seed(0), policy=policy)
    first = A.equalize(A.invert(x))
    second = A.posterize(A.solarize(x, 256 - 256 * 4 / 9), 4)
    is_first = (out == first).flatten(1).all(1)
    is_second = (out == second).flatten(1).all(1)
    assert (is_first | is_second).all() and is_first.any() and is_second.any()


def test_autoaugment_draws_signs_and_probabilities():
    x = _tensor(_images(60, seed=3))
    out = A.autoaugment(x, torch.Generator().manual_seed(0), policy=((("Rotate", 1.0, 9), ("Invert", 0.0, 0)),))
    plus, minus = A.rotate(x, 30.0), A.rotate(x, -30.0)
    is_plus, is_minus = (out == plus).flatten(1).all(1), (out == minus).flatten(1).all(1)
    assert (is_plus | is_minus).all() and is_plus.any() and is_minus.any()
    half = A.autoaugment(x, torch.Generator().manual_seed(1), policy=((("Invert", 0.5, 0), ("Invert", 0.0, 0)),))
    inverted = (half == 255 - x).flatten(1).all(1)
    assert (inverted | (half == x).flatten(1).all(1)).all() and 0.25 < inverted.float().mean() < 0.75


@pytest.mark.parametrize("scheme", A.SCHEMES)
def test_autoaugment_cifar_is_seeded_and_keeps_dtype(scheme):
    x = _tensor(_images(64, seed=4))
    out = A.autoaugment_cifar(x, torch.Generator().manual_seed(0), scheme=scheme)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out, A.autoaugment_cifar(x, torch.Generator().manual_seed(0), scheme=scheme))
    assert not torch.equal(out, x)
    xf = x.float() / 255
    outf = A.autoaugment_cifar(xf, torch.Generator().manual_seed(0), scheme=scheme)
    assert outf.dtype == torch.float32 and 0 <= outf.min() and outf.max() <= 1
    assert (_diff(outf, out.permute(0, 2, 3, 1).numpy()) > 1).mean() < 0.01  # same draws, same ops
    with pytest.raises(ValueError):
        A.autoaugment_cifar(x, scheme="pil")


# ------------------------------------------------------------------------------------ Augment, dtypes


def test_augment_order_is_autoaugment_crop_flip_cutout():
    x = _tensor(_images(16, seed=6))
    aug = A.Augment(autoaugment=True, cutout=8)
    out = aug(x, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    manual = A.cutout(A.horizontal_flip(A.random_crop(A.autoaugment_cifar(x, g), 4, g), g), 8, g)
    assert torch.equal(out, manual)


def test_presets():
    P = A.PRESETS
    assert P["none"] == A.Augment(crop=False, flip=False)
    assert P["standard"].crop and P["standard"].flip and not P["standard"].cutout
    assert P["digits"].crop and not P["digits"].flip
    assert P["cifar_aa"].autoaugment and P["cifar_aa"].cutout == 16 and P["cifar_aa"].flip
    assert P["cutout"].cutout == 16 and not P["cutout"].autoaugment
    x = X.clone()
    assert P["none"](x, torch.Generator()) is x
    with pytest.raises(dataclasses.FrozenInstanceError):
        P["standard"].flip = False
    for bad in ({"padding": -1}, {"cutout": 2.5}, {"flip": "no"}, {"aa_scheme": "x"}):
        with pytest.raises(ValueError):
            A.Augment(**bad)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [1, 3])
def test_full_pipeline_on_gray_and_color_in_every_dtype(dtype, channels):
    x = _tensor(_images(12, channels=channels, seed=7))
    x = x if dtype == torch.uint8 else x.to(dtype) / 255
    out = A.Augment(autoaugment=True, cutout=8)(x, torch.Generator().manual_seed(0))
    assert out.dtype == dtype and out.shape == x.shape
    if dtype != torch.uint8:
        assert 0 <= out.min() and out.max() <= 1
    for op in (A.equalize, A.auto_contrast, A.invert):
        assert op(x).dtype == dtype


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError):
        A.random_crop(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError):
        A.equalize(torch.zeros(1, 3, 8, 8, dtype=torch.int32))
    with pytest.raises(ValueError):
        A.color(torch.zeros(1, 2, 8, 8), 0.5)
    with pytest.raises(ValueError):
        A.posterize(X, 9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_with_a_cpu_generator():
    x = _tensor(_images(32, seed=8))
    aug = A.PRESETS["cifar_aa"]
    cpu = aug(x, torch.Generator().manual_seed(0))
    gpu = aug(x.cuda(), torch.Generator().manual_seed(0))
    assert gpu.device.type == "cuda"
    assert (_diff(gpu.cpu(), cpu.permute(0, 2, 3, 1).numpy()) > 1).mean() < 0.001


# ------------------------------------------------------------------------------------ channel statistics


def test_channel_stats_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10, 3, 5, 7), dtype=np.uint8)
    mean, std = A.channel_stats(torch.from_numpy(x), batch_size=3)
    ref = x.astype(np.float64) / 255
    assert mean.dtype == torch.float64 and mean.shape == (3,)
    np.testing.assert_allclose(mean.numpy(), ref.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std.numpy(), ref.std(axis=(0, 2, 3)), rtol=1e-12)
    mean_f, std_f = A.channel_stats(torch.from_numpy(ref).float())
    np.testing.assert_allclose(mean_f.numpy(), ref.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(std_f.numpy(), ref.std(axis=(0, 2, 3)), rtol=1e-6)
    gray_mean, _ = A.channel_stats(torch.from_numpy(x[:, :1]))
    assert gray_mean.shape == (1,)
