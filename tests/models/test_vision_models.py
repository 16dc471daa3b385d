"""The papers' image networks: parameter counts against the published ones, shapes, GroupNorm, input normalization.

Exact counts are those of the reference CIFAR code (kuangliu VGG, xternalz/Zagoruyko WRN, Rice et al.
PreActResNet, dyhan PyramidNet); each is also checked against the number the papers quote.
"""

import pytest
import torch
from torch import nn

from advreg import models
from advreg.models.vision import GROUP_SIZE, VISION_MODELS, count_parameters, make_norm

torch.set_num_threads(1)

CIFAR = (3, 32, 32)
# name: (exact count for 10 classes, published count, relative tolerance to the published count)
COUNTS = {
    "preact_resnet18": (11_172_170, 11_171_146, 0.01),  # +1,024: the final BN of He et al. (kuangliu has none)
    "vgg16": (14_728_266, 14_728_266, 0.0),  # single Linear(512, K) head
    "wrn28_10": (36_479_194, 36_479_194, 0.0),
    "wrn28_2": (1_467_610, 1_467_610, 0.0),
    "wrn34_10": (46_160_474, 46_160_474, 0.0),
    "pyramidnet164_270": (27_216_021, 27.0e6, 0.01),  # Han et al. Table 4: 27.0M
    "pyramidnet110_48": (1_772_706, 1.7e6, 0.05),  # Han et al.: "1.7M", one decimal, truncated
    "lenet": (431_080, 431_080, 0.0),  # Caffe's MNIST LeNet on 28x28
}
_cache: dict[tuple, nn.Module] = {}


def built(name: str, shape=CIFAR, **kw) -> nn.Module:
    key = (name, shape, tuple(sorted(kw.items())))
    if key not in _cache:
        torch.manual_seed(0)
        _cache[key] = models.build(name, 10, input_shape=shape, **kw)
    return _cache[key]


def shape_of(name: str) -> tuple[int, int, int]:
    return (1, 28, 28) if name == "lenet" else CIFAR


def test_every_vision_model_is_registered():
    assert set(VISION_MODELS) == set(COUNTS)
    assert set(models.MODELS) == {"mlp", *COUNTS}


@pytest.mark.parametrize("name", list(COUNTS))
def test_parameter_count_matches_the_papers(name):
    exact, published, tol = COUNTS[name]
    n = count_parameters(built(name, shape_of(name)))
    assert n == exact
    assert abs(n - published) <= tol * published


@pytest.mark.parametrize("name", list(COUNTS))
def test_forward_gives_logits(name):
    model = built(name, shape_of(name)).eval()
    with torch.no_grad():
        out = model(torch.rand(2, *shape_of(name)))  # (B, K)
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", [n for n in models.MODELS if n in VISION_MODELS])
def test_image_networks_default_to_32x32_rgb(name):
    torch.manual_seed(0)
    model = models.build(name, 10).eval()  # no input_shape
    explicit = built(name, CIFAR)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in explicit.state_dict().items()}
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_the_mlp_still_needs_its_input_shape():
    with pytest.raises(ValueError, match="model 'mlp' takes flat feature vectors.*pass input_shape"):
        models.build("mlp", 10)


def test_classes_change_only_the_classifier():
    a = count_parameters(models.build("wrn28_2", 10, input_shape=CIFAR))
    b = count_parameters(models.build("wrn28_2", 100, input_shape=CIFAR))
    assert b - a == 90 * (128 + 1)  # Linear(64k, K) with k = 2


@pytest.mark.parametrize("name", ["preact_resnet18", "vgg16", "wrn28_2", "pyramidnet110_48", "pyramidnet164_270"])
def test_group_norm_replaces_every_batch_norm(name):
    model = built(name, norm="group")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_channels % m.num_groups == 0 for m in norms)
    assert count_parameters(model) == COUNTS[name][0]  # same affine parameters as BatchNorm
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(2, *CIFAR)).shape == (2, 10)


