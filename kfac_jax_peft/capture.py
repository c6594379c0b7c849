"""Capture of K-FAC statistics in the pass that computes the gradient.

A dense layer ``y = x @ W + b`` (``W`` of shape ``[d_in, d_out]``, Flax's
convention) is given a *probe*: a :class:`LayerStats` of zeros that enters
the forward computation through an identity with a custom VJP. The probe
does not change ``y``; its cotangent, computed by the same backward pass
that produces the parameter gradients, is defined to be the layer's reduced
statistics::

    A = sum_t m_t abar_t abar_t^T              abar_t = [a_t, 1] with a bias
    G = N^2 sum_t m_t g_t g_t^T                g_t = dL/dy_t
    num_tokens   = sum_t m_t
    num_examples = N = number of leading-axis rows with a real token

where ``m_t`` is the explicit token mask (1 for real tokens, 0 for padding).
The factor ``N^2`` undoes the ``1/N`` of a loss that is a mean over the
``N`` examples of the batch, so that ``G / N`` is the average over examples
of the outer products of per-example output gradients, the Kronecker factor
of the (empirical or sampled) Fisher. The normalised factors used by
:func:`kfac_jax_peft.kfac_precondition` are::

    A_hat = A / num_tokens        G_hat = G / num_examples

which is K-FAC "expand" for sequences (tokens treated as examples that
share weights): ``F ~= A_hat kron G_hat`` for ``vec`` in row-major order of
``W``'s ``[d_in, d_out]`` layout. Statistics are returned as raw sums and
counts, so that data-parallel devices can ``psum`` them before normalising
(exact even when devices hold different numbers of padded tokens).

**Assumption.** The loss is a mean over the examples of the batch, i.e.
over the rows of the leading axis of every captured input that hold at
least one real token. If your loss is a sum, or a mean over something
else, the factor ``G`` is off by a constant, which acts as a rescaling of
the damping and of the step.

The probe's statistics are computed in float32 (float64 if the probe is
float64), whatever the activation dtype.

**EKFAC.** A probe whose ``ekfac`` field holds the layer's Kronecker
eigenbases ``Q_A``, ``Q_G`` (see :func:`kfac_jax_peft.ekfac_probes`) also
returns, in ``ekfac.diag``, the squared gradients projected into that basis::

    diag = N^2 sum_t m_t (Q_A^T abar_t)^2 ((Q_G^T g_t)^2)^T        [d_a, d_g]

(squares elementwise), so that ``diag / num_examples`` is the diagonal, in
the basis ``Q_A kron Q_G``, of the Fisher that K-FAC "expand" approximates
(tokens as examples; for an input without a token axis, one row per example,
it is the empirical Fisher's diagonal). It costs two projections and one
``[d_a, d_g]`` matmul per layer, like ``A`` and ``G``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from kfac_jax_peft.likelihoods import FISHER_TYPES, check_likelihood, sample_cotangents

Array = jax.Array


class EKFACProbe(NamedTuple):
    """The EKFAC part of a probe (see the module doc). In the probe, ``qa``
    (``[d_a, d_a]``) and ``qg`` (``[d_g, d_g]``) are the eigenbases and
    ``diag`` is zeros; in the statistics (the probe's cotangent) ``qa`` and
    ``qg`` are zeros and ``diag`` holds the projected squared gradients."""

    qa: Array
    qg: Array
    diag: Array


class LayerStats(NamedTuple):
    """Reduced K-FAC statistics of one dense layer (raw sums, see module doc).

    Attributes:
      A: ``[d_in (+1), d_in (+1)]`` sum of masked input outer products; the
        extra row/column is the bias's homogeneous coordinate.
      G: ``[d_out, d_out]`` sum of masked output-gradient outer products,
        scaled by ``num_examples ** 2``.
      num_tokens: number of real tokens summed into ``A`` and ``G``.
      num_examples: number of examples (leading-axis rows with a real token).
      ekfac: ``None``, or the :class:`EKFACProbe` of EKFAC's diagonal.
    """

    A: Array
    G: Array
    num_tokens: Array
    num_examples: Array
    ekfac: EKFACProbe | None = None


def zeros_stats(d_in: int, d_out: int, use_bias: bool, dtype=jnp.float32) -> LayerStats:
    """A probe of zeros for a ``[d_in, d_out]`` layer (``+1`` row for a bias)."""
    da = d_in + int(use_bias)
    return LayerStats(
        A=jnp.zeros((da, da), dtype),
        G=jnp.zeros((d_out, d_out), dtype),
        num_tokens=jnp.zeros((), dtype),
        num_examples=jnp.zeros((), dtype),
    )


def layer_stats(x: Array, g: Array, mask: Array | None, use_bias: bool,
                dtype=jnp.float32, basis: tuple[Array, Array] | None = None) -> LayerStats:
    """Reduced statistics from inputs ``x [..., d_in]`` and output cotangents
    ``g [..., d_out]`` of the same leading shape, with an optional token mask
    of that leading shape. With ``basis = (Q_A, Q_G)`` the statistics also
    carry EKFAC's projected squares (module doc). Public so that other
    capture schemes (and tests) share one definition."""
    lead = x.shape[:-1]
    if g.shape[:-1] != lead:
        raise ValueError(f"inputs {x.shape} and output cotangents {g.shape} "
                         "disagree in their leading (batch, token) shape")
    if mask is None:
        m = jnp.ones(lead, dtype)
    else:
        if mask.shape != lead:
            raise ValueError(f"mask of shape {mask.shape} does not match the "
                             f"leading shape {lead} of the layer input")
        m = mask.astype(dtype)
    xf = x.reshape(-1, x.shape[-1]).astype(dtype)
    gf = g.reshape(-1, g.shape[-1]).astype(dtype)
    mf = m.reshape(-1)
    if use_bias:
        xf = jnp.concatenate([xf, jnp.ones((xf.shape[0], 1), dtype)], axis=1)
    hp = jax.lax.Precision.HIGHEST
    A = jnp.matmul((xf * mf[:, None]).T, xf, precision=hp)
    G = jnp.matmul((gf * mf[:, None]).T, gf, precision=hp)
    if len(lead) >= 2:
        rows = jnp.max(m.reshape(lead[0], -1), axis=1)
        n_ex = jnp.sum((rows > 0).astype(dtype))
    else:
        n_ex = jnp.sum(m)
    ekfac = None
    if basis is not None:
        qa, qg = (q.astype(dtype) for q in basis)
        pa = jnp.square(jnp.matmul(xf, qa, precision=hp))  # (Q_A^T abar_t)^2, row t
        pg = jnp.square(jnp.matmul(gf, qg, precision=hp))
        diag = jnp.matmul((pa * mf[:, None]).T, pg, precision=hp) * n_ex**2
        ekfac = EKFACProbe(jnp.zeros_like(qa), jnp.zeros_like(qg), diag)
    return LayerStats(A=A, G=G * n_ex**2, num_tokens=jnp.sum(mf), num_examples=n_ex,
                      ekfac=ekfac)


@jax.custom_vjp
def _capture(y, x, mask, probe):
    del x, mask, probe
    return y


def _capture_fwd(y, x, mask, probe):
    return y, (x, mask, probe)


def _varying_axes(x) -> frozenset:
    """The manual mesh axes along which ``x`` varies inside ``shard_map``
    (empty outside it)."""
    mat = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset(getattr(mat, "varying", ()) or ())


def _capture_bwd(res, gy):
    x, mask, probe = res
    use_bias = probe.A.shape[0] == x.shape[-1] + 1
    basis = None if probe.ekfac is None else (probe.ekfac.qa, probe.ekfac.qg)
    stats = layer_stats(x, gy, mask, use_bias, probe.A.dtype, basis)
    # Inside shard_map (check_vma=True) a probe that is the same on every
    # device (replicated, like the parameters) must get a cotangent of the
    # same type: the statistics are summed over the axes along which the batch
    # varies, as JAX sums the gradient of a replicated parameter. They are then
    # global sums, and kfac_precondition needs no axis_name.
    extra = tuple(sorted(_varying_axes(stats.A) - _varying_axes(probe.A)))
    if extra:
        stats = jax.lax.psum(stats, extra)
    return gy, jnp.zeros_like(x), jnp.zeros_like(mask), stats


_capture.defvjp(_capture_fwd, _capture_bwd)


def _check_probe(x: Array, y: Array, probe: LayerStats, name: str = "layer"):
    d_in, d_out = x.shape[-1], y.shape[-1]
    if probe.A.shape not in ((d_in, d_in), (d_in + 1, d_in + 1)):
        raise ValueError(f"{name}: probe A has shape {probe.A.shape}, expected "
                         f"({d_in}, {d_in}) or ({d_in + 1}, {d_in + 1}) for an "
                         f"input of width {d_in}")
    if probe.G.shape != (d_out, d_out):
        raise ValueError(f"{name}: probe G has shape {probe.G.shape}, expected "
                         f"({d_out}, {d_out}) for an output of width {d_out}")
    if probe.ekfac is not None:
        d_a = probe.A.shape[0]
        want = ((d_a, d_a), (d_out, d_out), (d_a, d_out))
        got = tuple(tuple(x.shape) for x in probe.ekfac)
        if got != want:
            raise ValueError(f"{name}: probe ekfac (qa, qg, diag) has shapes {got}, expected "
                             f"{want}")


def capture(y: Array, x: Array, probe: LayerStats | None,
            mask: Array | None = None) -> Array:
    """Identity on ``y`` whose backward pass writes ``x``/``dL/dy`` statistics
    into the cotangent of ``probe`` (see the module doc). ``probe=None`` is a
    no-op, so inference code needs no probe."""
    if probe is None:
        return y
    _check_probe(x, y, probe)
    if mask is None:
        mask = jnp.ones(x.shape[:-1], x.dtype)
    else:
        mask = jnp.asarray(mask).astype(x.dtype)
    return _capture(y, x, mask, probe)


def dense(x: Array, kernel: Array, bias: Array | None = None, *,
          probe: LayerStats | None = None, mask: Array | None = None,
          precision=None) -> Array:
    """``x @ kernel + bias`` whose K-FAC statistics land in ``probe``'s
    cotangent. ``kernel`` is ``[d_in, d_out]``; ``x`` is ``[..., d_in]``."""
    y = jnp.matmul(x, kernel, precision=precision)
    if bias is not None:
        y = y + bias
    return capture(y, x, probe, mask)


class KFACDense(nn.Module):
    """``nn.Dense`` that records K-FAC statistics.

    At ``init`` it creates, besides ``params/{kernel,bias}``, a probe of
    zeros in the ``"kfac"`` collection under the name ``kernel`` (so that the
    statistics tree has the same paths as the kernels it preconditions). When
    ``apply`` receives the ``"kfac"`` collection the layer is captured;
    without it the layer is a plain dense layer.

    Call with ``mask`` (the token mask of ``x``'s leading shape) to exclude
    padding from the statistics.
    """

    features: int
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    stats_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        d_in = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (d_in, self.features),
                            self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        dtype = self.dtype or jnp.result_type(x, kernel)
        x = x.astype(dtype)
        kernel = kernel.astype(dtype)
        bias = None if bias is None else bias.astype(dtype)
        probe = None
        if self.is_initializing() or self.has_variable("kfac", "kernel"):
            probe = self.variable(
                "kfac", "kernel",
                lambda: zeros_stats(d_in, self.features, self.use_bias, self.stats_dtype),
            ).value
            if self.is_initializing():
                probe = None
        return dense(x, kernel, bias, probe=probe, mask=mask)




def _fisher_cotangents(outputs: Array, likelihood: str, fisher_type: str,
                       rng: Array | None) -> Array:
    """Output cotangents whose outer products average to the output Fisher.

    ``outputs`` is ``[..., C]``; every leading position is one prediction and
    the loss is taken as the mean over them (``R`` rows). ``sampled`` returns
    one cotangent ``[..., C]``; ``exact`` returns ``[C, ..., C]``, one per
    column of the square root of the output Fisher.
    """
    z = outputs.astype(jnp.float32)
    rows = max(1, int(z.size // z.shape[-1]))
    C = z.shape[-1]
    if fisher_type == "sampled":
        if rng is None:
            raise ValueError("fisher_type='sampled' needs an rng key: call the "
                             "function returned by kfac_value_and_grad with rng=key")
        return (sample_cotangents(z, rng, 1, likelihood)[0] / rows).astype(outputs.dtype)
    # exact
    eye = jnp.eye(C, dtype=jnp.float32)
    if likelihood == "categorical":
        p = jax.nn.softmax(z, axis=-1)
        # columns sqrt(p_k) (e_k - p): sum_k c_k c_k^T = diag(p) - p p^T
        cot = (jnp.moveaxis(jnp.sqrt(p), -1, 0)[..., None]
               * (eye.reshape((C,) + (1,) * (z.ndim - 1) + (C,)) - p[None]))
    else:
        cot = jnp.broadcast_to(eye.reshape((C,) + (1,) * (z.ndim - 1) + (C,)),
                               (C,) + z.shape)
    return (cot / rows).astype(outputs.dtype)


def _ief_cotangents(dout: Array) -> Array:
    """Per-example unit output cotangents for iEF-rescaled statistics.

    ``dout [N, ...]`` is the gradient of the loss with respect to the
    outputs; example ``n``'s rows ``dout[n]`` are proportional to ``grad_z
    l_n`` whatever the loss's weight of that example. Returns ``dout[n] /
    ||dout[n]|| / N'`` (norm over all of ``n``'s positions, zero where
    ``dout[n] = 0``), ``N'`` the number of examples with a nonzero output
    gradient. Pulled back, the layer cotangents are ``g_t = ghat_t / (N'
    ||grad_z l_n||)`` with ``ghat_t = dl_n/dy_t``, and the module's
    ``G = N'^2 sum_t g_t g_t^T`` gives ``G / N' = (1/N') sum_n sum_{t in n}
    ghat_t ghat_t^T / ||grad_z l_n||^2``.
    """
    d = dout.astype(jnp.promote_types(dout.dtype, jnp.float32))
    sq = jnp.sum(d.reshape(d.shape[0], -1) ** 2, axis=1)
    nz = sq > 0
    inv = jnp.where(nz, jax.lax.rsqrt(jnp.where(nz, sq, 1.0)), 0.0)
    n = jnp.maximum(jnp.sum(nz.astype(d.dtype)), 1.0)
    cot = d * (inv / n).reshape((-1,) + (1,) * (d.ndim - 1))
    return cot.astype(dout.dtype)


def kfac_value_and_grad(model_fn: Callable, loss_fn: Callable | None = None, *,
                        fisher_type: str = "empirical",
                        likelihood: str = "categorical",
                        has_aux: bool = False) -> Callable:
    """Loss, gradients and K-FAC statistics from one forward/backward pass.

    Two forms:

    * ``kfac_value_and_grad(loss_fn)`` with ``loss_fn(params, probes, *args)
      -> loss`` (or ``(loss, aux)`` with ``has_aux``). Only the empirical
      Fisher is available: the statistics come from the loss's own backward
      pass at no extra cost.
    * ``kfac_value_and_grad(model_fn, loss_fn)`` with ``model_fn(params,
      probes, *args) -> outputs`` (or ``(outputs, aux)``) and ``loss_fn(
      outputs, *args) -> loss``. This form also supports
      ``fisher_type="sampled"`` (labels drawn from the model's predictive
      distribution, one extra backward pass, needs ``rng``) and
      ``fisher_type="exact"`` (one backward pass per output dimension; the
      exact Fisher/Gauss-Newton of the output layer, affordable for the few
      classes of GLUE heads). ``outputs`` are logits ``[..., C]`` for
      ``likelihood="categorical"`` or means for ``"gaussian"`` (unit
      variance); the Fisher losses are means over all leading positions.
      It also supports ``fisher_type="ief"``: the empirical Fisher with each
      example rescaled by its logits-level gradient norm (below).

    The paper's setting is the empirical Fisher (its equation 6), which is
    also the default.

    **iEF-rescaled statistics** (``fisher_type="ief"``). The improved
    empirical Fisher (Wu et al. 2024, supporting material eq. 20) replaces
    each per-sample gradient ``grad l_n`` by ``grad l_n / ||grad_z l_n||``,
    ``z_n`` the example's outputs; applied to K-FAC (its Section 5
    guideline) the output factor becomes::

        G_iEF / num_examples = (1/N) sum_n sum_{t in n} m_t ghat_t ghat_t^T / ||grad_z l_n||^2

    with ``ghat_t = dl_n/dy_t`` the layer's output cotangent of example
    ``n``'s own loss, while ``A`` is unchanged. The statistics pass pulls
    back the output cotangents ``dL/dz_n / (N ||dL/dz_n||)`` (unit
    per-example directions, with the ``1/N`` of a mean loss), so the module's
    ``G = N^2 sum g g^T`` convention yields exactly the average above, and
    the result does not depend on how the loss weights its examples (a
    weight cancels in the normalisation). ``N`` counts the examples whose
    output gradient is nonzero (padded example rows drop out; so would a
    real example with an exactly zero gradient, which also contributes
    nothing to ``G``). The norm is taken over *all* of an example's outputs:
    for sequence outputs ``[N, T, C]`` each sequence is one example with
    ``||grad_z l_n||^2 = sum_t ||dl_n/dz_t||^2`` (per-sequence, not
    per-token, rescaling), as in the paper where ``z_n`` is the whole
    output of example ``n``. It costs one extra backward pass; the returned
    gradient is the true gradient of the loss.

    Returns a function ``(params, probes, *args, rng=None) -> (value, grads,
    stats)`` where ``value`` is ``loss`` or ``(loss, aux)``, ``grads`` are the
    gradients with respect to ``params`` and ``stats`` has the structure of
    ``probes`` with every :class:`LayerStats` filled in. It is a pure function:
    jit or pmap it inside your own step.
    """
    if fisher_type not in FISHER_TYPES:
        raise ValueError(f"unknown fisher_type {fisher_type!r}; expected one of {FISHER_TYPES}")
    check_likelihood(likelihood)
    if loss_fn is None and fisher_type != "empirical":
        raise ValueError(f"fisher_type={fisher_type!r} needs the two-function form "
                         "kfac_value_and_grad(model_fn, loss_fn): the Fisher is formed "
                         "from the model outputs")

    if loss_fn is None:
        vg = jax.value_and_grad(model_fn, argnums=(0, 1), has_aux=has_aux)

        def single(params, probes, *args, rng=None, **kwargs):
            del rng
            value, (grads, stats) = vg(params, probes, *args, **kwargs)
            return value, grads, stats

        return single

    def two(params, probes, *args, rng=None, **kwargs):
        def fwd(p, pr):
            return model_fn(p, pr, *args, **kwargs)

        if has_aux:
            outputs, vjp_fn, aux = jax.vjp(fwd, params, probes, has_aux=True)
        else:
            outputs, vjp_fn = jax.vjp(fwd, params, probes)
        loss, dout = jax.value_and_grad(lambda o: loss_fn(o, *args, **kwargs))(outputs)
        grads, emp_stats = vjp_fn(dout)
        if fisher_type == "empirical":
            stats = emp_stats
        elif fisher_type == "ief":
            _, stats = vjp_fn(_ief_cotangents(dout))
        elif fisher_type == "sampled":
            _, stats = vjp_fn(_fisher_cotangents(outputs, likelihood, "sampled", rng))
        else:
            cots = _fisher_cotangents(outputs, likelihood, "exact", None)
            per_col = jax.vmap(lambda c: vjp_fn(c)[1])(cots)
            stats = jax.tree_util.tree_map(
                lambda s: LayerStats(A=s.A[0], G=jnp.sum(s.G, 0),
                                     num_tokens=s.num_tokens[0],
                                     num_examples=s.num_examples[0],
                                     ekfac=None if s.ekfac is None else EKFACProbe(
                                         s.ekfac.qa[0], s.ekfac.qg[0],
                                         jnp.sum(s.ekfac.diag, 0))),
                per_col, is_leaf=lambda s: isinstance(s, LayerStats))
        value = (loss, aux) if has_aux else loss
        return value, grads, stats

    return two
