"""EKFAC: K-FAC's eigenbasis with a re-estimated diagonal (one more stage).

George et al. (2018), "Fast Approximate Natural Gradient Descent in a
Kronecker-factored Eigenbasis". K-FAC's block ``A kron G`` is, in its
eigenbasis ``Q = Q_A kron Q_G``, the diagonal ``a g^T`` (products of the
factors' eigenvalues). EKFAC keeps the basis and replaces that diagonal by
the second moments of the gradients projected into it, the best diagonal
approximation of the Fisher in that basis (in Frobenius norm)::

    s = E[(Q_A^T dW Q_G)^2]            dW = sum_{t in example} abar_t ghat_t^T

and preconditions with ``U = Q_A [(Q_A^T V Q_G) / (s + lambda)] Q_G^T``.

**Granularity.** The statistic is formed in the capture's backward pass
from the per-token inputs and output cotangents (see
:mod:`kfac_jax_peft.capture`, *EKFAC*), per token: the "expand" setting in
which the library's K-FAC factors treat tokens as examples
(``s = (1/N) sum_t (Q_A^T abar_t)^2 ((Q_G^T ghat_t)^2)^T``); with one token
per example (an input without a token axis) it is the per-example empirical
Fisher's diagonal exactly. When tokens and output gradients are independent
``s`` equals ``a g^T`` in expectation, so EKFAC corrects K-FAC only where that
assumption fails.

**Schedule.** The basis is the one of ``exact`` damping, decomposed every
``invert_every`` statistics calls. The diagonal is a bias-corrected moving
average (decay ``decay``, as the factors) of the statistics measured in the
basis the probes carried (:func:`ekfac_probes`: the basis of the optimizer
state the step starts from). A decomposition changes the basis, so each
layer's diagonal restarts at its decomposition (weight 0): until its first
statistics in the new basis the layer preconditions with ``a g^T``, i.e. as
K-FAC. The statistics of the decomposition step itself, measured in the old
basis, are dropped. Statistics are therefore needed between decompositions:
``invert_every >= 2``, and in a loop that captures statistics only on some
steps, more often than the decompositions (George et al. recompute the
basis rarely and the diagonal at every step).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kfac_jax_peft.capture import EKFACProbe, LayerStats
from kfac_jax_peft.kfac import factors as F
from kfac_jax_peft.kfac.layers import group_fn, path_str


class Diagonal(NamedTuple):
    """EKFAC's moving average of one layer: the sum ``S`` (``[d_a, d_g]``)
    and the sum of its weights ``w``; ``S / w`` is the diagonal."""

    average: jax.Array
    weight: jax.Array


def init_diagonal(d_a: int, d_g: int, dtype) -> Diagonal:
    return Diagonal(jnp.zeros((d_a, d_g), dtype), jnp.zeros((), dtype))


def diagonal_statistics(matched: Mapping[str, LayerStats], factor_stats: Mapping, specs,
                        dtype) -> dict[str, tuple[jax.Array, jax.Array]]:
    """``{layer: (diag / num_examples, ok)}``; ``ok`` also needs the layer's
    own ``A`` and ``G`` statistics to be accepted (``factor_stats`` from
    :func:`~kfac_jax_peft.kfac.stages.factor_statistics`)."""
    out = {}
    for name, s in matched.items():
        spec = specs[name]
        if s.ekfac is None:
            raise ValueError(
                f"damping_mode='ekfac': the statistics of layer {name!r} carry no EKFAC "
                "diagonal; capture them with probes from ekfac_probes(probes, opt_state)")
        x, ok = F.normalise_sum(s.ekfac.diag, s.num_examples, dtype)
        out[name] = (x, ok & factor_stats[spec.a_key][1] & factor_stats[spec.g_key][1])
    return out


def accumulate_diagonals(layers: Mapping, stats: Mapping, decay) -> dict:
    """One moving-average step of each layer's diagonal in ``stats``."""
    decay_ok = (jnp.asarray(decay) >= 0) & (jnp.asarray(decay) < 1)
    out = dict(layers)
    for name, (x, ok) in stats.items():
        d = layers[name].diag
        ok = ok & decay_ok
        out[name] = layers[name]._replace(diag=Diagonal(
            F.ema(d.average, x, ok, decay), F.ema_weight(d.weight, ok, decay)))
    return out


