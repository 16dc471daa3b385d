#!/usr/bin/env bash
# The README's analysis figures (docs/figures/), from landed runs: ERM vs AMP (seed 0 of the MNIST-1D Table 1 bench,
# AMP at its validated ε 0.5, ζ 1), the bench's reliability diagrams, and ERM vs AMP on the spiral (trained here).
# With AWP_BENCH set (e.g. runs/awp_mnist1d), also the AWP paper's weight-loss landscape of AT vs AT-AWP (seed 0).
# Usage: [AWP_BENCH=DIR] scripts/figures.sh TABLE1_BENCH OUT   (e.g. scripts/figures.sh runs/table1_mnist1d docs/figures)
set -euo pipefail
bench=$1 out=$2
py=${PYTHON:-python}
erm=$bench/runs/erm/seed0 amp="$bench/runs/amp__amp.epsilon=0.5__amp.inner_lr=1/seed0"
$py -m advreg analyze landscape "$erm" "$amp" --labels ERM,AMP --out "$out" --quiet
$py -m advreg analyze landscape "$erm" "$amp" --labels ERM,AMP --out "$out/2d" --set dims=2 --set steps=21 --quiet
$py -m advreg analyze radius "$erm" "$amp" --labels ERM,AMP --out "$out" --quiet
$py -m advreg analyze hessian "$erm" "$amp" --labels ERM,AMP --out "$out" --quiet
$py -m advreg analyze calibration "$bench" --out "$out" --quiet
$py -m advreg analyze curves "$erm" "$amp" --labels ERM,AMP --out "$out" --quiet
$py -m advreg analyze operational-region --out "$out" --quiet
for method in erm amp; do
  [[ -f runs/spiral/$method/metrics.json ]] || $py -m advreg train --dataset spiral --method $method --epochs 200 \
    --out runs/spiral/$method --quiet
done
$py -m advreg analyze boundary runs/spiral/erm runs/spiral/amp --labels ERM,AMP --out "$out" --quiet
if [[ -n ${AWP_BENCH:-} ]]; then
  $py -m advreg analyze awp-landscape "$AWP_BENCH/runs/at/seed0" "$AWP_BENCH/runs/at_awp/seed0" --labels AT,AT-AWP \
    --out "$out" --quiet
fi