def test_group_size_is_32_channels():
    assert make_norm("group", 512).num_groups == 512 // GROUP_SIZE == 16
    assert make_norm("group", 64).num_groups == 2
    assert make_norm("group", 16).num_groups == 1  # fewer than 64 channels: one group
    assert make_norm("group", 84).num_groups == 2  # 84 // 32 = 2 divides 84
    assert make_norm("group", 21).num_groups == 1
    assert make_norm("group", 100).num_groups == 2  # 100 // 32 = 3 does not divide 100


def test_group_norm_output_does_not_depend_on_the_batch():
    model = models.build("wrn28_2", 10, input_shape=(3, 16, 16), norm="group").train()
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x)[:1], model(x[:1]), atol=1e-5)


def test_normalize_is_a_fixed_first_layer():
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    torch.manual_seed(0)
    model = models.build("wrn28_2", 10, input_shape=(3, 16, 16), mean=mean, std=std).eval()
    names = {n for n, _ in model.named_buffers()}
    assert {"normalize.mean", "normalize.std"} <= names
    assert not any(n.startswith("normalize.") for n, _ in model.named_parameters())
    assert count_parameters(model) == count_parameters(model.net)
    x = torch.rand(2, 3, 16, 16)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net((x - m) / s))
    assert "normalize.mean" in model.state_dict()


def test_normalize_accepts_one_value_and_works_for_the_mlp():
    model = models.build("mlp", 10, input_shape=(1, 28, 28), hidden=(32, 32), mean=0.1307, std=0.3081)
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(model(x), model.net((x - 0.1307) / 0.3081))
    assert models.build("lenet", 10, input_shape=(1, 28, 28), mean=0.5).normalize.std.flatten().tolist() == [1.0]


def test_without_mean_and_std_the_mlp_is_unchanged():
    torch.manual_seed(0)
    a = models.build("mlp", 10, input_shape=(8,), hidden=(16, 16), dropout=0.5, norm="group")
    assert isinstance(a, models.MLP)
    torch.manual_seed(0)
    b = models.MLP(8, 10, (16, 16), 0.5, "all")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_mlp_n_flattens_images():
    model = models.build("mlp", 10, input_shape=(1, 28, 28), hidden=(800, 800))  # AMM's MLP(800)
    assert count_parameters(model) == 784 * 800 + 800 + 800 * 800 + 800 + 800 * 10 + 10
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("shape, flat", [((1, 28, 28), 800), ((3, 32, 32), 1250)])
def test_lenet_infers_its_flatten_size(shape, flat):
    model = models.build("lenet", 10, input_shape=shape)
    assert model.classifier[1].in_features == flat
    assert model(torch.rand(2, *shape)).shape == (2, 10)


def test_other_image_sizes_pool_adaptively():
    model = built("preact_resnet18", (1, 28, 28)).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert count_parameters(model) == COUNTS["preact_resnet18"][0] - 2 * 64 * 9  # 1 input channel, not 3


def test_dropout_is_used_by_the_cnns():
    model = models.build("wrn28_2", 10, input_shape=CIFAR, dropout=0.3)
    assert sum(isinstance(m, nn.Dropout) and m.p == 0.3 for m in model.modules()) == 12  # one per block
    assert not any(isinstance(m, nn.Dropout) for m in built("wrn28_2").modules())


@pytest.mark.parametrize(
    "name, kwargs, words",
    [
        ("resnet50", {}, "choose one of"),
        ("vgg16", {"input_shape": (3072,)}, "(C, H, W)"),
        ("wrn28_2", {"input_shape": (32, 32)}, "(C, H, W)"),
        ("vgg16", {"input_shape": (3, 16, 16)}, "at least 32x32"),
        ("lenet", {"input_shape": (1, 8, 8)}, "at least 16x16"),
        ("wrn28_2", {"norm": "layer"}, "'batch'"),
        ("wrn28_2", {"mean": (0.5, 0.5)}, "1 or 3 values"),
        ("wrn28_2", {"std": 0.0}, "std finite and > 0"),
    ],
)
def test_bad_names_and_shapes_raise_helpful_errors(name, kwargs, words):
    kwargs = {"input_shape": CIFAR, **kwargs}
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        models.build(name, 10, **kwargs)
