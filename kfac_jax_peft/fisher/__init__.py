"""Exact empirical, improved-empirical and sampled Fisher updates, and diagnostics.

* :func:`per_sample_value_and_grad`: loss, gradient, per-sample gradients
  and logits-level gradient norms from one pass (memory ``N x P``);
* :func:`ef_precondition`, :func:`ief_precondition`,
  :func:`sampled_fisher_precondition`: optax transformations applying the
  exact damped EF, iEF and ``F(k)`` preconditioners through the Woodbury
  identity on the ``N x N`` Gram matrix (``ef``, ``ief`` and
  ``sampled_fisher`` are their deprecated first names);
* :func:`influence`: influence functions ``grad l(z')^T (H + lambda I)^-1
  grad l(z)`` of training examples on test examples, with ``H`` from K-FAC
  or EKFAC factors, DataInf, or exact (:mod:`kfac_jax_peft.fisher.influence`);
  :func:`influence_top_k`;
* :func:`fisher_vector_product`, :func:`gamma`, :func:`gamma_relative_to_sgd`,
  :func:`gradient_norm_imbalance`: the paper's indicators;
  :func:`curvature_along`, :func:`gamma_and_curvature`,
  :func:`squared_norm_shares`: where a step goes.

Reference: Wu et al., "An Improved Empirical Fisher Approximation for
Natural Gradient Descent", NeurIPS 2024, and its supporting material.
"""

from kfac_jax_peft.fisher.diagnostics import (
    curvature_along,
    fisher_vector_product,
    gamma,
    gamma_and_curvature,
    gamma_ratios,
    gamma_relative_to_sgd,
    gradient_norm_imbalance,
    per_sample_grad_norms,
    squared_norm_shares,
)
from kfac_jax_peft.fisher.influence import METHODS as INFLUENCE_METHODS
from kfac_jax_peft.fisher.influence import Influence, influence
from kfac_jax_peft.fisher.influence import top_k as influence_top_k
from kfac_jax_peft.fisher.per_sample import per_sample_value_and_grad
from kfac_jax_peft.fisher.woodbury import (
    DAMPING_SCALES,
    WoodburyState,
    ef,
    ef_precondition,
    ief,
    ief_precondition,
    ief_row_scale,
    sampled_fisher,
    sampled_fisher_precondition,
    woodbury_precondition,
)
from kfac_jax_peft.likelihoods import sample_cotangents

__all__ = [
    "DAMPING_SCALES",
    "INFLUENCE_METHODS",
    "Influence",
    "WoodburyState",
    "ef",
    "ef_precondition",
    "fisher_vector_product",
    "gamma",
    "curvature_along",
    "gamma_and_curvature",
    "squared_norm_shares",
    "gamma_ratios",
    "gamma_relative_to_sgd",
    "gradient_norm_imbalance",
    "ief",
    "ief_precondition",
    "ief_row_scale",
    "influence",
    "influence_top_k",
    "per_sample_grad_norms",
    "per_sample_value_and_grad",
    "sample_cotangents",
    "sampled_fisher",
    "sampled_fisher_precondition",
    "woodbury_precondition",
]
