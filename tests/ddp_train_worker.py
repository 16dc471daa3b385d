"""Run by tests/test_ddp_train.py under torchrun: ``advreg.train`` of each case of CASES into OUT/NAME."""
import sys
from pathlib import Path

import torch.distributed as dist

from advreg.config import TrainConfig
from advreg.methods import resolve
from advreg.train import train

COMMON = ["data.name=digits", "model.hidden=32", "robust.margin_samples=0", "optim.lr=0.05"]
CASES = {
    "erm": ("erm", []),
    "amp_global": ("amp", ["speed.perturb_on=global"]),
    "amp_local": ("amp", []),
    "adv": ("adv", []),  # FGSM examples, crafted per sample: the same on a slice as in the whole batch
    "amp_every_fp16": ("amp", ["amp.every=2", "speed.precision=fp16"]),  # replicas must agree on a kept Δ
    "mixup": ("mixup", []),  # random partners: each replica its own stream
}


def config(name: str) -> TrainConfig:
    method, settings = CASES[name]
    return resolve(TrainConfig(method=method, epochs=2), [*COMMON, *settings])


if __name__ == "__main__":
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")  # once for every case: train() uses a group it finds (and leaves it)
    try:
        for name in CASES:
            train(config(name), out / name, progress=False)
    finally:
        dist.destroy_process_group()
