"""Loss curves: one definition of smoothing and of "steps to reach a loss".

The paper's speed claim (its Fig. 5) is the number of steps an optimizer
needs to reach the final training loss of a reference run. Training losses
are noisy mini-batch values, so both the demo (a loss per step) and the
pipeline (a loss per logging window, already a window mean) compare a
trailing moving average with the target::

    smooth(x)_i = mean(x_{max(0, i - window + 1)}, ..., x_i)
    steps_to_reach = the first step s whose smoothed loss is <= target
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def smooth(values: Sequence[float], window: int = 10) -> np.ndarray:
    """Trailing moving average over ``window`` values (fewer at the start)."""
    x = np.asarray(values, np.float64)
    c = np.cumsum(np.insert(x, 0, 0.0))
    lo = np.maximum(0, np.arange(1, len(x) + 1) - window)
    return (c[1:] - c[lo]) / (np.arange(1, len(x) + 1) - lo)


def steps_to_reach(steps: Sequence[int], losses: Sequence[float], target: float,
                   window: int = 1) -> int | None:
    """The first of ``steps`` whose smoothed loss (window ``window``) is at
    most ``target``; None if none is."""
    if len(steps) != len(losses):
        raise ValueError(f"{len(steps)} steps but {len(losses)} losses")
    hit = np.nonzero(smooth(losses, window) <= target)[0]
    return int(steps[hit[0]]) if hit.size else None
