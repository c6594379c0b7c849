"""The paper's K-FAC optimizer as one optax chain."""

from __future__ import annotations

import numbers

import optax

from kfac_jax_peft import _hyper as H
from kfac_jax_peft.clipping import CLIP_MODES, clipped
from kfac_jax_peft.kfac.transform import kfac_precondition

__all__ = ["CLIP_MODES", "kfac"]


def kfac(
    learning_rate: optax.ScalarOrSchedule,
    *,
    damping: optax.ScalarOrSchedule = 1e-3,
    max_update_norm: optax.ScalarOrSchedule | None = 1.0,
    clip: str = "post",
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    invert_every: int = 1,
    decay: optax.ScalarOrSchedule = 0.95,
    damping_mode: str = "exact",
    damping_scale: str = "absolute",
    inverse_method: str = "cholesky_solve",
    axis_name: str | None = None,
    weight_decay_mask=None,
) -> optax.GradientTransformationExtraArgs:
    """K-FAC with Newton-step clipping, weight decay and a learning rate::

        post: kfac_precondition -> clip(max_update_norm) -> decay -> -lr
        pre:  clip(max_update_norm) -> kfac_precondition -> decay -> -lr
        none: kfac_precondition -> decay -> -lr

    The defaults follow the paper (Appendix B): post-clipping, weight decay
    1e-4; its tuned values are learning rate 0.01-0.5, max norm 0.1-2.0 and
    damping 1e-2-1e-6 (Table 5), with ``invert_every=500`` for Table 2.
    ``damping_scale="relative"`` reads ``damping`` relative to each layer's
    mean curvature (see :func:`~kfac_jax_peft.kfac_precondition`).
    Weight decay is decoupled (added after preconditioning and clipping), as
    in AdamW. ``learning_rate`` may be a schedule (e.g.
    ``optax.join_schedules`` of two ``optax.linear_schedule`` for warm-up and decay).

    Under ``optax.inject_hyperparams(kfac)`` every numeric argument may be a
    hyperparameter (the learning rate, damping, max norm, weight decay,
    decay, ``invert_every``); nothing needs ``static_args``.
    """
    H.check_scalar("learning_rate", learning_rate, low=0.0)
    H.check_scalar("weight_decay", weight_decay, low=0.0)
    pre = kfac_precondition(damping, decay=decay, invert_every=invert_every,
                            damping_mode=damping_mode, damping_scale=damping_scale,
                            inverse_method=inverse_method, axis_name=axis_name)
    parts = [clipped(pre, clip, max_update_norm)]
    # a weight decay of exactly 0 adds nothing; a traced one (inject_hyperparams) is kept
    if not (isinstance(weight_decay, numbers.Real) and weight_decay == 0):
        parts.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)
