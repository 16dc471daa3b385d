"""The fast path: GradScaler inside the perturbation engine (unscale each pass, skip on overflow), BatchNorm
bookkeeping given the model (torch.compile), and the trainer's speed.* options."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advreg
from advreg import cli
from advreg.config import SpeedConfig, TrainConfig
from advreg.io import load_checkpoint
from advreg.perturb import NonFiniteLossError
from advreg.train import validate

SGD = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
OPTIMIZERS = {
    "amp1": lambda p, **kw: advreg.AMP(p, torch.optim.SGD, epsilon=0.5, inner_lr=1.0, **SGD, **kw),
    "amp2": lambda p, **kw: advreg.AMP(p, torch.optim.SGD, epsilon=0.05, inner_lr=0.1, inner_steps=2, **SGD, **kw),
    "amp_tensor": lambda p, **kw: advreg.AMP(
        p, torch.optim.SGD, epsilon=0.5, inner_lr=1.0, norm="per_tensor", **SGD, **kw
    ),
    "sam": lambda p, **kw: advreg.SAM(p, torch.optim.SGD, rho=0.05, **SGD, **kw),
    "awp": lambda p, **kw: advreg.AWP(p, torch.optim.SGD, gamma=0.01, steps=2, **SGD, **kw),
}


def problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    return model, x, y


def make_closure(opt, model, x, y, scaler=None, inject_at=None, where="weight"):
    """A closure that counts its calls; at call number ``inject_at`` (0 = the clean pass) one gradient entry of the
    first layer's ``where`` is inf."""
    calls = []

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        (loss if scaler is None else scaler.scale(loss)).backward()
        if len(calls) == inject_at:
            getattr(model[0], where).grad.view(-1)[0] = float("inf")
        calls.append(1)
        return loss

    return closure, calls


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_power_of_two_loss_scale_changes_nothing(name):
    """Scaled by 2^10 and unscaled in every pass, the steps are the unscaled optimizer's, bit for bit."""
    plain_model, x, y = problem()
    scaled_model = copy.deepcopy(plain_model)
    plain = OPTIMIZERS[name](plain_model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaled = OPTIMIZERS[name](scaled_model.parameters(), grad_scaler=scaler)
    for _ in range(3):
        plain.step(make_closure(plain, plain_model, x, y)[0])
        scaled.step(make_closure(scaled, scaled_model, x, y, scaler)[0])
        scaler.update()
    for a, b in zip(plain_model.parameters(), scaled_model.parameters()):
        assert torch.equal(a, b)
    assert scaler.get_scale() == 2.0**10


@pytest.mark.parametrize("where", ["weight", "bias"])  # AWP leaves biases unperturbed: their overflow stays local
@pytest.mark.parametrize("name, passes", [("amp1", 2), ("amp2", 3), ("sam", 2), ("awp", 3)])
def test_an_overflow_in_any_pass_restores_theta_and_skips_the_step(name, passes, where):
    for inject_at in range(passes):
        model, x, y = problem()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        opt = OPTIMIZERS[name](model.parameters(), grad_scaler=scaler)
        closure, _ = make_closure(opt, model, x, y, scaler)
        opt.step(closure)  # one good step: momentum exists
        scaler.update()
        theta = [p.detach().clone() for p in model.parameters()]
        momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
        closure, calls = make_closure(opt, model, x, y, scaler, inject_at=inject_at, where=where)
        loss = opt.step(closure)
        scaler.update()
        assert len(calls) == passes and torch.isfinite(loss)
        assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta)), f"pass {inject_at}"
        assert all(torch.equal(opt.state[p]["momentum_buffer"], m) for p, m in zip(model.parameters(), momentum))
        assert scaler.get_scale() == 2.0**7  # the scaler saw the overflow and halved its scale
        opt.step(make_closure(opt, model, x, y, scaler)[0])  # and the next step goes on
        assert not all(torch.equal(p, t) for p, t in zip(model.parameters(), theta))


def test_an_inactive_perturbation_still_goes_through_the_scaler():
    model, x, y = problem()
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    opt = advreg.AMP(model.parameters(), torch.optim.SGD, epsilon=0.0, inner_lr=1.0, grad_scaler=scaler, **SGD)
    theta = [p.detach().clone() for p in model.parameters()]
    opt.step(make_closure(opt, model, x, y, scaler, inject_at=0)[0])
    scaler.update()
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta)) and scaler.get_scale() == 2.0


def test_a_non_finite_loss_at_theta_is_still_an_error_under_a_scaler():
    model, x, y = problem()
    scaler = torch.amp.GradScaler("cpu")
    opt = OPTIMIZERS["amp1"](model.parameters(), grad_scaler=scaler)
    x[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="at the weights θ"):
        opt.step(make_closure(opt, model, x, y, scaler)[0])


def test_engine_options_are_checked():
    model, _, _ = problem()
    with pytest.raises(ValueError, match="GradScaler"):
        OPTIMIZERS["amp1"](model.parameters(), grad_scaler=object())
    with pytest.raises(ValueError, match="perturb_on"):
        OPTIMIZERS["amp1"](model.parameters(), perturb_on="everywhere")
    with pytest.raises(ValueError, match="no_sync"):
        OPTIMIZERS["amp1"](model.parameters(), no_sync=1)
    with pytest.raises(ValueError, match="nn.Module"):
        OPTIMIZERS["amp1"](model.parameters(), model=[1])


def bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


@pytest.mark.parametrize("given", [False, True])
def test_only_the_clean_pass_moves_running_statistics(given):
    """Found by hooks while the passes run, or copied from the model's norm layers when it is given."""
    model = bn_net()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))
    reference = copy.deepcopy(model)
    reference(x)  # one training-mode forward: what the clean pass does to the statistics
    opt = advreg.AMP(model.parameters(), torch.optim.SGD, epsilon=0.5, inner_lr=1.0, model=model if given else None)
    opt.step(make_closure(opt, model, x, y)[0])
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model[1], name), getattr(reference[1], name))


def test_under_torch_compile_the_model_keeps_running_statistics_right():
    model = bn_net()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))
    reference = copy.deepcopy(model)
    reference(x)
    compiled = torch.compile(model, backend="eager")  # dynamo traces; the norm layers' hooks never run
    opt = advreg.AMP(model.parameters(), torch.optim.SGD, epsilon=0.5, inner_lr=1.0, model=model)
    opt.step(make_closure(opt, compiled, x, y)[0])
    assert torch.equal(model[1].running_mean, reference[1].running_mean)
    assert int(model[1].num_batches_tracked) == 1


# -- the trainer ------------------------------------------------------------------------------------------
def train_cli(tmp_path, name, *settings, method="amp", image=False):
    """``advreg train`` on digits (an MLP), or with ``image`` on small CIFAR-10 files written here (LeNet: 4-d
    weights and batches for channels_last)."""
    out = tmp_path / name
    data = (
        ["--dataset", "cifar10", "--data-dir", str(write_cifar(tmp_path)), "--model", "lenet"]
        if image
        else ["--dataset", "digits"]
    )
    argv = [
        "train",
        *data,
        "--method",
        method,
        "--epochs",
        "2",
        "--out",
        str(out),
        "--quiet",
        "--set",
        "robust.margin_samples=0",
        "--set",
        "optim.lr=0.05",
    ]
    for s in settings:
        argv += ["--set", s]
    cli.main(argv)
    return json.loads((out / "metrics.json").read_text()), out


def write_cifar(tmp_path, per_file=40):
    """CIFAR-10 binary batches of random pixels: a label byte, then 3072 pixel bytes per image."""
    folder = tmp_path / "data" / "cifar-10-batches-bin"
    if not folder.exists():
        folder.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
            rows = np.concatenate([rng.integers(0, 10, (per_file, 1)), rng.integers(0, 256, (per_file, 3072))], 1)
            rows.astype(np.uint8).tofile(folder / name)
    return folder.parent


@pytest.mark.parametrize("method", ["erm", "amp"])
def test_bf16_and_fp16_runs_train_close_to_float32(tmp_path, method):
    full, _ = train_cli(tmp_path, "fp32", method=method)
    for precision in ("bf16", "fp16"):
        half, out = train_cli(tmp_path, precision, f"speed.precision={precision}", method=method)
        assert abs(half["test_error"] - full["test_error"]) < 5.0
        assert abs(half["train_nll"] - full["train_nll"]) < 0.1
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert checkpoint["scaler"]["scale"] > 0  # fp16's loss scale is checkpointed for an exact resume


def test_channels_last_and_compile_keep_the_numbers(tmp_path, monkeypatch):
    base, _ = train_cli(tmp_path, "base", image=True)
    last, _ = train_cli(tmp_path, "last", "speed.channels_last=true", image=True)
    assert last["train_nll"] == pytest.approx(base["train_nll"], rel=1e-4)
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="eager"))
    compiled, _ = train_cli(tmp_path, "compiled", "speed.compile=true", image=True)
    assert compiled["train_nll"] == pytest.approx(base["train_nll"], rel=1e-4)


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"precision": "fp8"}, "speed.precision"),
        ({"channels_last": 1}, "speed.channels_last"),
    ],
)
def test_bad_speed_settings_are_refused(settings, words):
    with pytest.raises(ValueError, match=words):
        validate(TrainConfig(speed=SpeedConfig(**settings)))


def test_fp16_with_gradient_clipping_is_refused():
    config = advreg.methods.resolve(TrainConfig(method="amm"), ["speed.precision=fp16"])
    with pytest.raises(ValueError, match="clip_grad"):
        validate(config)


def test_a_channels_last_network_under_a_scaler_steps_and_skips():
    """A channels-last gradient has no flat view: the overflow mark must still land."""
    model = bn_net().to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (8,))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt = advreg.AMP(
        model.parameters(), torch.optim.SGD, epsilon=0.5, inner_lr=1.0, grad_scaler=scaler, model=model, **SGD
    )
    assert not model[0].weight.is_contiguous()
    theta = [p.detach().clone() for p in model.parameters()]
    opt.step(make_closure(opt, model, x, y, scaler, inject_at=1, where="bias")[0])  # the final pass overflows
    scaler.update()
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta)) and scaler.get_scale() == 2.0**7
    opt.step(make_closure(opt, model, x, y, scaler)[0])
    assert not all(torch.equal(p, t) for p, t in zip(model.parameters(), theta))
