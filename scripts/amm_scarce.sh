#!/usr/bin/env bash
# The AMM paper's fewer-samples and noisy-labels experiments (Sec. 4.3.2-4.3.3) at a small scale: the reference
# and MIN+EXP (the paper's λ = 32, c = 2, d = 1) on a quarter / half of the training set, and with 20% / 40% of
# the training labels replaced by random classes, under the paper's protocol (see scripts/amm_study.sh), and ERM
# under the project's default protocol (lr 0.1, batch 50, /10 at 50% and 75%), since lr 5e-3 undertrains it.
# Usage: scripts/amm_scarce.sh DATASET OUT [extra advreg bench arguments]
set -euo pipefail
dataset=$1 out=$2
shift 2
variants=()
for setting in data.train_fraction=0.25 data.train_fraction=0.5 data.label_noise=0.2 data.label_noise=0.4; do
  tag=${setting#data.}; tag=${tag/=/}
  variants+=(--variant "erm_${tag}=erm:${setting}" --variant "amm_${tag}=amm:${setting}"
             --variant "erm_lr0.1_${tag}=erm:${setting};optim.lr=0.1;optim.batch_size=50;optim.milestones=0.5,0.75")
done
exec "${PYTHON:-python}" -m advreg bench --dataset "$dataset" --methods '' --seeds 3 --epochs 100 --jobs 1 --out "$out" \
  --set optim.lr=0.005 --set optim.batch_size=100 --set optim.milestones=0.5,0.8 "${variants[@]}" "$@"
