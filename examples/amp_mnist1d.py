"""Train the MNIST-1D MLP with AMP in a plain PyTorch loop, on one GPU if there is one, else on the CPU.

    python examples/amp_mnist1d.py                          # --help lists the options
    python examples/amp_mnist1d.py --steps 20 --device cpu   # a quick check

A loop to copy: AMP wraps a base optimizer class, and ``opt.step(closure)`` calls the closure N+1 times a step
(the clean pass, then N ascent passes at θ+Δ); each call clears the gradients, computes the loss and
back-propagates it. The settings are the AMP paper's (Sec. 5.1): SGD with lr 0.1, momentum 0.9, weight decay 1e-4,
batch 50, the learning rate divided by 10 at 50% and 75% of the epochs; AMP's ε = 0.5, ζ = 1, N = 1.
``--steps N`` stops after N optimizer steps (a quick check). Prints the training loss per epoch and the test error.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import advreg
from advreg.data import load_dataset
from advreg.evaluate import evaluate
from advreg.models import build


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: train every epoch)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> float:
    """Train, print the test error (%) and return it."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    data = load_dataset("mnist1d", seed=args.seed)  # 4000/1000, 10% of the training set carved for validation
    x, y = (t.to(args.device) for t in data.train)  # x: (3600, 40), y: (3600,)
    model = build("mlp", data.num_classes, input_shape=data.input_shape).to(args.device)
    opt = advreg.AMP(
        model.parameters(),
        torch.optim.SGD,
        epsilon=0.5,
        inner_lr=1.0,
        inner_steps=1,
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-4,
        model=model,
    )  # model=: BatchNorm sees clean passes only
    milestones = [args.epochs // 2, args.epochs * 3 // 4]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    steps = 0
    for epoch in range(args.epochs):
        model.train()
        for rows in torch.randperm(len(x), device=args.device).split(50):

            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = F.cross_entropy(model(x[rows]), y[rows])
                loss.backward()
                return loss

            loss = opt.step(closure)  # the loss at the unperturbed weights θ
            steps += 1
            if steps == args.steps:
                break
        scheduler.step()
        print(f"epoch {epoch + 1}: training loss {loss.item():.4f} (last batch)")
        if steps == args.steps:
            break
    x_test, y_test = (t.to(args.device) for t in data.test)
    error = evaluate(model, x_test, y_test)["error"]  # in eval mode; leaves the model's mode as it was
    print(f"test error after {steps} steps: {error:.2f}%")
    return error


if __name__ == "__main__":
    main()
