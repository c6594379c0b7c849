"""Zeroth-order gradient sources: SPSA (MeZO), HiZOO, and LoHO's hybrid.

Each is a pure, jittable ``value_and_grad``-like function whose gradient
(estimate) any optax chain consumes:

* :func:`spsa_value_and_grad`: ``(params, *args, rng) -> (loss, g)``;
  MeZO is this with ``optax.sgd``, MeZO-Adam with ``optax.adam``;
* :func:`hizoo_value_and_grad` with :func:`hizoo_init` / :class:`HiZOOState`:
  ``(params, state, *args, rng) -> (loss, g, state)``, directions shaped by a
  diagonal inverse-Hessian estimate;
* :func:`loho_value_and_grad`: exact gradients on the ``"fo"`` leaves, SPSA
  on the ``"zo"`` leaves, labelled by :func:`inter_layer_labels` or
  :func:`intra_layer_labels`; :func:`loho` is the matching
  ``optax.partition``.

They are gradient sources rather than ``GradientTransformation``s: a
transformation is handed ``updates`` it would have to ignore, whereas a
``value_and_grad``-like function slots in where ``jax.value_and_grad`` was,
in front of any optax chain (HiZOO's ``Sigma`` is returned as its own
state, a NamedTuple to keep beside the optimizer state).
"""

from kfac_jax_peft.zeroth_order.hizoo import HiZOOState, hizoo_init, hizoo_value_and_grad
from kfac_jax_peft.zeroth_order.loho import (
    FO,
    ZO,
    inter_layer_labels,
    intra_layer_labels,
    leaf_paths,
    loho,
    loho_value_and_grad,
    merge_labels,
    split_by_label,
)
from kfac_jax_peft.zeroth_order.spsa import spsa_value_and_grad

__all__ = [
    "FO",
    "HiZOOState",
    "ZO",
    "hizoo_init",
    "hizoo_value_and_grad",
    "inter_layer_labels",
    "intra_layer_labels",
    "leaf_paths",
    "loho",
    "loho_value_and_grad",
    "merge_labels",
    "spsa_value_and_grad",
    "split_by_label",
]
