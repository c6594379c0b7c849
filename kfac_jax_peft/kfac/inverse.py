"""Curvature inversion and the preconditioned direction of one layer.

For a layer with (bias-corrected) factors ``A`` (``[d_a, d_a]``) and ``G``
(``[d_g, d_g]``) and a gradient ``V`` in the kernel's ``[d_a, d_g]`` layout
(a bias gradient appended as the last row), the Fisher block is
``A kron G`` acting on ``vec(V)`` (row-major), i.e. ``V -> A V G``.

Two damping modes:

``exact``
    ``u = (A kron G + lambda I)^-1 vec(V)``, computed in the Kronecker
    eigenbasis: with ``A = Q_A diag(a) Q_A^T`` and ``G = Q_G diag(g) Q_G^T``,
    ``U = Q_A [(Q_A^T V Q_G) / (a g^T + lambda)] Q_G^T``. The inversion
    stores eigenvectors and eigenvalues only, so ``lambda`` may change every
    step (a schedule) without a new decomposition. Negative eigenvalues from
    round-off are stored as computed (so that ``Q diag(a) Q^T`` is the
    factor itself) and clipped to zero where the direction is computed.

``ekfac``
    George et al.'s eigenvalue-corrected K-FAC: the same eigenbasis, with
    the Kronecker eigenvalue products ``a g^T`` replaced by a re-estimated
    diagonal ``s`` (``[d_a, d_g]``, the second moments of the gradients
    projected into the basis; see :mod:`kfac_jax_peft.kfac.ekfac`):
    ``U = Q_A [(Q_A^T V Q_G) / (s + lambda)] Q_G^T``.

``factored``
    Martens and Grosse's pi-adjusted factored Tikhonov damping:
    ``u = (A + pi sqrt(lambda) I)^-1 V (G + sqrt(lambda)/pi I)^-1`` with
    ``pi = sqrt((tr(A) / d_a) / (tr(G) / d_g))``; ``pi = 1`` when either
    trace is zero (LoRA's zero-initialised ``B`` makes ``G`` of the ``A``
    projection vanish at the start, where kfac-jax produces NaN). The two
    inverses are computed by Cholesky (``cholesky``; or ``cholesky_solve``,
    which keeps only the Cholesky factors and solves at every step), by
    ``eigh``, or by Newton-Schulz
    iterations ``X <- X (2 I - M X)`` warm-started from the previous inverse,
    matmul-only, falling back to Cholesky when the warm start is too far off
    (see :func:`newton_schulz`).

Damping scale. ``damping_scale="absolute"`` reads ``lambda`` as it is;
``"relative"`` multiplies it, layer by layer, by the mean eigenvalue of the
layer's block, ``s = tr(A kron G) / (d_a d_g) = (tr A / d_a)(tr G / d_g)``
(:func:`relative_scale`), so that the damped block is ``A kron G + lambda s
I``: one value means the same thing in every layer, at every width, batch
size and Fisher type, and the direction is unchanged when the loss is
multiplied by a constant. A relative ``lambda`` maps to the absolute value
``lambda s`` of each layer. With ``factored`` damping the pi-adjusted pair
becomes ``(A + sqrt(lambda) (tr A / d_a) I) kron (G + sqrt(lambda) (tr G /
d_g) I)``. Where a trace is zero or not finite (LoRA's zero ``B`` at the
start), ``s = 1``: the value is read as absolute for that layer.

Matrices of equal size are stacked and inverted in one batched call; with
``spread`` (the axes of the device mesh the step is traced under) each
device inverts its share of every stack (:mod:`kfac_jax_peft.kfac.spread`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

HP = jax.lax.Precision.HIGHEST

DAMPING_MODES = ("exact", "ekfac", "factored")
DAMPING_SCALES = ("absolute", "relative")
INVERSE_METHODS = ("cholesky", "cholesky_solve", "eigh", "newton_schulz")


class Eigen(NamedTuple):
    """Eigendecompositions of both factors (``exact`` damping)."""

    qa: jnp.ndarray
    a: jnp.ndarray
    qg: jnp.ndarray
    g: jnp.ndarray


class EigenFactor(NamedTuple):
    """Eigendecomposition ``M = q diag(vals) q^T`` of one factor (``exact``
    damping): an input factor shared by several layers keeps its half of
    :class:`Eigen` here once."""

    q: jnp.ndarray
    vals: jnp.ndarray


class EigenCorrected(NamedTuple):
    """EKFAC's curvature of one layer: the Kronecker eigenbases and the
    diagonal ``scale`` (``[d_a, d_g]``) that replaces ``a g^T``."""

    qa: jnp.ndarray
    qg: jnp.ndarray
    scale: jnp.ndarray


class Inverses(NamedTuple):
    """Damped factor inverses (``factored`` damping)."""

    a_inv: jnp.ndarray
    g_inv: jnp.ndarray


class CholeskyFactors(NamedTuple):
    """Lower Cholesky factors of the damped factors (``cholesky_solve``):
    the inversion is one factorisation, each step two pairs of triangular
    solves with as many right-hand sides as the LoRA rank."""

    la: jnp.ndarray
    lg: jnp.ndarray


def zeros_eigen_factor(d: int, dtype) -> EigenFactor:
    return EigenFactor(jnp.eye(d, dtype=dtype), jnp.zeros((d,), dtype))


def zeros_curvature(d_a: int, d_g: int, mode: str, dtype, method: str = "cholesky",
                    store_a: bool = True):
    """The curvature before any inversion; ``store_a=False`` (``exact`` mode
    only) leaves out the input factor's half (``qa = a = None``)."""
    if mode == "exact":
        qa, a = zeros_eigen_factor(d_a, dtype) if store_a else (None, None)
        return Eigen(qa, a, *zeros_eigen_factor(d_g, dtype))
    if method == "cholesky_solve":
        return CholeskyFactors(jnp.eye(d_a, dtype=dtype), jnp.eye(d_g, dtype=dtype))
    return Inverses(jnp.eye(d_a, dtype=dtype), jnp.eye(d_g, dtype=dtype))


