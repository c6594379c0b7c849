"""K-FAC statistics from a Flax NNX model: ``nnx.Linear``, ``nnx.LoRA``, ``nnx.LoRALinear``.

NNX modules are Python objects, so their K-FAC probes are variables of
their own type, :class:`KFACProbe`, attached to the layers of an existing
model by :func:`add_probes` (no class is rewritten): ``kfac_kernel`` on an
``nnx.Linear`` or ``nnx.LinearGeneral`` whose kernel trains, ``kfac_lora_a`` and ``kfac_lora_b`` on
an ``nnx.LoRA`` (the adapter of ``nnx.LoRALinear`` too). Inside
:func:`intercept_nnx` those layers route their outputs through the capture
of :func:`kfac_jax_peft.dense` (``nnx.LoRA`` as its two matrices, ``x ->
x a`` and ``h -> h b``), and :func:`nnx_value_and_grad` differentiates
with respect to the trainable variables and the probes in one backward
pass, returning the statistics keyed by the paths of the parameters they
describe, the paths ``nnx.Optimizer`` hands to optax::

    probes = kp.add_probes(model, wrt=nnx.LoRAParam)
    tx = optax.chain(kp.kfac_precondition(1e-2, layer_filter=kp.captured_layers(probes)),
                     kp.clip_by_update_norm(1.0), optax.scale_by_learning_rate(0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)

    def loss_fn(model, x, mask, y):
        with kp.intercept_nnx(mask=mask):
            return loss(model(x), y)

    loss, grads, stats = kp.nnx_value_and_grad(loss_fn, nnx.LoRAParam)(model, x, mask, y)
    optimizer.update(model, grads, kfac_stats=stats)

``nnx.LinearGeneral`` is captured as the matrix ``[prod(in_features),
prod(out_features)]`` (contracting trailing axes, no ``batch_axis``).
``mask`` follows :func:`kfac_jax_peft.intercept_dense`. NNX scan stacks
are not captured.
"""

from __future__ import annotations

import contextlib
import math

import jax
from flax import nnx

from kfac_jax_peft.capture import LayerStats, capture, zeros_stats
from kfac_jax_peft.linen import _mask_for

_PREFIX = "kfac_"


class KFACProbe(nnx.Variable):
    """Zero :class:`~kfac_jax_peft.LayerStats` whose gradient is a layer's statistics."""


def _trains(path: tuple, variable, wrt) -> bool:
    return nnx.filterlib.to_predicate(wrt)(path, variable)


def add_probes(model: nnx.Module, wrt=nnx.Param) -> dict:
    """Attach a :class:`KFACProbe` to every ``nnx.Linear`` kernel and
    ``nnx.LoRA`` matrix of ``model`` whose variable matches ``wrt`` (the
    trainable ones); returns the zero statistics keyed by parameter path,
    for :func:`~kfac_jax_peft.captured_layers`."""
    out: dict = {}
    for path, module in nnx.iter_graph(model):
        if isinstance(module, nnx.LoRA):
            d_in, rank = module.lora_a.shape
            for name, dims in (("lora_a", (d_in, rank)), ("lora_b", (rank, module.out_features))):
                if _trains(path + (name,), getattr(module, name), wrt):
                    setattr(module, _PREFIX + name, KFACProbe(zeros_stats(*dims, False)))
                    _put(out, path + (name,), zeros_stats(*dims, False))
        elif isinstance(module, nnx.Linear | nnx.LinearGeneral) \
                and _trains(path + ("kernel",), module.kernel, wrt):
            probe = zeros_stats(*_general_sizes(module), module.use_bias)
            module.kfac_kernel = KFACProbe(probe)
            _put(out, path + ("kernel",), probe)
    return out