def restart_diagonals(specs: Mapping, layers: Mapping, good: Mapping) -> dict:
    """Restart (weight 0) the diagonal of every layer one of whose factors
    got a new decomposition (``good``: by factor key)."""
    out = dict(layers)
    for name, spec in specs.items():
        new = good.get(spec.a_key, False) | good.get(spec.g_key, False)
        d = layers[name].diag
        out[name] = layers[name]._replace(diag=Diagonal(
            jnp.where(new, 0.0, d.average), jnp.where(new, 0.0, d.weight)))
    return out


def scale(diag: Diagonal, a: jax.Array, g: jax.Array) -> jax.Array:
    """The diagonal ``S / w``, or K-FAC's ``a g^T`` before any statistics in
    the current basis."""
    kfac = jnp.maximum(a, 0.0)[:, None] * jnp.maximum(g, 0.0)[None, :]
    return jnp.where(diag.weight > 0, F.estimate_one(diag.average, diag.weight), kfac)


def ekfac_probes(probes, opt_state, input_groups=None):
    """``probes`` with each registered layer's current Kronecker eigenbases,
    so that the statistics they capture carry EKFAC's diagonal.

    Args:
      probes: the model's probe tree (:class:`~kfac_jax_peft.LayerStats`
        leaves, e.g. the ``"kfac"`` collection).
      opt_state: an optimizer state holding the :class:`KFACState` of a
        ``kfac_precondition(damping_mode="ekfac")``.
      input_groups: the ``input_groups`` given to ``kfac_precondition``.

    Returns:
      The probes, the ``ekfac`` field of every registered layer's probe set
      to ``EKFACProbe(Q_A, Q_G, zeros)`` (stacked like the probe for an
      ``nn.scan`` stack); probes of unregistered layers unchanged. Pure:
      call it inside the jitted step. (With :func:`~kfac_jax_peft.multi_steps`,
      give it probes of this structure, e.g. ``ekfac_probes(probes,
      inner.init(params))``: its accumulator takes their shapes.)
    """
    from kfac_jax_peft.kfac.transform import kfac_state

    st = kfac_state(opt_state)
    if st is None:
        raise ValueError("ekfac_probes: no K-FAC state in the optimizer state")
    if not all(ls.diag is not None for ls in st.layers.values()):
        raise ValueError("ekfac_probes: the K-FAC state is not damping_mode='ekfac'")
    groups = group_fn(input_groups)

    def basis(name: str):
        a_key = f"{name}/A"
        if a_key not in st.factors:
            a_key = groups(name)
            if a_key not in st.factors:
                raise ValueError(f"ekfac_probes: layer {name!r} has no input factor in the "
                                 "state; pass the input_groups given to kfac_precondition")
        return st.factors[a_key].eigen.q, st.factors[f"{name}/G"].eigen.q

    def put(path, probe):
        kernel = path_str(path)
        if not isinstance(probe, LayerStats):
            return probe
        stack = probe.A.shape[:-2]
        if not stack:
            if kernel not in st.layers:
                return probe
            qa, qg = basis(kernel)
        else:
            names = [f"{kernel}[{i}]" for i in range(math.prod(stack))]
            if names[0] not in st.layers:
                return probe
            qs = [basis(n) for n in names]
            qa = jnp.stack([q[0] for q in qs]).reshape(stack + qs[0][0].shape)
            qg = jnp.stack([q[1] for q in qs]).reshape(stack + qs[0][1].shape)
        dtype = probe.A.dtype
        diag = jnp.zeros(stack + (probe.A.shape[-1], probe.G.shape[-1]), dtype)
        return probe._replace(ekfac=EKFACProbe(qa.astype(dtype), qg.astype(dtype), diag))

    return jax.tree_util.tree_map_with_path(put, probes,
                                            is_leaf=lambda x: isinstance(x, LayerStats))
