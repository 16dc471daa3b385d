"""Run by tests/test_ddp_train.py under torchrun: ``advreg.train`` of each case of CASES into OUT/NAME; with a second
argument ``taken``, one run into OUT/taken, a folder the test filled, and each replica's error into OUT/rankR.error."""

import sys
from pathlib import Path

import torch.distributed as dist

from advreg.config import TrainConfig
from advreg.methods import resolve
from advreg.train import RunFolderError, train

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


def record_folder_errors(out: Path) -> None:
    """Every replica must raise RunFolderError (and none wait for replica 0, which failed)."""
    try:
        train(config("erm"), out / "taken", progress=False)
    except RunFolderError as err:
        (out / f"rank{dist.get_rank()}.error").write_text(str(err))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")  # once for every case: train() uses a group it finds (and leaves it)
    try:
        if sys.argv[2:] == ["taken"]:
            record_folder_errors(out)
        else:
            for name in CASES:
                train(config(name), out / name, progress=False)
    finally:
        dist.destroy_process_group()