def _general_sizes(module) -> tuple[int, int]:
    """``(d_in, d_out)`` of an ``nnx.Linear`` or of an ``nnx.LinearGeneral``
    as the matrix ``[prod(in_features), prod(out_features)]``."""
    if isinstance(module, nnx.Linear):
        return module.in_features, module.out_features
    if module.batch_axis:
        raise ValueError(f"K-FAC capture: nnx.LinearGeneral with batch_axis "
                         f"{dict(module.batch_axis)} is not supported")
    return math.prod(module.in_features), math.prod(module.out_features)


def _put(tree: dict, path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(str(key), {})
    tree[str(path[-1])] = value


def _probe(module, name):
    p = getattr(module, _PREFIX + name, None)
    return None if p is None else LayerStats(*p.get_value())


def _lead(x) -> tuple:
    return tuple(x.shape[:-1])


@contextlib.contextmanager
def intercept_nnx(mask=None):
    """Capture the probed ``nnx.Linear`` and ``nnx.LoRA`` layers called inside."""
    linear_call, lora_call = nnx.Linear.__call__, nnx.LoRA.__call__
    general_call = nnx.LinearGeneral.__call__

    def linear(self, x, *args, **kwargs):
        y = linear_call(self, x, *args, **kwargs)
        probe = _probe(self, "kernel")
        if probe is None:
            return y
        return capture(y, x, probe, _mask_for(mask, "Linear", _lead(x)))

    def lora(self, x, **kwargs):
        pa, pb = _probe(self, "lora_a"), _probe(self, "lora_b")
        if pa is None and pb is None:
            return lora_call(self, x, **kwargs)
        x, a, b = self.promote_dtype((x, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
        m = _mask_for(mask, "LoRA", _lead(x))
        h = capture(x @ a, x, pa, m)
        out = capture(h @ b, h, pb, m)
        if self.base_module is not None:
            out += self.base_module(x, **kwargs)
        return out

    def general(self, x, *args, **kwargs):
        y = general_call(self, x, *args, **kwargs)
        probe = _probe(self, "kernel")
        if probe is None:
            return y
        n_in = len(self.in_features)
        axes = sorted(a % x.ndim for a in self.axis)
        if axes != list(range(x.ndim - n_in, x.ndim)):
            raise ValueError(f"K-FAC capture: nnx.LinearGeneral contracting axes {self.axis} "
                             "that are not the trailing ones is not supported")
        lead = tuple(x.shape[:x.ndim - n_in])
        d_in, d_out = _general_sizes(self)
        out = capture(y.reshape(lead + (d_out,)), x.reshape(lead + (d_in,)), probe,
                      _mask_for(mask, "LinearGeneral", lead))
        return out.reshape(y.shape)

    nnx.Linear.__call__, nnx.LoRA.__call__ = linear, lora
    nnx.LinearGeneral.__call__ = general
    try:
        yield
    finally:
        nnx.Linear.__call__, nnx.LoRA.__call__ = linear_call, lora_call
        nnx.LinearGeneral.__call__ = general_call


def nnx_value_and_grad(loss_fn, wrt=nnx.Param):
    """``(model, *args) -> (loss, grads, stats)``: the loss, its gradient with
    respect to the variables matching ``wrt`` (an ``nnx.State``, as
    ``nnx.grad`` gives it) and the K-FAC statistics of the probed layers
    (a dict keyed by parameter path), from one backward pass."""

    def fn(model, *args):
        diff = nnx.DiffState(0, nnx.Any(wrt, KFACProbe))
        loss, grads = nnx.value_and_grad(loss_fn, argnums=diff)(model, *args)
        stats: dict = {}
        probe_grads = nnx.to_pure_dict(nnx.as_pure(nnx.state(grads, KFACProbe)))
        for path, s in jax.tree_util.tree_flatten_with_path(
                probe_grads, is_leaf=lambda x: isinstance(x, LayerStats))[0]:
            keys = [str(getattr(k, "key", k)) for k in path]
            _put(stats, keys[:-1] + [keys[-1].removeprefix(_PREFIX)], s)
        return loss, nnx.state(grads, wrt), stats

    return fn


__all__ = ["KFACProbe", "add_probes", "intercept_nnx", "nnx_value_and_grad"]
