"""The papers' image networks, CIFAR versions: PreActResNet18, VGG16-BN, Wide ResNets, PyramidNets, LeNet.

AMP paper Sec. 5.1-5.2 (PreActResNet18, VGG16, WRN-28-10, PyramidNet-164 alpha 270), AWP paper Sec. 5
(PreActResNet18, WRN-34-10, WRN-28-10), AMM paper Sec. 4.4 (LeNet; GroupNorm in place of BatchNorm).
Every network global-average-pools before its linear classifier, so inputs other than 32x32 work too;
at 32x32 that pooling is exactly the fixed AvgPool of the reference code.

Choices, where the sources differ:
- Convolutions feeding a norm layer have no bias (He et al., Zagoruyko & Komodakis, kuangliu); VGG keeps
  its conv biases as in the common CIFAR code. The AMP authors' preresnet.py adds conv biases (+4,736).
- PreActResNet18 ends with BN-ReLU before pooling (He et al. 2016; the AWP/Rice et al. and AMP code):
  11,172,170 parameters for 10 classes; kuangliu's version, without that BN, has 11,171,146.
- VGG16's head is a single Linear(512, K) (kuangliu's CIFAR VGG, 14.73M parameters); the AMP authors'
  vgg.py uses 512-4096-4096-K instead (33.65M).
- ``dropout`` sits between the two 3x3 convs of a residual block (WRN's place; also the AMP code's), after
  every ReLU in VGG, before the last conv of a PyramidNet block, and after LeNet's hidden ReLU.
- ``norm="group"``: "group normalization with group size 32" (AMM Sec. 4.4) read as 32 channels per group:
  C // 32 groups, lowered to a divisor of C (PyramidNet widths are not multiples of 32), and 1 group below
  64 channels. GroupNorm has the same affine parameters as BatchNorm, so parameter counts do not change.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GROUP_SIZE = 32  # channels per GroupNorm group (AMM Sec. 4.4)


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    groups = max(1, channels // GROUP_SIZE)
    while channels % groups:  # the largest divisor of C not above C // 32
        groups -= 1
    return nn.GroupNorm(groups, channels)


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _init(model: nn.Module) -> None:
    for m in model.modules():  # He init for ReLU nets, as the reference CIFAR code does
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def _head(norm: str, channels: int, num_classes: int) -> nn.Sequential:
    """Final norm-ReLU of the pre-activation nets, global average pool, linear: (B, C, h, w) -> (B, K)."""
    return nn.Sequential(
        make_norm(norm, channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)
    )


class Normalize(nn.Module):
    """Fixed per-channel ``(x - mean) / std`` as the network's first layer, so inputs stay in pixel space."""

    def __init__(self, mean: Sequence[float] | float, std: Sequence[float] | float, input_shape: tuple[int, ...]):
        super().__init__()
        channels, view = input_shape[0], (-1,) + (1,) * (len(input_shape) - 1)  # (C, 1, 1) for images
        m = torch.as_tensor(mean, dtype=torch.float32).flatten()
        s = torch.as_tensor(std, dtype=torch.float32).flatten()
        if m.numel() not in (1, channels) or s.numel() not in (1, channels):
            raise ValueError(
                f"mean and std need 1 or {channels} values (one per channel of input_shape "
                f"{input_shape}), got {m.numel()} and {s.numel()}"
            )
        if not (torch.isfinite(m).all() and torch.isfinite(s).all() and (s > 0).all()):
            raise ValueError(f"mean must be finite and std finite and > 0, got mean={mean!r}, std={std!r}")
        self.register_buffer("mean", m.expand(channels).reshape(view).clone())
        self.register_buffer("std", s.expand(channels).reshape(view).clone())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std  # (B, *input_shape)


def normalized(model: nn.Module, mean, std, input_shape: tuple[int, ...]) -> nn.Module:
    """``model`` itself when mean and std are None, else Sequential(normalize, net=model)."""
    if mean is None and std is None:
        return model
    layer = Normalize(0.0 if mean is None else mean, 1.0 if std is None else std, input_shape)
    return nn.Sequential(OrderedDict(normalize=layer, net=model))


# --- pre-activation ResNets: PreActResNet18 and the Wide ResNets -------------------------------------------


