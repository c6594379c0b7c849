r"""Influence functions of training examples on test predictions, for PEFT parameters.

The influence of a training example ``z`` on a test example ``z'`` is
(Koh & Liang 2017, with a damped curvature)::

    I(z', z) = grad l(z')^T (H + lambda I)^-1 grad l(z)

for the per-example losses ``l`` at the trained parameters. Up-weighting
``z`` by ``eps`` changes the test loss by about ``-eps I(z', z)``: a
positive score marks a *helpful* example (it lowered the test loss), a
negative one a *harmful* example.

``H`` is a curvature of the training loss, here the empirical Fisher
``(1/n) sum_i g_i g_i^T`` over the training examples (the Gauss-Newton /
Fisher family is what K-FAC approximates; the Hessian of a fine-tuned model
need not be positive definite). It is taken block-diagonal over the
registered dense layers (kernel and bias together, in the ``[d_a, d_g]``
layout of :mod:`kfac_jax_peft.kfac.inverse`), each block by one of:

``"kfac"``
    ``A kron G`` from the factors of a K-FAC state (the run's optimizer
    state): ``(A kron G + lambda I)^-1`` in the Kronecker eigenbasis.
``"ekfac"``
    the same eigenbasis with the diagonal re-fitted to the per-example
    gradients of the training set, ``s = (1/n) sum_i (Q_A^T G_i Q_G)^2``
    (George et al. 2018; as in Grosse et al. 2023's influence functions):
    ``Q [(Q^T v) / (s + lambda)]``.
``"datainf"``
    Kwon et al. (2023): the inverse of the average of rank-one matrices
    replaced by the average of their inverses (Sherman-Morrison),
    ``(G_l + lambda I)^-1 ~= (1/lambda) [I - (1/n) sum_i g_i g_i^T /
    (lambda + ||g_i||^2)]`` per layer ``l``, with no factor at all: exact
    when the training gradients of a layer are orthogonal or alike. (The
    paper sets a damping per layer, ``0.1`` times the mean of
    ``||g_i||^2 / d_l``; here every method takes the same ``lambda``, so
    that they approximate one matrix.)
``"exact"``
    the dense ``(H + lambda I)^-1`` over all the layers' parameters (one
    ``P x P`` matrix: for small models and for checking the others).

Parameters outside the registered layers (for example a LayerNorm scale
trained with an adapter) are not scored; :class:`Influence` lists them.

The computation never loops over examples in Python: per-example gradients
come from ``jax.vmap(jax.grad(loss_fn))`` on batches, jitted; the test
gradients are preconditioned once, and each training batch is then scored
against all test examples by one contraction. EKFAC, DataInf and the exact
matrix take one extra pass over the training batches (to fit ``s``, the
DataInf sums, or ``H``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kfac_jax_peft import _hyper
from kfac_jax_peft.kfac import factors as F
from kfac_jax_peft.kfac import inverse as I
from kfac_jax_peft.kfac.layers import default_layer_filter, flatten, group_fn, register
from kfac_jax_peft.kfac.transform import kfac_state

METHODS = ("kfac", "ekfac", "datainf", "exact")
HP = jax.lax.Precision.HIGHEST


class Influence(NamedTuple):
    """Scores of every training example against every test example.

    Attributes:
      scores: ``[num_test, num_train]`` float64, ``I(test, train)``.
      layers: the layers (kernel paths) whose parameters are scored.
      left_out: trainable leaves outside those layers (not scored).
    """

    scores: np.ndarray
    layers: tuple[str, ...]
    left_out: tuple[str, ...]


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(helpful, harmful)``: per test example (row), the indices of the
    ``k`` largest scores (in decreasing order) and of the ``k`` smallest (in
    increasing order)."""
    k = min(int(_hyper.check_positive_int("top_k", k)), scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, :k], order[:, ::-1][:, :k]


def example_gradients(loss_fn: Callable, num_args: int = 0) -> Callable:
    """``(params, batch, *args) -> grads``, every leaf with the batch axis in
    front: ``jax.vmap(jax.grad(loss_fn))`` over the leading axis of every
    leaf of ``batch``, with ``loss_fn(params, example, *args) -> scalar`` the
    loss of one example (its leaves without the batch axis) and ``num_args``
    arguments shared by all examples (e.g. frozen weights: passed, not baked
    into the program as constants). Jitted."""
    return jax.jit(jax.vmap(jax.grad(loss_fn), in_axes=(None, 0) + (None,) * num_args))


