"""Batched image augmentation on tensors: random crop, horizontal flip, Cutout and CIFAR-10 AutoAugment.

The augmentations of the AMP paper's Sec. 5.1-5.2 and Table 2 (vanilla = crop + flip, Cutout, AutoAugment),
written on whole batches so they run where the batch lives (CPU or CUDA) with no per-image Python loop.

Conventions:

- Images are ``(N, C, H, W)``: uint8 in 0..255, or floating point in [0, 1]. Every function returns the dtype
  it was given; uint8 results are rounded to the nearest level (Pillow truncates, hence the ±1 in the tests).
  AutoAugment's ops work on levels 0..255 internally (float32, float64 for float64 input).
- Randomness comes only from the caller's ``torch.Generator`` (the global RNG when None). Draws are made on
  the generator's own device and moved to the batch's, and only per-image scalars are drawn, so a CPU
  generator drives a CUDA batch and one seed gives the same augmentation on every device.
- Geometric AutoAugment ops reproduce Pillow's ``Image.transform(size, Image.AFFINE, data, resample,
  fillcolor)``: output pixel (i, j) reads the input at ``(a·(j+½) + b·(i+½) + c, d·(j+½) + e·(i+½) + f)``,
  points outside the image take ``fill``. The sampling is Pillow's (NEAREST = floor of that point; BILINEAR
  and BICUBIC (a = -1 kernel) on the point minus ½ with edge-clamped taps), done with index arithmetic and
  ``gather`` rather than ``F.grid_sample``, whose nearest rounding and bicubic kernel (a = -0.75) differ.

Policy and magnitudes: ``CIFAR10_POLICY`` is the 25 sub-policies of the AutoAugment paper's appendix table
"policy found on reduced CIFAR-10" (Cubuk et al., CVPR 2019), as the AMP authors' code has it
(hiyouga/AMP-Regularizer ``data_utils.py``) and torchvision's ``AutoAugmentPolicy.CIFAR10``; sub-policy 16 is
(Equalize, 0.2, 8), (Equalize, 0.6, 4) there, DeepVoltaire/AutoAugment prints 0.8. Two magnitude mappings (``scheme``):

- ``"amp"`` (default): the AMP authors' code (DeepVoltaire's PIL port), which produced AMP Table 2. Level l
  in 0..9 maps linearly: shear ±0.3·l/9; translate ±(150/331)·l/9 of the image side (±14.5 px at 32);
  rotate ±30·l/9 degrees; solarize threshold 256 - 256·l/9; posterize round(8 - 4·l/9) bits (8..4);
  Color/Contrast/Brightness/Sharpness factor 1 ± 0.9·l/9 (0.1..1.9). Shears use BICUBIC, translate and
  rotate NEAREST, fill 128 (gray). One deviation: the sign of Rotate is random here, as in the official code
  and torchvision; the AMP/DeepVoltaire code always rotates counter-clockwise.
- ``"tf"``: the official ``augmentation_transforms.py`` (tensorflow/models research/autoaugment), level/10
  scaling with truncation: shear ±0.3·l/10; translate ±l px; rotate ±int(3·l) degrees; solarize threshold
  256 - int(25.6·l); posterize 4 - int(0.4·l) bits (4..1); enhance factor 0.1 + 0.18·l (no sign). All
  geometric ops NEAREST. The official code fills with the dataset mean (0 after normalization); pass
  ``fill=(125/255, 123/255, 114/255)`` for that, the default fill is 128/255.

Signs are drawn at random (probability ½) per image for the signed magnitudes above.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CIFAR10_POLICY",
    "FILL",
    "OPS",
    "PRESETS",
    "SCHEMES",
    "Augment",
    "auto_contrast",
    "autoaugment",
    "autoaugment_cifar",
    "brightness",
    "channel_stats",
    "color",
    "contrast",
    "cutout",
    "equalize",
    "horizontal_flip",
    "invert",
    "op_argument",
    "posterize",
    "random_crop",
    "rotate",
    "sharpness",
    "shear_x",
    "shear_y",
    "solarize",
    "translate_x",
    "translate_y",
]

FILL = 128 / 255  # the reference's fillcolor (128, 128, 128) for pixels a geometric op brings in
SCHEMES = ("amp", "tf")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")

# (op, probability, level 0..9) pairs; the paper prints a level for the magnitude-free ops too
CIFAR10_POLICY: tuple[tuple[tuple[str, float, int], tuple[str, float, int]], ...] = (
    (("Invert", 0.1, 7), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, 8), ("Equalize", 0.9, 2)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, 5), ("Equalize", 0.5, 1)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, 7), ("AutoContrast", 0.4, 8)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, 3)),
    (("Equalize", 0.2, 0), ("AutoContrast", 0.6, 0)),
    (("Equalize", 0.2, 8), ("Equalize", 0.6, 4)),
    (("Color", 0.9, 9), ("Equalize", 0.6, 6)),
    (("AutoContrast", 0.8, 4), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, 3)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, 2), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, 8), ("Invert", 0.1, 3)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, 1)),
)


# ----------------------------------------------------------------------------------------------- helpers


def _check_images(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValueError(
            f"expected a batch of images (N, C, H, W), got {getattr(x, 'shape', type(x))}; "
            "add a batch dimension with x.unsqueeze(0)"
        )
    if x.dtype != torch.uint8 and not x.dtype.is_floating_point:
        raise ValueError(f"images must be uint8 (0..255) or floating point in [0, 1], got {x.dtype}")


def _draw_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator, device=_draw_device(generator)).to(device)


def _randint(high: int, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.randint(high, shape, generator=generator, device=_draw_device(generator)).to(device)


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _to_levels(x: Tensor) -> Tensor:
    """Pixel levels 0..255 as float (uint8 exact, float input scaled by 255)."""
    return x.to(_work_dtype(x)) if x.dtype == torch.uint8 else x.to(_work_dtype(x)) * 255.0


def _from_levels(v: Tensor, like: Tensor) -> Tensor:
    v = v.clamp(0, 255)  # float rounding (e.g. in the autocontrast stretch) must not leave [0, 1]
    return v.round().to(torch.uint8) if like.dtype == torch.uint8 else (v / 255.0).to(like.dtype)


def _quantized(x: Tensor) -> Tensor:
    """Integer levels (int64): uint8 as is, float input rounded to the nearest of the 256 levels."""
    return x.long() if x.dtype == torch.uint8 else (x.double() * 255).round().clamp(0, 255).long()


def _per_image(
    value: float | Sequence[float] | Tensor, n: int, device: torch.device, dtype: torch.dtype, what: str
) -> Tensor:
    t = torch.as_tensor(value, dtype=dtype).to(device)
    if t.ndim == 0:
        return t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"{what} must be a number or one value per image ({n}), got shape {tuple(t.shape)}")
    return t


def _fill_levels(fill: float | Sequence[float], channels: int, like: Tensor) -> Tensor:
    f = torch.as_tensor(fill, dtype=like.dtype).to(like.device).flatten() * 255.0
    if f.numel() not in (1, channels):
        raise ValueError(f"fill needs 1 or {channels} values in [0, 1] (one per channel), got {f.numel()}")
    return f.expand(channels).view(1, channels, 1, 1)


# ------------------------------------------------------------------------------------ crop, flip, cutout


def random_crop(x: Tensor, padding: int = 4, generator: torch.Generator | None = None, *, fill: float = 0.0) -> Tensor:
    """Pad each side by ``padding`` pixels of ``fill`` (in [0, 1]; 0 = zero padding) and crop a random H×W window.

    The window's top-left corner is uniform over the (2·padding+1)² offsets, independently per image.
    """
    _check_images(x)
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an integer >= 0, got {padding!r}; pass e.g. 4")
    n, _, h, w = x.shape
    offsets = _randint(2 * padding + 1, (2, n), generator, x.device)  # (2, N): top, left
    value = round(fill * 255) if x.dtype == torch.uint8 else fill
    padded = F.pad(x, (padding,) * 4, value=value)  # (N, C, H+2p, W+2p)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    windows = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return windows.permute(0, 3, 1, 2).contiguous()


def horizontal_flip(x: Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> Tensor:
    """Mirror each image left-right with probability ``p``, independently (not for digits: the caller decides)."""
    _check_images(x)
    if not 0 <= p <= 1:
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
    flip = _rand((len(x),), generator, x.device) < p  # (N,)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def cutout(x: Tensor, size: int = 16, generator: torch.Generator | None = None) -> Tensor:
    """Zero one ``size``×``size`` square per image (DeVries & Taylor 2017), clipped at the borders.

    The center is uniform over the pixels; the square spans rows ``cy - size//2 .. cy - size//2 + size - 1``
    (the reference's ``cy ± size//2`` for even sizes). 16 for CIFAR-10 and 8 for CIFAR-100 in the paper.
    """
    _check_images(x)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"size must be an integer >= 0 (0 = no cutout), got {size!r}; pass e.g. 16")
    n, _, h, w = x.shape
    top = _randint(h, (n,), generator, x.device) - size // 2  # (N,)
    left = _randint(w, (n,), generator, x.device) - size // 2
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + size)  # (N, H)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + size)  # (N, W)
    return x.masked_fill(in_rows[:, None, :, None] & in_cols[:, None, None, :], 0)


# ------------------------------------------------------------------------------------ geometric ops


def _taps(coord: Tensor, interpolation: str) -> list[tuple[Tensor, Tensor | float]]:
    """Pillow's 1-D sampling taps (index, weight) at continuous ``coord`` (pixel i covers [i, i+1))."""
    if interpolation == "nearest":
        return [(coord.floor(), 1.0)]
    u = coord - 0.5
    base = u.floor()
    d = u - base
    if interpolation == "bilinear":
        return [(base, 1 - d), (base + 1, d)]
    d2, d3 = d * d, d * d * d  # Pillow's affine BICUBIC is the a = -1 cubic convolution
    return [(base - 1, -d + 2 * d2 - d3), (base, 1 - 2 * d2 + d3), (base + 1, d + d2 - d3), (base + 2, d3 - d2)]


def _gather(v: Tensor, iy: Tensor, ix: Tensor) -> Tensor:
    """v[n, :, iy[n, i, j], ix[n, i, j]] for index maps (N, H, W), edge-clamped."""
    n, c, h, w = v.shape
    flat = (iy.clamp(0, h - 1) * w + ix.clamp(0, w - 1)).long().view(n, 1, h * w).expand(n, c, h * w)
    return v.reshape(n, c, h * w).gather(2, flat).view(n, c, h, w)


def _affine(x: Tensor, matrix: Tensor, interpolation: str, fill: float | Sequence[float]) -> Tensor:
    """Pillow's AFFINE transform with per-image data ``matrix`` (N, 6) = (a, b, c, d, e, f), output→input."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    n, ch, h, w = x.shape
    v = _to_levels(x)
    a, b, c, d, e, f = (m.view(n, 1, 1) for m in matrix.to(torch.float64).unbind(1))
    jj = torch.arange(w, dtype=torch.float64, device=x.device).view(1, 1, w) + 0.5
    ii = torch.arange(h, dtype=torch.float64, device=x.device).view(1, h, 1) + 0.5
    sx, sy = a * jj + b * ii + c, d * jj + e * ii + f  # (N, H, W) source points
    out = torch.zeros_like(v)
    for iy, wy in _taps(sy, interpolation):
        for ix, wx in _taps(sx, interpolation):
            weight = wy * wx
            weight = weight.unsqueeze(1).to(v.dtype) if isinstance(weight, Tensor) else weight
            out = out + weight * _gather(v, iy, ix)
    inside = ((sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)).unsqueeze(1)  # (N, 1, H, W)
    out = torch.where(inside, out.clamp(0, 255), _fill_levels(fill, ch, v))
    return _from_levels(out, x)


def _affine_op(
    x: Tensor, value, what: str, build: Callable[[Tensor, int, int], list[Tensor]], interpolation: str, fill
) -> Tensor:
    _check_images(x)
    t = _per_image(value, len(x), x.device, torch.float64, what)  # (N,)
    rows = build(t, x.shape[2], x.shape[3])
    matrix = torch.stack([r if isinstance(r, Tensor) else torch.full_like(t, r) for r in rows], 1)  # (N, 6)
    return _affine(x, matrix, interpolation, fill)


def shear_x(x: Tensor, shear, *, fill=FILL, interpolation: str = "nearest") -> Tensor:
    """Pillow ``transform(AFFINE, (1, shear, 0, 0, 1, 0))``: input x = x + shear·y, about the top-left corner."""
    return _affine_op(x, shear, "shear", lambda s, h, w: [1, s, 0, 0, 1, 0], interpolation, fill)


def shear_y(x: Tensor, shear, *, fill=FILL, interpolation: str = "nearest") -> Tensor:
    """Pillow ``transform(AFFINE, (1, 0, 0, shear, 1, 0))``: input y = y + shear·x."""
    return _affine_op(x, shear, "shear", lambda s, h, w: [1, 0, 0, s, 1, 0], interpolation, fill)


def translate_x(x: Tensor, pixels, *, fill=FILL, interpolation: str = "nearest") -> Tensor:
    """Pillow ``transform(AFFINE, (1, 0, pixels, 0, 1, 0))``: the content moves ``pixels`` to the left."""
    return _affine_op(x, pixels, "pixels", lambda t, h, w: [1, 0, t, 0, 1, 0], interpolation, fill)


def translate_y(x: Tensor, pixels, *, fill=FILL, interpolation: str = "nearest") -> Tensor:
    """Pillow ``transform(AFFINE, (1, 0, 0, 0, 1, pixels))``: the content moves ``pixels`` up."""
    return _affine_op(x, pixels, "pixels", lambda t, h, w: [1, 0, 0, 0, 1, t], interpolation, fill)


def _rotation(degrees: Tensor, h: int, w: int) -> list[Tensor]:
    angle = -torch.deg2rad(degrees)  # Pillow's Image.rotate matrix, about the center (w/2, h/2)
    cos, sin = torch.round(torch.cos(angle), decimals=15), torch.round(torch.sin(angle), decimals=15)
    cx, cy = w / 2, h / 2
    return [cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy]


def rotate(x: Tensor, degrees, *, fill=FILL, interpolation: str = "nearest") -> Tensor:
    """Pillow ``img.rotate(degrees)``: counter-clockwise about the image center, same size."""
    return _affine_op(x, degrees, "degrees", _rotation, interpolation, fill)


# ------------------------------------------------------------------------------------ photometric ops


def invert(x: Tensor) -> Tensor:
    """``ImageOps.invert``: 255 - v."""
    _check_images(x)
    return _from_levels(255.0 - _to_levels(x), x)


def solarize(x: Tensor, threshold) -> Tensor:
    """``ImageOps.solarize``: levels >= ``threshold`` (0..256, one per image or shared) become 255 - v."""
    _check_images(x)
    v = _to_levels(x)
    t = _per_image(threshold, len(x), x.device, v.dtype, "threshold").view(-1, 1, 1, 1)
    return _from_levels(torch.where(v < t, v, 255.0 - v), x)


def posterize(x: Tensor, bits) -> Tensor:
    """``ImageOps.posterize``: keep the ``bits`` (0..8) high bits of each level; float input is rounded first."""
    _check_images(x)
    b = _per_image(bits, len(x), x.device, torch.float64, "bits")
    if b.numel() and not ((b == b.round()) & (b >= 0) & (b <= 8)).all():
        raise ValueError(f"bits must be integers in 0..8, got {bits!r}")
    shift = (8 - b.long()).view(-1, 1, 1, 1)
    q = (_quantized(x) >> shift) << shift
    return _from_levels(q.to(_work_dtype(x)), x)


def auto_contrast(x: Tensor) -> Tensor:
    """``ImageOps.autocontrast`` (cutoff 0): stretch each channel's [min, max] to [0, 255]; flat channels kept."""
    _check_images(x)
    v = _to_levels(x)
    lo, hi = v.amin((2, 3), keepdim=True), v.amax((2, 3), keepdim=True)  # (N, C, 1, 1)
    stretched = (v - lo) * (255.0 / (hi - lo).clamp_min(1e-12))
    return _from_levels(torch.where(hi > lo, stretched, v), x)


def equalize(x: Tensor) -> Tensor:
    """``ImageOps.equalize``, per channel: Pillow's integer lookup table from the 256-bin histogram."""
    _check_images(x)
    n, c, h, w = x.shape
    q = _quantized(x).view(n * c, h * w)  # (NC, HW) levels
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, q, torch.ones_like(q))
    top = q.amax(1, keepdim=True)  # the highest level present: Pillow's histo[-1]
    step = (h * w - hist.gather(1, top)) // 255  # (NC, 1)
    below = hist.cumsum(1) - hist  # pixels under each level
    lut = ((step // 2 + below) // step.clamp_min(1)).clamp(max=255)  # (NC, 256)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device))  # flat histogram: identity
    return _from_levels(lut.gather(1, q).view(n, c, h, w).to(_work_dtype(x)), x)


def _gray(v: Tensor, pil_rounding: bool) -> Tensor:
    """Luma L = 0.299 R + 0.587 G + 0.114 B, (N, 1, H, W); a 1-channel image is its own luma."""
    if v.shape[1] == 1:
        return v
    if v.shape[1] != 3:
        raise ValueError(f"Color and Contrast need 1 (gray) or 3 (RGB) channels, got {v.shape[1]}")
    r, g, b = v[:, 0:1], v[:, 1:2], v[:, 2:3]
    if pil_rounding:  # Pillow's integer RGB -> L conversion, exact on uint8 levels
        return torch.floor((19595 * r + 38470 * g + 7471 * b + 32768) / 65536)
    return 0.299 * r + 0.587 * g + 0.114 * b


def _blend(degenerate: Tensor, v: Tensor, factor, like: Tensor) -> Tensor:
    """``ImageEnhance``: Image.blend(degenerate, image, factor), clipped to 0..255."""
    f = _per_image(factor, len(v), v.device, v.dtype, "factor").view(-1, 1, 1, 1)
    return _from_levels((degenerate + f * (v - degenerate)).clamp(0, 255), like)


def brightness(x: Tensor, factor) -> Tensor:
    """``ImageEnhance.Brightness``: blend with black (factor·v)."""
    _check_images(x)
    v = _to_levels(x)
    return _blend(torch.zeros_like(v), v, factor, x)


def color(x: Tensor, factor) -> Tensor:
    """``ImageEnhance.Color``: blend with the image's grayscale L (identity on 1-channel images)."""
    _check_images(x)
    v = _to_levels(x)
    return _blend(_gray(v, x.dtype == torch.uint8).expand_as(v), v, factor, x)


def contrast(x: Tensor, factor) -> Tensor:
    """``ImageEnhance.Contrast``: blend with a flat image at the mean of L (rounded to a level for uint8)."""
    _check_images(x)
    v = _to_levels(x)
    mean = _gray(v, x.dtype == torch.uint8).mean((1, 2, 3), keepdim=True)  # (N, 1, 1, 1)
    mean = torch.floor(mean + 0.5) if x.dtype == torch.uint8 else mean
    return _blend(mean.expand_as(v), v, factor, x)


_SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13  # ImageFilter.SMOOTH


def sharpness(x: Tensor, factor) -> Tensor:
    """``ImageEnhance.Sharpness``: blend with the SMOOTH-filtered image, whose border pixels are the image's."""
    _check_images(x)
    v = _to_levels(x)
    c = v.shape[1]
    if min(v.shape[2:]) < 3:
        return _from_levels(v, x)  # no interior: the degenerate image is the image itself
    kernel = _SMOOTH.to(v).view(1, 1, 3, 3).expand(c, 1, 3, 3)
    smooth = F.conv2d(v, kernel, groups=c)  # (N, C, H-2, W-2)
    degenerate = v.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth.round() if x.dtype == torch.uint8 else smooth
    return _blend(degenerate, v, factor, x)


# ------------------------------------------------------------------------------------ AutoAugment

_GEOMETRIC = {
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
    "Rotate": rotate,
}
_WITH_ARG = {
    "Solarize": solarize,
    "Posterize": posterize,
    "Contrast": contrast,
    "Color": color,
    "Brightness": brightness,
    "Sharpness": sharpness,
}
_NO_ARG = {"AutoContrast": auto_contrast, "Invert": invert, "Equalize": equalize}
OPS = (*_GEOMETRIC, *_NO_ARG, *_WITH_ARG)
_ENHANCE = ("Contrast", "Color", "Brightness", "Sharpness")

# level l (float tensor), random sign s (±1), image (h, w) -> the op's argument; see the module docstring
_ARGUMENTS: dict[str, dict[str, Callable[[Tensor, Tensor, int, int], Tensor]]] = {
    "amp": {
        "ShearX": lambda l, s, h, w: s * 0.3 * l / 9,
        "ShearY": lambda l, s, h, w: s * 0.3 * l / 9,
        "TranslateX": lambda l, s, h, w: s * (150 / 331) * l / 9 * w,
        "TranslateY": lambda l, s, h, w: s * (150 / 331) * l / 9 * h,
        "Rotate": lambda l, s, h, w: s * 30 * l / 9,
        "Solarize": lambda l, s, h, w: 256 - 256 * l / 9,
        "Posterize": lambda l, s, h, w: torch.round(8 - 4 * l / 9),
        **{op: (lambda l, s, h, w: 1 + s * 0.9 * l / 9) for op in _ENHANCE},
    },
    "tf": {
        "ShearX": lambda l, s, h, w: s * 0.3 * l / 10,
        "ShearY": lambda l, s, h, w: s * 0.3 * l / 10,
        "TranslateX": lambda l, s, h, w: s * torch.floor(l * 10 / 10),
        "TranslateY": lambda l, s, h, w: s * torch.floor(l * 10 / 10),
        "Rotate": lambda l, s, h, w: s * torch.floor(l * 30 / 10),
        "Solarize": lambda l, s, h, w: 256 - torch.floor(l * 256 / 10),
        "Posterize": lambda l, s, h, w: 4 - torch.floor(l * 4 / 10),
        **{op: (lambda l, s, h, w: l * 1.8 / 10 + 0.1) for op in _ENHANCE},
    },
}
_RESAMPLE = {"amp": {"ShearX": "bicubic", "ShearY": "bicubic"}, "tf": {}}  # others: nearest


def op_argument(op: str, level, sign=1, *, scheme: str = "amp", size: tuple[int, int] = (32, 32)) -> Tensor:
    """The argument ``op`` gets at ``level`` (0..9) under ``scheme``, with ``sign`` (±1) for the signed ones.

    Shear: fraction; Translate: pixels for an image of ``size`` (H, W); Rotate: degrees; Solarize: threshold
    level; Posterize: bits; Contrast/Color/Brightness/Sharpness: enhance factor. None for magnitude-free ops.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if op not in OPS:
        raise ValueError(f"unknown AutoAugment op {op!r}; choose one of {OPS}")
    if op in _NO_ARG:
        return None
    level_t = torch.as_tensor(level, dtype=torch.float64)
    return _ARGUMENTS[scheme][op](level_t, torch.as_tensor(sign, dtype=torch.float64).to(level_t.device), *size)


def _apply_op(op: str, x: Tensor, arg: Tensor | None, scheme: str, fill) -> Tensor:
    if op in _NO_ARG:
        return _NO_ARG[op](x)
    if op in _GEOMETRIC:
        return _GEOMETRIC[op](x, arg, fill=fill, interpolation=_RESAMPLE[scheme].get(op, "nearest"))
    return _WITH_ARG[op](x, arg)


def autoaugment(
    x: Tensor, generator: torch.Generator | None = None, *, policy=CIFAR10_POLICY, scheme: str = "amp", fill=FILL
) -> Tensor:
    """AutoAugment: per image, one sub-policy drawn uniformly; each of its two ops runs with its probability.

    Batched by op: at each of the two stages the images that run an op are processed together, with their
    own magnitudes and random signs. Draws, in this order and whatever the data: the sub-policy (N,), the
    two run tests (2, N) and the two signs (2, N).
    """
    _check_images(x)
    _check_policy(policy)
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    n, dev = len(x), x.device
    chosen = _randint(len(policy), (n,), generator, dev)  # (N,) sub-policy per image
    runs = _rand((2, n), generator, dev)  # op j runs when runs[j] < p_j, as random.random() < p
    signs = (_randint(2, (2, n), generator, dev) * 2 - 1).double()  # (2, N) ±1
    out = x.clone()
    for stage in (0, 1):
        names = [sub[stage][0] for sub in policy]
        prob = torch.tensor([sub[stage][1] for sub in policy], device=dev)[chosen]  # (N,)
        level = torch.tensor([float(sub[stage][2]) for sub in policy], dtype=torch.float64, device=dev)[chosen]
        active = runs[stage] < prob
        for op in dict.fromkeys(names):
            uses = torch.tensor([name == op for name in names], device=dev)[chosen] & active  # (N,)
            idx = uses.nonzero().squeeze(1)
            if idx.numel():
                arg = op_argument(op, level[idx], signs[stage, idx], scheme=scheme, size=tuple(x.shape[2:]))
                out[idx] = _apply_op(op, out[idx], arg, scheme, fill)
    return out


def autoaugment_cifar(x: Tensor, generator: torch.Generator | None = None, *, scheme: str = "amp", fill=FILL) -> Tensor:
    """The CIFAR-10 AutoAugment policy (``CIFAR10_POLICY``) on a batch; see :func:`autoaugment`."""
    return autoaugment(x, generator, policy=CIFAR10_POLICY, scheme=scheme, fill=fill)


def _check_policy(policy) -> None:
    for sub in policy:
        if len(sub) != 2 or any(len(step) != 3 for step in sub):
            raise ValueError(f"each sub-policy must be two (op, probability, level) triples, got {sub!r}")
        for op, p, level in sub:
            if op not in OPS or not 0 <= p <= 1 or level not in range(10):
                raise ValueError(
                    f"bad policy step {(op, p, level)!r}: op in {OPS}, probability in [0, 1], level an integer 0..9"
                )
    if not policy:
        raise ValueError("the policy needs at least one sub-policy")


# ------------------------------------------------------------------------------------ composition


@dataclass(frozen=True)
class Augment:
    """A training augmentation: AutoAugment → random crop → horizontal flip → Cutout, each optional.

    The order is the official AutoAugment code's (``apply_policy``, then ``zero_pad_and_crop``, ``random_flip``,
    ``cutout_numpy``): the policy sees the whole image, Cutout comes last so its square stays black. (The AMP
    authors' code crops and flips before the policy; crop and flip commute with the photometric ops.)
    ``cutout`` is the square's side, 0 = off. Datasets of digits must keep ``flip=False``.
    """

    crop: bool = True
    padding: int = 4
    flip: bool = True
    cutout: int = 0
    autoaugment: bool = False
    aa_scheme: str = "amp"

    def __post_init__(self):
        for name in ("crop", "flip", "autoaugment"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("padding", "cutout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.aa_scheme not in SCHEMES:
            raise ValueError(f"aa_scheme must be one of {SCHEMES}, got {self.aa_scheme!r}")

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The augmented batch, same shape and dtype (``x`` itself when every step is off)."""
        _check_images(x)
        if self.autoaugment:
            x = autoaugment_cifar(x, generator, scheme=self.aa_scheme)
        if self.crop:
            x = random_crop(x, self.padding, generator)
        if self.flip:
            x = horizontal_flip(x, generator)
        if self.cutout:
            x = cutout(x, self.cutout, generator)
        return x


PRESETS: dict[str, Augment] = {
    "none": Augment(crop=False, flip=False),
    "standard": Augment(),  # AMP Table 1 / Table 2 "Vanilla": random crop (pad 4) + flip
    "digits": Augment(padding=2, flip=False),  # SVHN in the AMP code: crop with padding 2, never flipped
    "cutout": Augment(cutout=16),  # Table 2 "Cutout" on CIFAR-10 (8 for CIFAR-100)
    "cifar_aa": Augment(autoaugment=True, cutout=16),  # Table 2 "AutoAug": the AMP code adds Cutout to it
}


# ------------------------------------------------------------------------------------ statistics


def channel_stats(x: Tensor, batch_size: int = 4096) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (population) std over a training set in [0, 1], float64 ``(C,)`` on the CPU.

    ``x`` is (N, C, H, W), uint8 (divided by 255) or float in [0, 1]; two passes in float64 over chunks of
    ``batch_size`` images, so 50000×3×32×32 never needs more than one chunk converted at a time.
    """
    _check_images(x)
    if len(x) == 0:
        raise ValueError("channel_stats needs at least one image")
    scale = 255.0 if x.dtype == torch.uint8 else 1.0
    count = x.shape[0] * x.shape[2] * x.shape[3]
    total = sum(chunk.double().sum((0, 2, 3)) for chunk in x.split(batch_size))
    mean = total / (count * scale)  # (C,)
    squares = sum(
        ((chunk.double() / scale - mean.view(1, -1, 1, 1)) ** 2).sum((0, 2, 3)) for chunk in x.split(batch_size)
    )
    return mean.cpu(), (squares / count).sqrt().cpu()