class PreActBlock(nn.Module):
    """norm-ReLU-conv3x3(stride)-norm-ReLU-dropout-conv3x3, plus x or a 1x1 conv of the activated x."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = make_norm(norm, cin), _conv3x3(cin, cout, stride)
        self.norm2, self.drop, self.conv2 = make_norm(norm, cout), _dropout(dropout), _conv3x3(cout, cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(x))
        skip = x if self.shortcut is None else self.shortcut(out)  # (B, cout, H/s, W/s)
        out = self.conv1(out)
        return self.conv2(self.drop(F.relu(self.norm2(out)))) + skip


class PreActResNet(nn.Module):
    """3x3 stem, stages of PreActBlocks (the first of each strided), norm-ReLU, pool, linear."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        stem: int,
        widths: Sequence[int],
        strides: Sequence[int],
        blocks: int,
        norm: str = "batch",
        dropout: float = 0.0,
    ):
        super().__init__()
        self.stem = _conv3x3(in_channels, stem)
        layers, cin = [], stem
        for width, stride in zip(widths, strides):
            for i in range(blocks):
                layers.append(PreActBlock(cin, width, stride if i == 0 else 1, norm, dropout))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.head = _head(norm, cin, num_classes)
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layers(self.stem(x)))  # (B, K)


def preact_resnet18(in_channels: int, num_classes: int, **kw) -> PreActResNet:
    return PreActResNet(in_channels, num_classes, 64, (64, 128, 256, 512), (1, 2, 2, 2), 2, **kw)


def wide_resnet(depth: int, widen: int, in_channels: int, num_classes: int, **kw) -> PreActResNet:
    """WRN-depth-widen (Zagoruyko & Komodakis 2016): (depth - 4) / 6 blocks at widths 16k, 32k, 64k."""
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"a Wide ResNet's depth must be 6n + 4 with n >= 1 (e.g. 28, 34), got {depth}")
    return PreActResNet(
        in_channels, num_classes, 16, (16 * widen, 32 * widen, 64 * widen), (1, 2, 2), (depth - 4) // 6, **kw
    )


# --- VGG16 with BatchNorm, CIFAR version ---------------------------------------------------------------------

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """conv3x3(bias)-norm-ReLU(-dropout) blocks with max-pools, global pool, a single Linear(512, K)."""

    def __init__(
        self, in_channels: int, num_classes: int, cfg: Sequence = VGG16, norm: str = "batch", dropout: float = 0.0
    ):
        super().__init__()
        layers: list[nn.Module] = []
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers += [nn.Conv2d(in_channels, v, 3, padding=1), make_norm(norm, v), nn.ReLU(), _dropout(dropout)]
            in_channels = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes))
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))  # (B, 512, H/32, W/32) -> (B, K)


# --- PyramidNet (Han, Kim & Kim 2017) ---------------------------------------------------------------------------


class PyramidBlock(nn.Module):
    """Basic: norm-conv3-norm-ReLU-conv3-norm; bottleneck: norm-conv1-norm-ReLU-conv3-norm-ReLU-conv1(4x)-norm.

    The shortcut is x, average-pooled when strided, and zero-padded to the block's wider output channels."""

    def __init__(self, cin: int, width: int, stride: int, bottleneck: bool, norm: str, dropout: float):
        super().__init__()
        if bottleneck:
            convs = [
                nn.Conv2d(cin, width, 1, bias=False),
                _conv3x3(width, width, stride),
                nn.Conv2d(width, 4 * width, 1, bias=False),
            ]
        else:
            convs = [_conv3x3(cin, width, stride), _conv3x3(width, width)]
        layers: list[nn.Module] = [make_norm(norm, cin)]
        for i, conv in enumerate(convs):
            if i == len(convs) - 1:
                layers.append(_dropout(dropout))
            layers += [conv, make_norm(norm, conv.out_channels)] + ([nn.ReLU()] if i < len(convs) - 1 else [])
        self.residual = nn.Sequential(*layers)
        self.pool = nn.AvgPool2d(2, ceil_mode=True) if stride != 1 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.residual(x)  # (B, width or 4 width, H/s, W/s)
        skip = self.pool(x)
        return out + F.pad(skip, (0, 0, 0, 0, 0, out.shape[1] - skip.shape[1]))  # zero channels appended


