#!/usr/bin/env bash
# The AWP paper's study (Tables 1, 3; Sec. 5) at a small scale on one dataset: AT, TRADES and MART, each without and
# with AWP, and AT with the random perturbation RWP, 3 seeds, under the paper's schedule (SGD momentum 0.9, weight
# decay 5e-4, lr 0.1 divided by 10 at 50% and 75% of training). Training attack PGD-10 (L∞, 8 levels, step 2 levels
# of the input range), test attack PGD-20; every run keeps its best checkpoint (lowest validation robust error) and
# its last one. Usage: scripts/awp_study.sh DATASET OUT [extra advreg bench arguments]
set -euo pipefail
dataset=$1 out=$2
shift 2
exec "${PYTHON:-python}" -m advreg bench --dataset "$dataset" --methods at,at_awp,at_rwp,trades,trades_awp,mart,mart_awp \
  --seeds 3 --epochs 100 --jobs 2 --out "$out" --set optim.weight_decay=5e-4 "$@"
