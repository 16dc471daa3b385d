"""Fingerprint every method preset: a short fixed run (digits, seed 0) per preset, its final metrics and a hash of
its final weights, as JSON. Two trees that compute the same thing print the same fingerprints on the CPU, so a
refactor is checked bit for bit by diffing two outputs:

    python benchmarks/preset_fingerprint.py --out before.json    # on the old tree
    python benchmarks/preset_fingerprint.py --out after.json     # on the new tree
    python benchmarks/preset_fingerprint.py --compare before.json after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

from advreg import config as cfg
from advreg.methods import METHODS
from advreg.recipes import with_recipe
from advreg.train import train

# settings that keep every preset short on digits: two epochs, a small robust evaluation
SHORT = ("robust.margin_samples=50",)


def fingerprint(method: str, epochs: int, workdir: Path) -> dict:
    base = cfg.TrainConfig(method=method, epochs=epochs, data=cfg.DataConfig(name="digits"))
    config = with_recipe(base, None, list(SHORT))  # the CLI's way: the preset, then the settings
    out = workdir / method
    metrics = train(config, out, progress=False)
    weights = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].contiguous().numpy().tobytes())
    timing = {k for k in metrics if "time" in k or "seconds" in k}
    return {"metrics": {k: v for k, v in sorted(metrics.items()) if k not in timing}, "weights": digest.hexdigest()}


def compare(before: Path, after: Path) -> int:
    old, new = json.loads(before.read_text()), json.loads(after.read_text())
    differ = [m for m in sorted(set(old) | set(new)) if old.get(m) != new.get(m)]
    for m in sorted(set(old) | set(new)):
        print(f"{m:>18}: {'DIFFERS' if m in differ else 'same'}")
    print(f"{len(old) - len(differ)} same, {len(differ)} differ")
    return 1 if differ else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the fingerprints here")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            results[method] = fingerprint(method, args.epochs, Path(tmp))
            print(f"{method:>18}: {results[method]['weights'][:16]}", flush=True)
    text = json.dumps(results, indent=1, sort_keys=True)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
