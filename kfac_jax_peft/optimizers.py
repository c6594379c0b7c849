"""The paper's K-FAC optimizer as one optax chain."""

from __future__ import annotations

import optax

from kfac_jax_peft.clipping import clip_by_update_norm
from kfac_jax_peft.kfac.transform import ScalarOrSchedule, kfac_precondition

CLIP_MODES = ("post", "pre", "none")


def kfac(
    learning_rate: ScalarOrSchedule,
    *,
    damping: ScalarOrSchedule = 1e-3,
    max_update_norm: ScalarOrSchedule | None = 1.0,
    clip: str = "post",
    weight_decay: float = 1e-4,
    invert_every: int = 1,
    decay: ScalarOrSchedule = 0.95,
    damping_mode: str = "exact",
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
    Weight decay is decoupled (added after preconditioning and clipping), as
    in AdamW. ``learning_rate`` may be a schedule (e.g.
    ``optax.join_schedules`` of two ``optax.linear_schedule`` for warm-up and decay).
    """
    if clip not in CLIP_MODES:
        raise ValueError(f"unknown clip mode {clip!r}; expected one of {CLIP_MODES}")
    if clip != "none" and max_update_norm is None:
        raise ValueError(f"clip={clip!r} needs max_update_norm")
    pre = kfac_precondition(damping, decay=decay, invert_every=invert_every,
                            damping_mode=damping_mode, inverse_method=inverse_method,
                            axis_name=axis_name)
    parts = []
    if clip == "pre":
        parts += [clip_by_update_norm(max_update_norm), pre]
    elif clip == "post":
        parts += [pre, clip_by_update_norm(max_update_norm)]
    else:
        parts += [pre]
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)
