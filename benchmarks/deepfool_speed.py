"""Batched DeepFool (advreg.attacks.deepfool) against a one-sample-at-a-time, one-class-at-a-time loop.

The loop is DeepFool as torchattacks and the original code run it: for each image, for each class, one
autograd call. Both must reach the same mean perturbation norm (checked and printed); the ratio of their
wall times is measured in this run. Usage: python benchmarks/deepfool_speed.py [--samples 200] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from advreg.attacks import deepfool


def reference_deepfool(model: nn.Module, x: torch.Tensor, steps: int, overshoot: float) -> torch.Tensor:
    """Per-sample, per-class DeepFool (Moosavi-Dezfooli et al., Algorithm 2); returns the L2 norms (B,)."""
    norms = []
    for xi in x:
        xi = xi.unsqueeze(0)
        source = model(xi).argmax(1).item()
        r_total = torch.zeros_like(xi)
        for _ in range(steps):
            point = (xi + (1 + overshoot) * r_total).requires_grad_(True)
            logits = model(point)[0]
            if logits.argmax().item() != source:
                break
            grad_source = torch.autograd.grad(logits[source], point, retain_graph=True)[0]
            best, best_r = float("inf"), None
            for k in range(len(logits)):
                if k == source:
                    continue
                w = torch.autograd.grad(logits[k], point, retain_graph=True)[0] - grad_source
                f = (logits[k] - logits[source]).item()
                dist = abs(f) / w.norm().item()
                if dist < best:
                    best, best_r = dist, abs(f) / w.norm().pow(2) * w
            r_total = r_total + best_r.detach()
        norms.append(((1 + overshoot) * r_total).norm().item())
    return torch.tensor(norms)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))
    model = model.to(args.device).eval()
    x = torch.randn(args.samples, 40, device=args.device)
    deepfool(model, x[:8], steps=args.steps)  # warm-up
    (_, batched_norms, _), batched_s = timed(lambda: deepfool(model, x, steps=args.steps))
    reference_norms, reference_s = timed(lambda: reference_deepfool(model, x, args.steps, 0.02))
    print(
        f"device {args.device}, torch {torch.__version__}, MLP 40-100-100-10, {args.samples} samples, "
        f"up to {args.steps} steps, measured in this run"
    )
    print(f"{'method':28s} {'seconds':>9s} {'mean L2 norm':>13s}")
    print(f"{'batched (advreg)':28s} {batched_s:9.3f} {batched_norms.mean().item():13.5f}")
    print(f"{'per sample, per class loop':28s} {reference_s:9.3f} {reference_norms.mean().item():13.5f}")
    gap = (batched_norms.cpu() - reference_norms).abs().max().item()
    print(f"speed-up {reference_s / batched_s:.1f}x; largest per-sample norm difference {gap:.2e}")


if __name__ == "__main__":
    main()