def _blocks(grads, specs: Mapping) -> dict[str, jax.Array]:
    """``{layer: [B, d_a, d_g]}`` from per-example gradients (bias last row)."""
    flat = flatten(grads)
    out = {}
    for name, spec in specs.items():
        def one(w, b, spec=spec):
            v = w.reshape(-1, spec.d_g)
            return v if b is None else jnp.concatenate([v, b.reshape(1, -1)], 0)

        w, b = flat[spec.kernel], None if spec.bias is None else flat[spec.bias]
        if spec.index is not None:  # a stack: the batch axis leads
            w = w[(slice(None),) + spec.index]
            b = None if b is None else b[(slice(None),) + spec.index]
        out[name] = jax.vmap(one)(w, b).astype(jnp.float32)
    return out


def _kfac_eigen(state, specs: Mapping) -> dict[str, I.Eigen]:
    """The Kronecker eigendecompositions of each layer's factor estimates."""
    def eig(key, name):
        f = state.factors.get(key)
        if f is None:
            raise ValueError(f"influence: layer {name!r} has no K-FAC factor {key!r} in the "
                             "optimizer state (was it registered by the run's optimizer?)")
        if f.average is None:
            return f.eigen.q, f.eigen.vals
        q, vals = I.eigen_factors([F.estimate_one(f.average, f.weight)])[0]
        return q, vals

    out = {}
    for name, spec in specs.items():
        fs = [state.factors.get(k) for k in (spec.a_key, spec.g_key)]
        if any(f is not None and float(f.weight) <= 0 for f in fs):
            raise ValueError(f"influence: the K-FAC factors of layer {name!r} have no "
                             "statistics yet (weight 0)")
        out[name] = I.Eigen(*eig(spec.a_key, name), *eig(spec.g_key, name))
    return out


def _score(u: Mapping[str, jax.Array], g: Mapping[str, jax.Array]) -> jax.Array:
    """``[T, B]``: sum over layers of ``<u_t, g_b>``."""
    return sum(jnp.einsum("tij,bij->tb", u[k], g[k], precision=HP) for k in u)


def influence(loss_fn: Callable, params, train_batches: Iterable, test_batch, *,
              method: str = "ekfac", damping: float = 1e-3, opt_state: Any = None,
              layer_filter: Callable | None = None, input_groups=None,
              valid: Callable | None = None, loss_args: Sequence = ()) -> Influence:
    """``I(test, train)`` for every test example of ``test_batch`` and every
    training example of ``train_batches`` (see the module doc).

    Args:
      loss_fn: ``(params, example, *loss_args) -> scalar``, the loss of one
        example.
      params: the trained parameters (the PEFT tree the optimizer saw).
      train_batches: a sequence of batches (leaves with a leading batch axis);
        read once for ``kfac`` and twice for the other methods.
      test_batch: one batch of test examples.
      method: ``"kfac"``, ``"ekfac"``, ``"datainf"`` or ``"exact"``.
      damping: ``lambda > 0``, added to every block.
      opt_state: an optimizer state holding the run's :class:`KFACState`
        (``kfac`` and ``ekfac``: the factors and their eigenbases).
      layer_filter, input_groups: as given to ``kfac_precondition``
        (``None``: every 2-D floating ``kernel``, no shared factor).
      valid: ``batch -> [B]`` 1 for real rows and 0 for filler rows (which
        then enter no fitted curvature; their scores are computed and should
        be dropped). ``None``: every row is real.
      loss_args: further arguments of ``loss_fn``, the same for every example.

    Returns:
      :class:`Influence` with scores ``[num_test, num_train]`` (training
      examples in the order of the batches, filler rows included).
    """
    _hyper.check_choice("method", method, METHODS)
    damping = float(_hyper.check_scalar("damping", damping, low=0.0, low_open=True,
                                        schedule=False))
    train_batches = list(train_batches)
    if not train_batches:
        raise ValueError("influence: no training batch")
    specs = register(params, layer_filter or default_layer_filter, group_fn(input_groups))
    if not specs:
        raise ValueError("influence: no registered layer among the parameters (layer_filter)")
    covered = {p for s in specs.values() for p in (s.kernel, s.bias) if p is not None}
    left_out = tuple(sorted(set(flatten(params)) - covered))
    grads_fn = example_gradients(loss_fn, len(loss_args))

    def blocks(batch):
        return _blocks(grads_fn(params, batch, *loss_args), specs)

    def weights(batch):
        n = len(jax.tree_util.tree_leaves(batch)[0])
        return jnp.ones((n,), jnp.float32) if valid is None else jnp.asarray(valid(batch),
                                                                                jnp.float32)

    v = blocks(test_batch)
    if method in ("kfac", "ekfac"):
        st = kfac_state(opt_state)
        if st is None:
            raise ValueError(f"influence: method {method!r} needs opt_state holding the run's "
                             "K-FAC state")
        eig = _kfac_eigen(st, specs)
        if method == "kfac":
            u = {k: jax.vmap(lambda x, e=eig[k]: I.precondition(x, e, damping))(v[k]) for k in v}
        else:
            u = _ekfac_precondition(v, eig, (blocks(b) for b in train_batches),
                                    (weights(b) for b in train_batches), damping)
    elif method == "datainf":
        u = _datainf_precondition(v, (blocks(b) for b in train_batches),
                                  (weights(b) for b in train_batches), damping)
    else:
        u = _exact_precondition(v, (blocks(b) for b in train_batches),
                                (weights(b) for b in train_batches), damping)
    score = jax.jit(_score)
    scores = np.concatenate([np.asarray(score(u, blocks(b)), np.float64)
                             for b in train_batches], axis=1)
    return Influence(scores, tuple(sorted(specs)), left_out)