def pi_adjustment(A: jnp.ndarray, G: jnp.ndarray) -> jnp.ndarray:
    """``sqrt((tr A / d_a) / (tr G / d_g))``, or 1 where a trace vanishes."""
    ta = jnp.trace(A) / A.shape[0]
    tg = jnp.trace(G) / G.shape[0]
    tiny = jnp.finfo(A.dtype).tiny
    ok = (ta > tiny) & (tg > tiny) & jnp.isfinite(ta) & jnp.isfinite(tg)
    return jnp.where(ok, jnp.sqrt(jnp.where(ok, ta / jnp.where(ok, tg, 1.0), 1.0)), 1.0)


def _scale_or_one(ta, tg):
    tiny = jnp.finfo(ta.dtype).tiny
    ok = (ta > tiny) & (tg > tiny) & jnp.isfinite(ta * tg) & (ta * tg > tiny)
    return jnp.where(ok, ta * tg, 1.0)


def relative_scale(A: jnp.ndarray, G: jnp.ndarray) -> jnp.ndarray:
    """``(tr A / d_a)(tr G / d_g)``, the mean eigenvalue of ``A kron G``
    (1 where it is zero or not finite): what ``damping_scale="relative"``
    multiplies the damping by."""
    return _scale_or_one(jnp.trace(A) / A.shape[0], jnp.trace(G) / G.shape[0])


def relative_scale_eigen(curv) -> jnp.ndarray:
    """:func:`relative_scale` from the stored eigenvalues (round-off
    negatives clipped to zero, as where the direction is computed); for
    EKFAC's :class:`EigenCorrected`, the mean of its corrected diagonal (the
    mean eigenvalue of its block, as for K-FAC)."""
    if isinstance(curv, EigenCorrected):
        mean = jnp.mean(jnp.maximum(curv.scale, 0.0))
        return jnp.where(jnp.isfinite(mean) & (mean > 0), mean, 1.0)
    return _scale_or_one(jnp.mean(jnp.maximum(curv.a, 0.0)),
                         jnp.mean(jnp.maximum(curv.g, 0.0)))


def _over_batch(fn: Callable, stack: jnp.ndarray):
    """``fn`` on a stack of matrices: one batched call, except on CPU.

    jaxlib's CPU LAPACK kernels spread a batch over a thread pool and wait
    for it inside the XLA program; in a program that also keeps XLA's own
    threads busy (a model's backward pass, collectives) that wait was seen to
    never return (jax 0.10.2). On CPU the stack is therefore walked by
    ``lax.map``, one unbatched LAPACK call per matrix.
    """
    if jax.default_backend() == "cpu":
        return jax.lax.map(fn, stack)
    return fn(stack)


