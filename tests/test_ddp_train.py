"""``advreg train`` under torchrun (2 gloo processes) trains what one process trains on the same global batches."""

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from advreg.distributed import Replicas, from_environment
from advreg.io import load_checkpoint
from advreg.losses import OnLogits
from advreg.perturb import AMP
from advreg.step import Step
from advreg.train import RunFolderError, build_run, restore, train
from advreg.transforms import identity

WORKER = Path(__file__).with_name("ddp_train_worker.py")
spec = importlib.util.spec_from_file_location("ddp_train_worker", WORKER)
W = importlib.util.module_from_spec(spec)
spec.loader.exec_module(W)

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def launch(*args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(WORKER),
        *args,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_replicas_train_what_one_process_trains(tmp_path):
    launch(str(tmp_path / "ddp"))
    single = {
        name: train(W.config(name), tmp_path / "single" / name, progress=False) for name in ("erm", "amp_global", "adv")
    }
    for name, one in single.items():
        two = metrics(tmp_path / "ddp" / name)
        assert two["world_size"] == 2
        for key in ("train_nll", "test_nll", "val_nll"):
            assert two[key] == pytest.approx(one[key], rel=1e-4), (name, key)
    local, glob = metrics(tmp_path / "ddp" / "amp_local"), metrics(tmp_path / "ddp" / "amp_global")
    assert local["train_nll"] != pytest.approx(glob["train_nll"], rel=1e-6)  # Δ from each replica's half batch
    assert local["train_nll"] == pytest.approx(glob["train_nll"], rel=0.2)
    assert metrics(tmp_path / "ddp" / "amp_every_fp16")["world_size"] == 2  # finished: no collective mismatch
    rng = load_checkpoint(tmp_path / "ddp" / "mixup" / "checkpoint.pt")["rng"]
    assert len(rng["torch"]) == 2 and not torch.equal(*rng["torch"])  # each replica's own stream, both saved
    history = (tmp_path / "ddp" / "erm" / "history.csv").read_text().splitlines()
    assert len(history) == 3 and (tmp_path / "ddp" / "erm" / "checkpoint.pt").exists()


def test_a_checkpoint_resumes_only_with_the_same_number_of_processes(tmp_path):
    train(W.config("erm"), tmp_path / "run", progress=False)
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert checkpoint["world_size"] == 1
    checkpoint["world_size"] = 2
    with pytest.raises(RunFolderError, match="--nproc_per_node"):
        restore(build_run(W.config("erm")), checkpoint)


def test_uneven_slices_weigh_their_mean_loss_so_the_average_gradient_is_the_batch_mean():
    """Replica r's mean loss × n_r·W/n, averaged over the W replicas, is the mean loss of the whole batch."""
    x, y = torch.arange(7.0).view(7, 1), torch.arange(7)
    slices = [Replicas(rank, 3, rank, False).shard(x, y) for rank in range(3)]
    assert [len(s[1]) for s in slices] == [3, 2, 2]
    assert torch.equal(torch.cat([s[0] for s in slices]), x)
    weighted = sum(s[2] * s[0].mean() for s in slices) / 3
    assert weighted.item() == pytest.approx(x.mean().item())
    with pytest.raises(ValueError, match="cannot feed"):
        Replicas(0, 3, 0, False).shard(x[:2], y[:2])


def test_one_gpu_index_for_every_replica_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        from_environment("cuda:0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert from_environment("cpu") is None


def test_a_folder_replica_0_refuses_stops_every_replica_with_an_error(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("not a run")
    launch(str(tmp_path), "taken")  # each replica raises and returns: before, replica 1 sat in a barrier until killed
    assert "is not empty and holds no advreg run" in (tmp_path / "rank0.error").read_text()
    assert "replica 0 could not prepare the run folder" in (tmp_path / "rank1.error").read_text()


def test_a_local_pass_under_no_sync_is_not_weighted_by_the_slice():
    """An uneven slice's weight n_r·W/n makes the all-reduced gradient the batch mean's; a pass under no_sync (a
    local Δ) is the replica's own batch mean, unweighted, as the paper's per-batch Δ. AMP's Δ = ζ·∇J(θ) (N = 1,
    inside the ball) shows which weight each pass had: by hand, θ ← θ - lr·w·∇J(θ + ζ·∇J(θ))."""
    torch.manual_seed(0)
    model, x, y = torch.nn.Linear(3, 2), torch.randn(8, 3), torch.randint(0, 2, (8,))
    theta = [p.detach().clone() for p in model.parameters()]
    local = []

    @contextlib.contextmanager
    def no_sync():  # what the engine enters for a local pass (DistributedDataParallel.no_sync)
        local.append(True)
        yield

    opt = AMP(model.parameters(), torch.optim.SGD, lr=0.1, epsilon=100.0, inner_lr=0.5, no_sync=no_sync)
    Step(model, identity, OnLogits(torch.nn.functional.cross_entropy), opt, 2)(x, y, weight=1.5)

    def grad_at(weights):
        w = [t.clone().requires_grad_() for t in weights]
        return torch.autograd.grad(torch.nn.functional.cross_entropy(x @ w[0].T + w[1], y), w)

    g = grad_at(theta)
    g_up = grad_at([t + 0.5 * gi for t, gi in zip(theta, g)])
    assert local == [True] and not opt.local_pass
    for p, t, gi in zip(model.parameters(), theta, g_up):
        torch.testing.assert_close(p.detach(), t - 0.1 * 1.5 * gi)