def _ekfac_precondition(v, eig, train_blocks, train_weights, damping):
    """Fit ``s = (1/n) sum_i (Q_A^T G_i Q_G)^2``, then precondition ``v``."""
    @jax.jit
    def fit(g, w):
        return {k: jnp.einsum("b,bij->ij", w, jnp.square(
            jnp.einsum("ai,nab,bj->nij", eig[k].qa, g[k], eig[k].qg, precision=HP)),
            precision=HP) for k in g}

    total, n = _summed(fit, train_blocks, train_weights)
    return {k: jax.vmap(lambda x, k=k: I.precondition(
        x, I.EigenCorrected(eig[k].qa, eig[k].qg, total[k] / n), damping))(v[k]) for k in v}


def _summed(fit, train_blocks, train_weights) -> tuple[dict, float]:
    """``(sum over the training batches of fit(g, w), number of real rows)``;
    an error if no row is real."""
    total, n = None, 0.0
    for g, w in zip(train_blocks, train_weights):
        part = fit(g, w)
        total = part if total is None else jax.tree_util.tree_map(jnp.add, total, part)
        n += float(jnp.sum(w))
    if n <= 0:
        raise ValueError("influence: no real training example (all rows filler)")
    return total, n


def _datainf_precondition(v, train_blocks, train_weights, damping):
    """``u_l = (1/lambda) [v_l - (1/n) sum_i c_il g_il]``, ``c_il = <v_l, g_il> /
    (lambda + ||g_il||^2)`` (Kwon et al. 2023, per layer ``l``)."""
    @jax.jit
    def fit(g, w):
        out = {}
        for k in g:
            c = jnp.einsum("tij,bij->tb", v[k], g[k], precision=HP)
            c = c * w[None] / (damping + jnp.sum(jnp.square(g[k]), (1, 2)))[None]
            out[k] = jnp.einsum("tb,bij->tij", c, g[k], precision=HP)
        return out

    total, n = _summed(fit, train_blocks, train_weights)
    return {k: (v[k] - total[k] / n) / damping for k in v}


def _exact_precondition(v, train_blocks, train_weights, damping):
    """``(H + lambda I)^-1 v`` with the dense empirical Fisher ``H`` of all layers."""
    keys = sorted(v)

    def flat(blocks):
        return jnp.concatenate([blocks[k].reshape(blocks[k].shape[0], -1) for k in keys], 1)

    h, n = None, 0.0
    for g, w in zip(train_blocks, train_weights):
        gf = flat(g).astype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
        part = jnp.einsum("b,bp,bq->pq", w.astype(gf.dtype), gf, gf, precision=HP)
        h = part if h is None else h + part
        n += float(jnp.sum(w))
    if n <= 0:
        raise ValueError("influence: no real training example (all rows filler)")
    vf = flat(v).astype(h.dtype)
    u = jnp.linalg.solve(h / n + damping * jnp.eye(h.shape[0], dtype=h.dtype), vf.T).T
    out, at = {}, 0
    for k in keys:
        size = int(np.prod(v[k].shape[1:]))
        out[k] = u[:, at:at + size].reshape(v[k].shape).astype(jnp.float32)
        at += size
    return out


def batches_of(tree, batch_size: int) -> Sequence:
    """A pytree of arrays with a leading example axis cut into batches of
    ``batch_size`` rows (the last may be shorter)."""
    n = len(jax.tree_util.tree_leaves(tree)[0])
    return [jax.tree_util.tree_map(lambda x, s=s: x[s:s + batch_size], tree)
            for s in range(0, n, batch_size)]
