"""The image sets end to end: CIFAR-10 binary files written here, read by load_dataset, a LeNet trained from the
CLI with augmentation and the in-model normalization, and the run reloaded for analysis with the same structure."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from advreg import cli
from advreg.config import TrainConfig
from advreg.data import DATASETS, load_dataset
from advreg.methods import resolve
from advreg.robustness import load_run
from advreg.train import build_run


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """A CIFAR-10 binary folder with 40 training images per batch file and 40 test images, 10 classes."""
    root = tmp_path_factory.mktemp("data")
    folder = root / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = np.arange(40, dtype=np.uint8) % 10
        pixels = rng.integers(0, 256, size=(40, 3072), dtype=np.uint8)
        np.concatenate([labels[:, None], pixels], axis=1).tofile(folder / name)
    return root


def test_cifar10_loads_as_pixels_in_the_unit_box_with_a_validation_carve(cifar):
    assert {"cifar10", "cifar100", "svhn", "gtsrb", "tinyimagenet"} <= set(DATASETS)
    d = load_dataset("cifar10", seed=0, data_dir=cifar)
    assert d.input_shape == (3, 32, 32) and d.num_classes == 10
    assert len(d.train[1]) + len(d.val[1]) == 200 and len(d.test[1]) == 40 and len(d.val[1]) == 20
    assert d.train[0].dtype == torch.float32 and 0 <= d.train[0].min() and d.train[0].max() <= 1
    raw = np.fromfile(cifar / "cifar-10-batches-bin" / "test_batch.bin", dtype=np.uint8).reshape(40, 3073)
    assert torch.equal(d.test[0][3], torch.from_numpy(raw[3, 1:].reshape(3, 32, 32)).float() / 255)
    with pytest.raises(ValueError, match="is not a directory"):
        load_dataset("cifar10", seed=0, data_dir=cifar / "nowhere")
    with pytest.raises(ValueError, match="cifar-100"):
        load_dataset("cifar100", seed=0, data_dir=cifar)  # the folder holds CIFAR-10 only


def test_the_model_normalizes_by_the_training_sets_channel_statistics(cifar):
    config = resolve(TrainConfig(epochs=1), ["data.name=cifar10", f"data.dir={cifar}", "model.name=lenet"])
    run = build_run(config)
    x = run.data.train[0]
    mean, std = x.double().mean(dim=(0, 2, 3)), x.double().std(dim=(0, 2, 3), unbiased=False)
    buffers = dict(run.model.named_buffers())
    torch.testing.assert_close(buffers["normalize.mean"].flatten().double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(buffers["normalize.std"].flatten().double(), std, rtol=1e-5, atol=1e-6)
    plain = build_run(resolve(config, ["model.normalize=false"]))
    assert not any("normalize" in name for name, _ in plain.model.named_buffers())


def test_a_lenet_trains_from_the_cli_with_augmentation_and_reloads(cifar, tmp_path):
    out = tmp_path / "run"
    cli.main(
        [
            "train",
            "--dataset",
            "cifar10",
            "--data-dir",
            str(cifar),
            "--model",
            "lenet",
            "--method",
            "amp",
            "--epochs",
            "1",
            "--out",
            str(out),
            "--quiet",
            "--set",
            "data.augment=standard",
            "--set",
            "optim.batch_size=64",
        ]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["test_error"] <= 100
    config, data, model = load_run(out)
    assert config.data.augment == "standard" and data.input_shape == (3, 32, 32)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_augmentation_needs_images_and_a_known_preset(cifar):
    with pytest.raises(ValueError, match="leave data.augment=none"):
        build_run(resolve(TrainConfig(epochs=1), ["data.name=digits", "data.augment=standard"]))
    with pytest.raises(SystemExit):
        cli.main(
            [
                "train",
                "--dataset",
                "cifar10",
                "--data-dir",
                str(cifar),
                "--model",
                "lenet",
                "--out",
                "x",
                "--set",
                "data.augment=bogus",
            ]
        )
