"""AMP, SAM and AWP under DistributedDataParallel: 2 CPU processes (gloo) launched once through torchrun.

``tests/ddp_worker.py`` trains every case under DDP and saves each replica's final parameters and its count of
gradient all-reduces per step; this file checks them against single-process references:
- plain SGD and ``perturb_on="global"`` AMP equal the single-process optimizer on the global batch;
- the default (local) AMP, SAM and AWP equal the paper's per-batch Δ written out here: each replica r perturbs
  by its own half batch, Δ_r, and the step at θ uses the mean of ∇J_r(θ+Δ_r);
- both replicas end equal, after one all-reduce per step (N+1 for global AMP);
- the two-call form (first_step / ascent_step / second_step) with ``perturb_on="global"`` equals ``step(closure)``
  on the global batch.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

WORKER_PATH = Path(__file__).with_name("ddp_worker.py")
_spec = importlib.util.spec_from_file_location("ddp_worker", WORKER_PATH)
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)

TOL = {"rtol": 1e-10, "atol": 1e-10}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path) -> list[dict]:
    """Run the worker once under torchrun; the results of rank 0 and rank 1."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={W.WORLD}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(WORKER_PATH),
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(W.WORLD)]


# -- single-process references ------------------------------------------------------------------
def global_batch_reference(case: str) -> list[torch.Tensor]:
    """The library's optimizer in one process, on the whole global batch of every step."""
    model = W.make_model()
    opt = W.make_optimizer(case, model.parameters())
    for x, y in W.make_data():

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    return [p.detach() for p in model.parameters()]


def gradient_function():
    """grad_at(weights, x, y) = ∇J(weights) on (x, y), on a probe copy of the model."""
    probe = W.make_model()

    def grad_at(weights, x, y):
        with torch.no_grad():
            for p, w in zip(probe.parameters(), weights):
                p.copy_(w)
        return torch.autograd.grad(F.cross_entropy(probe(x), y), list(probe.parameters()))

    return grad_at


def per_replica_reference(delta_of) -> list[torch.Tensor]:
    """Each replica r perturbs by Δ_r = delta_of(∇J_r, θ) from its own shard; SGD steps at θ with mean_r ∇J_r(θ+Δ_r)."""
    model, grad_at = W.make_model(), gradient_function()
    params = list(model.parameters())
    sgd = torch.optim.SGD(params, **W.BASE)

    for x, y in W.make_data():
        theta = [p.detach().clone() for p in params]
        finals = []
        for r in range(W.WORLD):
            grad_r = lambda weights, r=r: grad_at(weights, W.shard(x, r), W.shard(y, r))
            delta = delta_of(grad_r, theta)
            finals.append(grad_r([t + d for t, d in zip(theta, delta)]))
        for p, *grads in zip(params, *finals):
            p.grad = sum(grads) / W.WORLD
        sgd.step()
    return [p.detach() for p in params]


def norm(tensors) -> torch.Tensor:
    return torch.sqrt(sum((t * t).sum() for t in tensors))


def amp_delta(epsilon, inner_lr, inner_steps):
    """AMP, Eq. 5: N steps Δ ← Π_ε(Δ + ζ∇J(θ+Δ)) from Δ = 0, on the global L2 ball."""

    def delta_of(grad, theta):
        delta = [torch.zeros_like(t) for t in theta]
        for _ in range(inner_steps):
            g = grad([t + d for t, d in zip(theta, delta)])
            delta = [d + inner_lr * gi for d, gi in zip(delta, g)]
            size = norm(delta)
            if size > epsilon:
                delta = [d * (epsilon / size) for d in delta]
        return delta

    return delta_of


def sam_delta(rho):
    """SAM: Δ = ρ g/‖g‖ with g = ∇J(θ)."""

    def delta_of(grad, theta):
        g = grad(theta)
        return [rho * gi / norm(g) for gi in g]

    return delta_of


def awp_delta(gamma, steps):
    """AWP, per weight tensor w_l with dim > 1 (v = 0 for biases): K2 steps
    v_l ← Π_{γ‖w_l‖}(v_l + η2‖w_l‖ g_l/‖g_l‖), η2 = γ/K2, g = ∇J(θ+v)."""

    def delta_of(grad, theta):
        delta = [torch.zeros_like(t) for t in theta]
        for _ in range(steps):
            g = grad([t + d for t, d in zip(theta, delta)])
            for i, (t, gi) in enumerate(zip(theta, g)):
                if t.dim() > 1:
                    v = delta[i] + (gamma / steps) * t.norm() * gi / gi.norm()
                    radius = gamma * t.norm()
                    delta[i] = v * (radius / v.norm()) if v.norm() > radius else v
        return delta

    return delta_of