def _grouped(mats: Sequence[jnp.ndarray], fn: Callable, spread: tuple[str, ...] | None = None
             ) -> list:
    """Apply ``fn`` to matrices grouped by shape; results in order.

    With ``spread`` (mesh axes) each shape's stack is split over the devices
    of those axes (:func:`kfac_jax_peft.kfac.spread.map_spread`).

    On accelerators each group is one batched call on the stacked matrices.
    On CPU, where LAPACK is called once per matrix anyway (see
    :func:`_over_batch`), each matrix is passed on its own: no stacked copy
    of the inputs and of the results is made, so the workspace is that of one
    matrix at a time rather than two copies of all of them.
    """
    if spread:
        from kfac_jax_peft.kfac.spread import map_spread

        return map_spread(fn, mats, _over_batch, spread)
    if jax.default_backend() == "cpu":
        return [fn(m) for m in mats]
    groups: dict = {}
    for i, m in enumerate(mats):
        groups.setdefault(m.shape, []).append(i)
    out: list = [None] * len(mats)
    for idx in groups.values():
        res = _over_batch(fn, jnp.stack([mats[i] for i in idx]))
        for j, i in enumerate(idx):
            out[i] = jax.tree_util.tree_map(lambda r, j=j: r[j], res)
    return out


def _sym(m):
    return 0.5 * (m + jnp.swapaxes(m, -1, -2))


def batched_eigh(mats: jnp.ndarray):
    vals, vecs = jnp.linalg.eigh(_sym(mats))
    return vecs, vals


def eigen_factors(mats: Sequence[jnp.ndarray], spread: tuple[str, ...] | None = None) -> list:
    """:class:`EigenFactor` of each matrix (eigenvalues as computed, unclipped);
    ``spread``: see :func:`_grouped`."""
    return [EigenFactor(*d) for d in _grouped(mats, batched_eigh, spread)]


def batched_cholesky(mats: jnp.ndarray) -> jnp.ndarray:
    return jnp.linalg.cholesky(_sym(mats))


def batched_cholesky_inverse(mats: jnp.ndarray) -> jnp.ndarray:
    """``M^-1 = L^-T L^-1``: one triangular solve and one matmul (measured
    half the time of ``cho_solve`` against the identity on CPU)."""
    eye = jnp.broadcast_to(jnp.eye(mats.shape[-1], dtype=mats.dtype), mats.shape)
    l_inv = jax.scipy.linalg.solve_triangular(batched_cholesky(mats), eye, lower=True)
    return jnp.matmul(jnp.swapaxes(l_inv, -1, -2), l_inv, precision=HP)


def batched_eigh_inverse(mats: jnp.ndarray) -> jnp.ndarray:
    vals, vecs = jnp.linalg.eigh(_sym(mats))
    return jnp.einsum("...ij,...j,...kj->...ik", vecs, 1.0 / vals, vecs, precision=HP)


def newton_schulz(mats: jnp.ndarray, x0: jnp.ndarray, iterations: int, tolerance: float):
    """Refine ``x0 ~= mats^-1`` by Newton-Schulz; Cholesky where it would fail.

    Each iteration is ``R = I - M X; X <- X + X R`` (two matmuls), which
    squares the residual: from ``r0 = ||I - M x0||_F / sqrt(d)`` the result
    has residual about ``r0 ** (2 ** iterations)``. When that bound exceeds
    ``tolerance`` for any matrix of the stack (or ``r0 >= 1``, where the
    iteration diverges), the whole stack is inverted by Cholesky instead.
    """
    d = mats.shape[-1]
    eye = jnp.eye(d, dtype=mats.dtype)
    r = eye - jnp.matmul(mats, x0, precision=HP)
    r0 = jnp.max(jnp.sqrt(jnp.sum(r * r, axis=(-1, -2)) / d))
    ok = (r0 < 1.0) & (r0 ** (2**iterations) <= tolerance)

    def refine(r):
        x = x0 + jnp.matmul(x0, r, precision=HP)
        for _ in range(iterations - 1):
            x = x + jnp.matmul(x, eye - jnp.matmul(mats, x, precision=HP), precision=HP)
        return _sym(x)

    return jax.lax.cond(ok, refine, lambda _: _over_batch(batched_cholesky_inverse, mats), r)


