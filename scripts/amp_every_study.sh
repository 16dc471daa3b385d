#!/usr/bin/env bash
# AMP's efficient mode (beyond the paper): a fresh Δ every k steps, the kept Δ reused (at the current θ) in between.
# Rows ERM, AMP (k = 1) and AMP with k = 2, 4, 8 on MNIST-1D with the MLP, under README's Table 1 protocol for these
# two methods: 100 epochs, AMP ε = 0.5, ζ = 1, N = 1 (the setting Table 1's validation chose), 3 seeds (the README
# used --seeds 10), 2 jobs. Target: ≥ 80% of AMP's error reduction over ERM, (err_ERM − err_k)/(err_ERM − err_AMP),
# at ≤ 1.25× ERM's time per epoch. Take the time from benchmarks/amp_every_cost.py, which interleaves the rows epoch
# by epoch: bench runs them one after another, so its "time × ERM" follows the machine's load.
# Usage: scripts/amp_every_study.sh OUT [extra advreg bench arguments, e.g. --epochs 50]
set -euo pipefail
out=$1
shift
exec "${PYTHON:-python}" -m advreg bench --dataset mnist1d --model mlp --methods erm,amp \
  --variant 'amp_k2=amp:amp.every=2' --variant 'amp_k4=amp:amp.every=4' --variant 'amp_k8=amp:amp.every=8' \
  --seeds 3 --epochs 100 --jobs 2 --out "$out" "$@"