def gradient_reuse_local_reference(epsilon, inner_lr, inner_steps, every, alpha) -> list[torch.Tensor]:
    """AMP every ``every`` steps with LookSAM's gradient reuse, Δ_r per replica: a refresh steps with
    g_s = mean_r ∇J_r(θ+Δ_r) and keeps v̂ = g_v/‖g_v‖, g_v = g_s − (⟨g_s, ḡ⟩/‖ḡ‖²)·ḡ with ḡ = mean_r ∇J_r(θ), the
    global batch's clean gradient; a step in between takes g = ḡ and steps with g + α‖g‖·v̂."""
    model, grad_at = W.make_model(), gradient_function()
    params = list(model.parameters())
    sgd = torch.optim.SGD(params, **W.BASE)

    def mean(vectors):
        return [sum(parts) / W.WORLD for parts in zip(*vectors)]

    def dot(a, b):
        return sum((u * v).sum() for u, v in zip(a, b))

    unit = None
    for t, (x, y) in enumerate(W.make_data()):
        theta = [p.detach().clone() for p in params]
        shards = [(W.shard(x, r), W.shard(y, r)) for r in range(W.WORLD)]
        clean = mean([grad_at(theta, *s) for s in shards])
        if t % every == 0:
            deltas = [amp_delta(epsilon, inner_lr, inner_steps)(lambda w, s=s: grad_at(w, *s), theta) for s in shards]
            g = mean([grad_at([a + d for a, d in zip(theta, delta)], *s) for delta, s in zip(deltas, shards)])
            g_v = [gs - dot(g, clean) / dot(clean, clean) * c for gs, c in zip(g, clean)]
            unit = [v / norm(g_v) for v in g_v]
        else:
            g = [c + alpha * norm(clean) * u for c, u in zip(clean, unit)]
        for p, gi in zip(params, g):
            p.grad = gi
        sgd.step()
    return [p.detach() for p in params]


def local_reference(case: str) -> list[torch.Tensor]:
    cls, kwargs = W.CASES[case]
    if kwargs.get("reuse") == "gradient":
        return gradient_reuse_local_reference(
            kwargs["epsilon"], kwargs["inner_lr"], kwargs["inner_steps"], kwargs["every"], kwargs["alpha"]
        )
    if cls.__name__ == "AMP":
        delta = amp_delta(kwargs["epsilon"], kwargs["inner_lr"], kwargs["inner_steps"])
    elif cls.__name__ == "SAM":
        delta = sam_delta(kwargs["rho"])
    else:
        delta = awp_delta(kwargs["gamma"], kwargs["steps"])
    return per_replica_reference(delta)


# -- the test: one launch, every check (pytest-xdist would launch once per worker for several tests) ---------
# gradient all-reduces of each step: N+1 under perturb_on="global" (the clean pass, N-1 inner passes, the final
# pass), 1 otherwise; with every=2 the steps in between make one pass
ALLREDUCES = {
    "amp1_global": [2] * W.STEPS,
    "amp2_global": [3] * W.STEPS,
    "amp1_global_gradient": [2, 1] * (W.STEPS // 2),
    "amp2_global_two_call": [3] * W.STEPS,
    "sam_global_two_call": [2] * W.STEPS,
}


@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available in this build of torch",
)
def test_ddp_matches_single_process_references(tmp_path):
    results = launch(tmp_path)
    for case, (cls, kwargs) in W.CASES.items():
        rank0, rank1 = (r[case] for r in results)
        assert all(torch.equal(a, b) for a, b in zip(rank0["params"], rank1["params"], strict=True)), (
            f"{case}: the replicas diverged"
        )
        for rank, r in enumerate((rank0, rank1)):
            assert r["allreduces"] == ALLREDUCES.get(case, [1] * W.STEPS), f"{case}: all-reduces per step, rank {rank}"
        local = cls is not None and kwargs.get("perturb_on", "local") == "local"
        expected = local_reference(case) if local else global_batch_reference(case)
        for a, e in zip(rank0["params"], expected, strict=True):
            torch.testing.assert_close(a, e, **TOL, msg=lambda m, case=case: f"{case}: {m}")
    for n in (1, 2):  # the per-replica Δ is not the global one: the comparisons above can fail
        local, shared = (results[0][f"amp{n}_{on}"]["params"] for on in ("local", "global"))
        assert max((a - b).abs().max().item() for a, b in zip(local, shared)) > 1e-6
