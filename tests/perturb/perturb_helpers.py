"""What the weight-perturbation tests share: a small MLP with its batches, the closure, a run of steps, and the
model as a function of one flat parameter vector (the papers' θ ∈ R^K), on which their references are written.

Float64 unless told: the references match the optimizers to ~1e-10.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

DT = torch.float64


def make_model(seed=0, *, dropout=0.0, batchnorm=False, dtype=DT, hidden=7):
    """Linear(5,h) [-BatchNorm1d] - Tanh [- Dropout] - Linear(h,3), deterministic init."""
    torch.manual_seed(seed)
    layers = [nn.Linear(5, hidden)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(hidden))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, 3))
    return nn.Sequential(*layers).to(dtype)


def make_batches(n_steps, batch_size=16, seed=1, dtype=DT):
    """A different fixed batch for every step."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch_size, 5, generator=gen, dtype=dtype), torch.randint(0, 3, (batch_size,), generator=gen))
        for _ in range(n_steps)
    ]


def make_closure(opt, model, x, y, seen=None):
    """The torch.optim closure on (x, y); ``seen`` (a list) gets the flat weights of each pass, one per call."""

    def closure():
        if seen is not None:
            seen.append(flat_params(model))
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def run_opt(opt, model, batches):
    """One opt.step per batch; returns (returned losses, closure calls per step, flat params after each step)."""
    losses, calls, traj = [], [], []
    for x, y in batches:
        seen = []
        losses.append(opt.step(make_closure(opt, model, x, y, seen)).detach())
        calls.append(len(seen))
        traj.append(flat_params(model))
    return losses, calls, traj


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


class FlatNet:
    """The model seen as a function of one flat parameter vector theta (the paper's theta in R^K)."""

    def __init__(self, model):
        self.model = model
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]

    def unflatten(self, theta):
        return {n: c.view(s) for n, c, s in zip(self.names, theta.split(self.sizes), self.shapes)}

    def loss(self, theta, x, y):
        return F.cross_entropy(functional_call(self.model, self.unflatten(theta), (x,)), y)

    def loss_grad(self, theta, x, y):
        theta = theta.detach().requires_grad_(True)
        loss = self.loss(theta, x, y)
        (g,) = torch.autograd.grad(loss, theta)
        return loss.detach(), g


def project(delta, eps, norm, sizes):
    """Lines 8-10 of Algorithm 1: if ||Delta||_2 > eps, Delta <- eps * Delta / ||Delta||_2 (per tensor of ``sizes``
    under norm="per_tensor")."""
    if norm == "global":
        n = delta.norm()
        return delta * (eps / n) if n > eps else delta
    chunks = []
    for c in delta.split(sizes):
        n = c.norm()
        chunks.append(c * (eps / n) if n > eps else c)
    return torch.cat(chunks)


def ref_sgd(theta, g, buf, lr, momentum=0.0, wd=0.0):
    """torch.optim.SGD (dampening 0, no nesterov): d = g + wd·θ; buf = m·buf + d (buf = d first); θ -= lr·buf."""
    d = g + wd * theta
    buf = d.clone() if buf is None else momentum * buf + d
    return theta - lr * buf, buf
