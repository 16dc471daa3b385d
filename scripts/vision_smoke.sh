#!/usr/bin/env bash
# A short CIFAR-shaped run (issue 10): synthetic CIFAR-10 binary files of the real format and shapes (random pixels,
# so the accuracies mean nothing) in OUT/data, then PreActResNet18 with ERM and with AMP under the paper's recipe
# (amp_preactresnet18: ε 0.5, ζ 1 per tensor, batch 50, Nesterov, crop + flip) for EPOCHS epochs each, their seconds per epoch, and advreg report on the two runs. The DeepFool test margin is left
# out (robust.margin_samples=0): on a CPU it costs more than the training itself.
# Usage: scripts/vision_smoke.sh OUT [PER_BATCH_FILE=200] [EPOCHS=2] [extra advreg train arguments, e.g. --set device=cuda]
set -euo pipefail
out=$1 per=${2:-200} epochs=${3:-2}
shift $(( $# < 3 ? $# : 3 ))
py=${PYTHON:-python}
mkdir -p "$out/data/cifar-10-batches-bin"
$py - "$out/data/cifar-10-batches-bin" "$per" <<'PY'
import sys
from pathlib import Path
import numpy as np
folder, per = Path(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
    labels = rng.integers(0, 10, size=(per, 1), dtype=np.uint8)  # 1 label byte, then R, G, B planes of 32x32
    np.concatenate([labels, rng.integers(0, 256, size=(per, 3072), dtype=np.uint8)], axis=1).tofile(folder / name)
PY
for method in erm amp; do
  [[ -f $out/$method/metrics.json ]] || $py -m advreg train --dataset cifar10 --data-dir "$out/data" \
    --recipe amp_preactresnet18 --method $method --epochs "$epochs" --out "$out/$method" --quiet \
    --set robust.margin_samples=0 "$@"
done
$py -m advreg report "$out/erm" "$out/amp" --out "$out/report"
$py -c "import json, sys
for m in ('erm', 'amp'):
    d = json.load(open(f'$out/{m}/metrics.json'))
    print(f'{m}: {d[\"train_seconds\"] / d[\"epochs\"]:.1f} s per epoch')"
