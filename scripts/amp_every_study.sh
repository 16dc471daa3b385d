#!/usr/bin/env bash
# AMP's efficient mode (beyond the paper): a fresh Δ every k steps; in between, the kept Δ at the current θ
# (amp.reuse=delta) or LookSAM's reused orthogonal gradient (amp.reuse=gradient, its α chosen on validation).
# Rows ERM, AMP (k = 1) and both reuses at k = 2, 4, 6, 8 on MNIST-1D with the MLP, under README's Table 1 protocol
# for these two methods: 100 epochs, AMP ε = 0.5, ζ = 1, N = 1 (the setting Table 1's validation chose), 3 seeds
# (the README used --seeds 10), 2 jobs. Target: ≥ 80% of AMP's error reduction over ERM,
# (err_ERM − err_k)/(err_ERM − err_AMP), at ≤ 1.25× ERM's time per epoch. Take the time from
# benchmarks/amp_every_cost.py, which interleaves the rows epoch by epoch: bench runs them one after another, so its
# "time × ERM" follows the machine's load.
# Usage: scripts/amp_every_study.sh OUT [extra advreg bench arguments, e.g. --seeds 10]
set -euo pipefail
out=$1
shift
variants=()
for k in 2 4 6 8; do
  variants+=(--variant "amp_k$k=amp:amp.every=$k")
  variants+=(--variant "amp_g$k=amp:amp.every=$k;amp.reuse=gradient;amp.alpha=0.1|0.2|0.4|0.6")
done
exec "${PYTHON:-python}" -m advreg bench --dataset mnist1d --model mlp --methods erm,amp "${variants[@]}" \
  --seeds 3 --epochs 100 --jobs 2 --out "$out" "$@"
