#!/usr/bin/env bash
# The AWP paper's study (Tables 1, 3; Sec. 5) at a small scale on one dataset: AT, TRADES and MART, each without and
# with AWP, and AT with the random perturbation RWP, 3 seeds, under the paper's schedule (SGD momentum 0.9, weight
# decay 5e-4, lr 0.1 divided by 10 at 50% and 75% of training, 100 epochs). Training attack PGD-10 (L∞, step ε/4),
# test attack PGD-20 with the same ε; every run keeps its best checkpoint (lowest validation robust error) and its
# last one. ε is in 8-bit levels of the input range, chosen per dataset so that AT leaves a robust generalization
# gap to close (one AT run each, seed 0): MNIST-1D 4 levels (0.04 of the range; at 8 the 100-100 MLP underfits
# the adversarial loss), digits 32 levels (0.125; at 8 AT reaches 2% robust error and there is nothing to regularize).
# Usage: scripts/awp_study.sh DATASET OUT [extra advreg bench arguments]
set -euo pipefail
dataset=$1 out=$2
shift 2
case $dataset in
  mnist1d) pixels=4 step=1 ;;
  digits) pixels=32 step=8 ;;
  *) pixels=8 step=2 ;;  # the paper's 8/255, step 2/255
esac
exec "${PYTHON:-python}" -m advreg bench --dataset "$dataset" --methods at,at_awp,at_rwp,trades,trades_awp,mart,mart_awp \
  --seeds 3 --epochs 100 --jobs 2 --out "$out" --set optim.weight_decay=5e-4 \
  --set at.pixels=$pixels --set at.step_pixels=$step --set robust.pixels=$pixels --set robust.step_pixels=$step "$@"
