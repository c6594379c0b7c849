"""One definition of smoothing and of steps-to-reach, against direct loops."""

import numpy as np
import pytest

from kfac_jax_peft.curves import smooth, steps_to_reach


def test_smooth_is_the_trailing_mean():
    x = np.random.default_rng(0).normal(size=23)
    want = [x[max(0, i - 4):i + 1].mean() for i in range(len(x))]
    np.testing.assert_allclose(smooth(x, 5), want, rtol=1e-13)


def test_steps_to_reach_uses_the_smoothed_curve():
    losses = [1.0, 0.2, 0.9, 0.5, 0.4, 0.3]
    steps = [10, 20, 30, 40, 50, 60]
    assert steps_to_reach(steps, losses, 0.2) == 20  # raw values
    # one lucky batch does not count with a window of 3: (0.5+0.4+0.3)/3 = 0.4
    assert steps_to_reach(steps, losses, 0.45, window=3) == 60
    assert steps_to_reach(steps, losses, 0.1) is None
    with pytest.raises(ValueError, match="6 steps but 5 losses"):
        steps_to_reach(steps, losses[:5], 0.5)
