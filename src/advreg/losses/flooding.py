"""Flooding (Ishida et al., ICML 2020, Eq. 1): J̃ = |J - b| + b on the batch-mean loss J (AMP paper: b = 0.02).

Above the flood level b it is J; below, its gradient flips sign, so training ascends back to b.
"""

from __future__ import annotations

from torch import Tensor


def flood(loss: Tensor, level: float) -> Tensor:
    """|J - b| + b for the batch-mean loss J; b = 0 is the loss itself."""
    return (loss - level).abs() + level if level > 0 else loss