def invert(factors: Sequence[tuple], previous: Sequence, mode: str, method: str,
           damping, ns_iterations: int = 1, ns_tolerance: float = 1e-3,
           spread: tuple[str, ...] | None = None) -> list:
    """New curvature representations for a list of ``(A, G)`` factor pairs.

    ``previous`` holds the current representations (the warm start of the
    Newton-Schulz method); ``damping`` is used only by ``factored`` mode: one
    value for every pair, or a sequence with one value per pair; ``spread``
    (mesh axes; not with Newton-Schulz, whose fall-back is decided for a
    whole stack) splits the work over the devices.
    """
    if mode == "exact":
        dec = eigen_factors([m for ag in factors for m in ag], spread)
        return [Eigen(*dec[2 * i], *dec[2 * i + 1]) for i in range(len(factors))]
    damped = []
    per_pair = isinstance(damping, list | tuple)
    for i, (A, G) in enumerate(factors):
        pi = pi_adjustment(A, G)
        sd = jnp.sqrt(jnp.asarray(damping[i] if per_pair else damping, A.dtype))
        damped.append(A + pi * sd * jnp.eye(A.shape[0], dtype=A.dtype))
        damped.append(G + sd / pi * jnp.eye(G.shape[0], dtype=G.dtype))
    if method == "cholesky_solve":
        ch = _grouped(damped, batched_cholesky, spread)
        return [CholeskyFactors(ch[2 * i], ch[2 * i + 1]) for i in range(len(factors))]
    if method == "cholesky":
        inv = _grouped(damped, batched_cholesky_inverse, spread)
    elif method == "eigh":
        inv = _grouped(damped, batched_eigh_inverse, spread)
    else:
        if spread:
            raise ValueError("inverse_method='newton_schulz' is not spread over devices "
                             "(matmul-only; its Cholesky fall-back is decided per stack)")
        prev = [m for p in previous for m in p]
        pairs = list(zip(damped, prev))
        groups: dict = {}
        for i, (m, _) in enumerate(pairs):
            groups.setdefault(m.shape, []).append(i)
        inv = [None] * len(pairs)
        for idx in groups.values():
            res = newton_schulz(jnp.stack([pairs[i][0] for i in idx]),
                                jnp.stack([pairs[i][1] for i in idx]),
                                ns_iterations, ns_tolerance)
            for j, i in enumerate(idx):
                inv[i] = res[j]
    return [Inverses(inv[2 * i], inv[2 * i + 1]) for i in range(len(factors))]


def precondition(v: jnp.ndarray, curv, damping) -> jnp.ndarray:
    """The preconditioned ``[d_a, d_g]`` direction (see the module doc)."""
    v = v.astype(curv[0].dtype)
    if isinstance(curv, Eigen):
        t = jnp.matmul(jnp.matmul(curv.qa.T, v, precision=HP), curv.qg, precision=HP)
        a, g = jnp.maximum(curv.a, 0.0), jnp.maximum(curv.g, 0.0)  # round-off negatives
        t = t / (a[:, None] * g[None, :] + damping)
        return jnp.matmul(jnp.matmul(curv.qa, t, precision=HP), curv.qg.T, precision=HP)
    if isinstance(curv, EigenCorrected):
        t = jnp.matmul(jnp.matmul(curv.qa.T, v, precision=HP), curv.qg, precision=HP)
        t = t / (jnp.maximum(curv.scale, 0.0) + damping)
        return jnp.matmul(jnp.matmul(curv.qa, t, precision=HP), curv.qg.T, precision=HP)
    if isinstance(curv, CholeskyFactors):
        u = jax.scipy.linalg.cho_solve((curv.la, True), v)
        return jax.scipy.linalg.cho_solve((curv.lg, True), u.T).T
    return jnp.matmul(jnp.matmul(curv.a_inv, v, precision=HP), curv.g_inv, precision=HP)


def is_finite(curv) -> jnp.ndarray:
    """Whether every stored array of ``curv`` is finite (``None`` fields skipped)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in curv if x is not None]))
