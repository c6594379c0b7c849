"""K-FAC statistics from an unmodified Flax Linen model.

``intercept_dense`` is a context manager (``flax.linen.intercept_methods``
underneath) that captures every stock ``nn.Dense`` and ``nn.DenseGeneral``
of a model, the projections of ``nn.MultiHeadDotProductAttention``
included, through the same custom VJP as :func:`kfac_jax_peft.dense`: no
layer has to be rewritten. Under it,

* ``model.init`` also creates a zero probe in the ``"kfac"`` collection at
  the path of each captured kernel (``.../kernel``);
* ``model.apply({"params": ..., "kfac": probes}, ...)`` routes each
  captured layer's output through the capture, so
  :func:`~kfac_jax_peft.kfac_value_and_grad` returns its statistics.

A ``DenseGeneral`` kernel ``[in axes..., out axes...]`` is the matrix
``[prod(in axes), prod(out axes)]`` for K-FAC: its input is flattened over
the contracted (trailing) axes and its output over the feature axes;
``kfac_precondition(layer_filter=captured_layers(probes))`` registers
exactly the captured kernels with that view. Usage::

    with kp.intercept_dense():
        variables = model.init(rng, x)              # params and "kfac" probes
    tx = kp.kfac_precondition(layer_filter=kp.captured_layers(variables["kfac"]))

    def loss_fn(params, probes, batch):
        with kp.intercept_dense(mask=batch["mask"]):
            logits = model.apply({"params": params, "kfac": probes}, batch["x"])
        return loss(logits, batch)

``mask`` is the token mask of the inputs' leading (batch, sequence) shape,
given once: a layer whose inputs have that leading shape uses it; a layer
whose inputs' leading shape is a prefix of it (a head on pooled ``[N,
...]`` features: its rows are examples) counts every row; any other
leading shape (the keys and values of a cross-attention over another
sequence) is an error naming the layer, and needs ``mask`` as a function
``(module path, leading shape) -> mask or None``. ``select(path)`` (a
``/``-joined module path such as ``"MultiHeadDotProductAttention_0/query"``)
chooses the layers; by default all. Not supported: ``DenseGeneral`` with
``batch_dims`` or with contracted axes that are not the trailing ones (an
error names the layer).
Inside ``nn.scan`` the probes need the stack axis like the parameters
(``variable_axes={"params": 0, "kfac": 0}``); the stacked kernel is then
one layer per step of the scan, each with its own pair of factors.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import flax
import flax.linen as nn
import jax.numpy as jnp

from kfac_jax_peft.capture import capture, zeros_stats


def _axes(module, x_ndim: int) -> tuple[int, int]:
    """``(number of contracted input axes, number of output feature axes)``."""
    if isinstance(module, nn.DenseGeneral):
        if module.batch_dims:
            raise ValueError(f"K-FAC capture: {_name(module)} uses batch_dims, not supported")
        axis = module.axis if isinstance(module.axis, tuple | list) else (module.axis,)
        axis = sorted(a % x_ndim for a in axis)
        if axis != list(range(x_ndim - len(axis), x_ndim)):
            raise ValueError(f"K-FAC capture: {_name(module)} contracts axes {module.axis} of a "
                             f"{x_ndim}-D input; only trailing axes are supported")
        features = module.features if isinstance(module.features, tuple | list) \
            else (module.features,)
        return len(axis), len(features)
    return 1, 1


def _name(module) -> str:
    return "/".join(str(p) for p in module.scope.path) or type(module).__name__


def _mask_for(mask, name: str, lead: tuple):
    """The token mask of a layer whose inputs have leading shape ``lead``."""
    if mask is None:
        return None
    if callable(mask):
        return mask(name, lead)
    m = jnp.asarray(mask)
    if tuple(m.shape) == tuple(lead):
        return m
    if tuple(m.shape[:len(lead)]) == tuple(lead):
        return None  # rows are examples (pooled features): all real
    raise ValueError(f"K-FAC capture: the mask has shape {tuple(m.shape)} but {name} reads "
                     f"inputs of leading shape {lead}; pass mask as a function "
                     "(module path, leading shape) -> mask")


def _interceptor(mask, select: Callable[[str], bool]):
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense | nn.DenseGeneral) \
                or not select(_name(module)):
            return next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        y = next_fun(*args, **kwargs)
        n_in, n_out = _axes(module, x.ndim)
        lead = x.shape[:x.ndim - n_in]
        d_in, d_out = math.prod(x.shape[len(lead):]), math.prod(y.shape[y.ndim - n_out:])
        if module.is_initializing():
            try:
                module.variable("kfac", "kernel",
                                lambda: zeros_stats(d_in, d_out, module.use_bias))
            except flax.errors.ScopeCollectionNotFound as e:
                raise ValueError(f"K-FAC capture: {_name(module)} runs inside a lifted "
                                 "transformation (nn.scan, nn.vmap) that does not carry the "
                                 "'kfac' collection: add 'kfac': 0 to its variable_axes") from e
            return y
        if not module.has_variable("kfac", "kernel"):
            return y
        m = _mask_for(mask, _name(module), lead)
        probe = module.get_variable("kfac", "kernel")
        out = capture(y.reshape(lead + (d_out,)), x.reshape(lead + (d_in,)), probe, m)
        return out.reshape(y.shape)

    return intercept


@contextlib.contextmanager
def intercept_dense(mask=None, select: Callable[[str], bool] | None = None):
    """Capture the stock dense layers of any Linen model called inside (see
    the module documentation)."""
    with nn.intercept_methods(_interceptor(mask, select or (lambda name: True))):
        yield