class PyramidNet(nn.Module):
    """Widths grow by alpha / (3 n) per block from 16 (additive pyramid), n blocks in each of 3 stages."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        depth: int,
        alpha: float,
        bottleneck: bool,
        norm: str = "batch",
        dropout: float = 0.0,
    ):
        super().__init__()
        per_block = 9 if bottleneck else 6
        if depth < 2 + per_block or (depth - 2) % per_block:
            raise ValueError(
                f"a {'bottleneck' if bottleneck else 'basic'} PyramidNet's depth must be "
                f"{per_block}n + 2 with n >= 1 (e.g. {164 if bottleneck else 110}), got {depth}"
            )
        n = (depth - 2) // per_block
        self.stem = nn.Sequential(_conv3x3(in_channels, 16), make_norm(norm, 16))
        layers, cin, width = [], 16, 16.0
        for i in range(3 * n):
            width += alpha / (3 * n)  # accumulated as in the authors' code, then rounded
            stride = 2 if i in (n, 2 * n) else 1
            layers.append(PyramidBlock(cin, round(width), stride, bottleneck, norm, dropout))
            cin = round(width) * (4 if bottleneck else 1)
        self.layers = nn.Sequential(*layers)
        self.head = _head(norm, cin, num_classes)
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layers(self.stem(x)))  # (B, K)


# --- LeNet (Caffe's; AMM paper Sec. 4.4) ---------------------------------------------------------------------------


class LeNet(nn.Module):
    """conv5x5 20 - maxpool - conv5x5 50 - maxpool - fc 500 - ReLU - fc K (Caffe's MNIST LeNet)."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, dropout: float = 0.0):
        super().__init__()
        c, h, w = input_shape
        side = lambda n: ((n - 4) // 2 - 4) // 2  # two (conv5x5, maxpool2) stages
        self.features = nn.Sequential(nn.Conv2d(c, 20, 5), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(50 * side(h) * side(w), 500),
            nn.ReLU(),
            _dropout(dropout),
            nn.Linear(500, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))  # (B, 50, 4, 4) at 28x28, (B, 50, 5, 5) at 32x32 -> (B, K)


# --- the registry: name -> (builder(input_shape, K, norm, dropout), smallest image side) ---------------------------

Builder = Callable[[tuple[int, int, int], int, str, float], nn.Module]
_ARCHS: dict[str, tuple[Builder, int]] = {
    "preact_resnet18": (lambda s, k, n, p: preact_resnet18(s[0], k, norm=n, dropout=p), 8),
    "vgg16": (lambda s, k, n, p: VGG(s[0], k, VGG16, norm=n, dropout=p), 32),
    "wrn28_10": (lambda s, k, n, p: wide_resnet(28, 10, s[0], k, norm=n, dropout=p), 4),
    "wrn28_2": (lambda s, k, n, p: wide_resnet(28, 2, s[0], k, norm=n, dropout=p), 4),
    "wrn34_10": (lambda s, k, n, p: wide_resnet(34, 10, s[0], k, norm=n, dropout=p), 4),
    "pyramidnet164_270": (lambda s, k, n, p: PyramidNet(s[0], k, 164, 270, True, norm=n, dropout=p), 4),
    "pyramidnet110_48": (lambda s, k, n, p: PyramidNet(s[0], k, 110, 48, False, norm=n, dropout=p), 4),
    "lenet": (lambda s, k, n, p: LeNet(s, k, dropout=p), 16),  # no norm layers: ignores norm
}
VISION_MODELS = tuple(_ARCHS)


def image_shape(name: str, input_shape: tuple[int, ...], min_side: int) -> tuple[int, int, int]:
    if len(input_shape) != 3 or any(not isinstance(s, int) or s < 1 for s in input_shape):
        raise ValueError(
            f"model {name!r} takes images: input_shape must be (C, H, W), e.g. (3, 32, 32), "
            f"got {tuple(input_shape)}; use 'mlp' for flat feature vectors"
        )
    if min(input_shape[1:]) < min_side:
        raise ValueError(
            f"model {name!r} needs images of at least {min_side}x{min_side} pixels, "
            f"got input_shape {tuple(input_shape)}"
        )
    return input_shape  # type: ignore[return-value]


def build_vision(
    name: str, num_classes: int, input_shape: tuple[int, ...], *, dropout: float = 0.0, norm: str = "batch"
) -> nn.Module:
    """Network ``name`` of ``VISION_MODELS`` for (C, H, W) images."""
    builder, min_side = _ARCHS[name]
    return builder(image_shape(name, input_shape, min_side), num_classes, norm, dropout)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "VGG",
    "VISION_MODELS",
    "LeNet",
    "Normalize",
    "PreActResNet",
    "PyramidNet",
    "build_vision",
    "count_parameters",
    "make_norm",
    "normalized",
    "preact_resnet18",
    "wide_resnet",
]
