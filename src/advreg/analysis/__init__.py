"""Analyses of trained models: each is a function ``(model, data, config) -> result`` that never changes
the model it is given, a ``plot(result) -> Figure``, and :func:`save` writes the PNG, the raw numbers and the config.

Shared here: :func:`unchanged` (the snapshot/restore guard of DESIGN §6) and :func:`save`.
"""

from __future__ import annotations

import io
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from advreg.io import atomic_write_bytes, write_json


@contextmanager
def unchanged(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, the caller may move the weights and buffers and switch modes; on exit (also on error) every
    parameter, buffer and the train/eval mode of every submodule are back bit for bit, and ``.grad`` too."""
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    modes = [m.training for m in model.modules()]
    grads = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
    try:
        yield model
    finally:
        with torch.no_grad():
            for key, value in model.state_dict(keep_vars=True).items():
                value.copy_(state[key])
        for module, mode in zip(model.modules(), modes):
            module.training = mode
        for p, g in zip(model.parameters(), grads):
            p.grad = g


def save(
    out: str | Path, name: str, figure: Any, arrays: dict[str, np.ndarray], info: dict[str, Any]
) -> dict[str, Path]:
    """Write ``name.png`` (the figure), ``name.npz`` (the raw numbers; read with ``allow_pickle=False``) and
    ``name.json`` (``info``: the analysis's settings, its runs and summary numbers), each atomically; close the
    figure; return the paths."""
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"{name}.{ext}" for ext in ("png", "npz", "json")}
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=150, bbox_inches="tight")
    plt.close(figure)
    atomic_write_bytes(paths["png"], png.getvalue())
    npz = io.BytesIO()
    np.savez(npz, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write_bytes(paths["npz"], npz.getvalue())
    write_json(paths["json"], json.loads(json.dumps(info, default=str)))
    return paths
