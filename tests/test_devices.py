"""AMP and SAM on CUDA give the CPU's numbers (runs only where a GPU is present)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advreg

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _steps(make_opt, device, steps=5):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).double()
    model = copy.deepcopy(model).to(device)
    opt = make_opt(model.parameters())
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 8, generator=gen, dtype=torch.float64).to(device)
        y = torch.randint(0, 4, (32,), generator=gen).to(device)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    return [t.detach().cpu() for t in model.state_dict().values()]


@cuda
@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: advreg.AMP(p, torch.optim.SGD, epsilon=0.5, inner_lr=1.0, inner_steps=2, lr=0.1, momentum=0.9),
        lambda p: advreg.AMP(p, torch.optim.SGD, epsilon=0.5, inner_lr=1.0, norm="per_tensor", lr=0.1),
        lambda p: advreg.SAM(p, torch.optim.SGD, rho=0.1, adaptive=True, lr=0.1, momentum=0.9),
    ],
    ids=["amp_global", "amp_per_tensor", "asam"],
)
def test_cuda_matches_cpu_in_float64(make_opt):
    for cpu, gpu in zip(_steps(make_opt, "cpu"), _steps(make_opt, "cuda")):
        torch.testing.assert_close(gpu, cpu, rtol=1e-9, atol=1e-10)
