"""Which leaves are K-FAC layers, and under which key each factor is kept.

A *layer* is a floating ``kernel`` leaf ``[d_in, d_out]`` (Flax's
convention; any leaf chosen by ``layer_filter``), with its ``bias`` sibling
of shape ``[d_out]`` folded into the input factor as a homogeneous
coordinate, so ``d_a = d_in + 1`` with a bias and ``d_g = d_out``. A kernel
of more dimensions (``nn.DenseGeneral``, the projections of
``nn.MultiHeadDotProductAttention``) is the matrix ``[prod(in axes),
prod(out axes)]`` when ``layer_filter`` returns the number ``k`` of its
leading input axes instead of ``True`` (:func:`captured_layers` does this
from the probes a model created); its bias has the shape of the out axes.

Its two Kronecker factors are kept in the state under *factor keys*:

* ``"<kernel path>/G"`` for the output-gradient factor;
* ``"<kernel path>/A"`` for the input factor, or, when ``input_groups``
  puts the layer in a group of two or more layers that read the same input,
  the group's key, shared by the members (one moving average and, with
  exact damping, one eigendecomposition for all of them).

Paths are ``/``-joined keys of the pytree path (``jax.tree_util.keystr``
with ``simple=True``): ``encoder/layer_0/attention/query/lora_A/kernel``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

InputGroups = Callable[[str], Any] | Sequence[tuple[str, str]]


class LayerSpec(NamedTuple):
    """A registered layer: its leaves, its factor keys and their sizes."""

    kernel: str  # path of the kernel leaf
    bias: str | None  # path of the bias folded into A, if any
    a_key: str  # key of the input factor (own or shared)
    g_key: str  # key of the output-gradient factor
    d_a: int
    d_g: int
    in_ndim: int = 1  # kernel axes (after the stack axes) that are input axes
    index: tuple | None = None  # the layer's index in a stacked (nn.scan) kernel

    @property
    def name(self) -> str:
        """The layer's key in the state: the kernel path, with ``[i]`` (the
        flat index) for a layer of a stack."""
        return self.kernel if self.index is None else f"{self.kernel}[{self.flat_index}]"

    @property
    def flat_index(self) -> int:
        return int(np.ravel_multi_index(self.index, self.stack_shape)) if self.index else 0

    stack_shape: tuple = ()


class LayerView(NamedTuple):
    """What ``layer_filter`` may return for a kernel of more than two axes:
    ``stack`` leading axes of independent layers (an ``nn.scan`` stack: one
    pair of factors per layer), then ``inputs`` input axes, then the output
    axes."""

    inputs: int = 1
    stack: int = 0


def path_str(path) -> str:
    """``/``-joined keys of a pytree path (``params/layer/kernel``)."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def is_masked(x) -> bool:
    """A leaf masked out by ``optax.masked`` / ``optax.partition``."""
    return isinstance(x, optax.MaskedNode)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def flatten(tree) -> dict[str, Any]:
    """``{path: leaf}``, masked leaves included as :data:`optax.MaskedNode`.
    An NNX ``Variable`` (what ``nnx.Optimizer`` hands to ``init``) counts as
    its value, at its own path (not ``.../value``), so that ``init`` and
    ``update`` (which gets pure arrays) see the same paths."""
    flat = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: is_masked(x) or _is_variable(x))[0]
    return {path_str(p): (x.get_value() if _is_variable(x) else x) for p, x in flat}


def default_layer_filter(path: str, leaf) -> bool:
    """Every 2-D floating leaf named ``kernel`` is a K-FAC layer (Flax convention)."""
    return (path.split("/")[-1] == "kernel" and len(getattr(leaf, "shape", ())) == 2
            and jnp.issubdtype(leaf.dtype, jnp.floating))


def group_fn(input_groups: InputGroups | None) -> Callable[[str], str | None]:
    """``path -> group key or None`` from a callable or ``(regex, key template)``
    rules (the first rule whose pattern matches the whole path gives
    ``match.expand(template)``)."""
    if input_groups is None:
        return lambda path: None
    if callable(input_groups):
        return lambda path: (None if (k := input_groups(path)) is None else str(k))
    rules = [(re.compile(pattern), template) for pattern, template in input_groups]

    def fn(path):
        for rx, template in rules:
            m = rx.fullmatch(path)
            if m is not None:
                return m.expand(template)
        return None

    return fn


def _bias_path(kernel_path: str) -> str:
    return "/".join(kernel_path.split("/")[:-1] + ["bias"])


def _check_leaf(path: str, leaf, view: LayerView) -> None:
    shape = tuple(getattr(leaf, "shape", ()))
    if view.inputs < 1 or view.stack < 0 or len(shape) < view.stack + view.inputs + 1:
        raise ValueError(f"layer_filter chose {path!r} of shape {shape} with {view.inputs} input "
                         f"axes and {view.stack} stack axes: a K-FAC layer is a [d_in, d_out] "
                         "kernel, or a kernel with leading stack axes (nn.scan), then input "
                         "axes, then output axes (return a LayerView from layer_filter)")
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise ValueError(f"layer_filter chose {path!r}, whose dtype {leaf.dtype} is not "
                         "floating: only floating parameters can be preconditioned")


def _view(choice) -> LayerView | None:
    """``layer_filter``'s answer (True, a number of input axes, a
    :class:`LayerView`) as a view; None: not a layer."""
    if isinstance(choice, LayerView):
        return choice
    if choice is True:
        return LayerView()
    if choice is False or choice is None or int(choice) == 0:
        return None
    return LayerView(inputs=int(choice))


def register(tree, layer_filter: Callable[[str, Any], Any],
             groups: Callable[[str], str | None]) -> dict[str, LayerSpec]:
    """The layers of a parameter (or update) tree, keyed by :attr:`LayerSpec.name`."""
    flat = flatten(tree)
    found = {}
    for path, leaf in flat.items():
        view = None if is_masked(leaf) else _view(layer_filter(path, leaf))
        if view is None:
            continue
        _check_leaf(path, leaf, view)
        stack, k = view.stack, view.stack + view.inputs
        bias = flat.get(_bias_path(path))
        has_bias = (bias is not None and not is_masked(bias)
                    and tuple(bias.shape) == tuple(leaf.shape[:stack] + leaf.shape[k:]))
        d_in, d_out = math.prod(leaf.shape[stack:k]), math.prod(leaf.shape[k:])
        b = _bias_path(path) if has_bias else None
        for index in (np.ndindex(*leaf.shape[:stack]) if stack else [None]):
            spec = LayerSpec(path, b, "", "", d_in + int(has_bias), d_out, view.inputs, index,
                             tuple(leaf.shape[:stack]))
            found[spec.name] = spec
    members: dict[str, list[str]] = {}
    for name in sorted(found):
        key = groups(name)
        if key is not None:
            members.setdefault(key, []).append(name)
    shared = {p: k for k, ps in members.items() if len(ps) > 1 for p in ps}
    specs = {name: s._replace(a_key=shared.get(name, f"{name}/A"), g_key=f"{name}/G")
             for name, s in found.items()}
    _check_keys(specs)
    return specs


def _check_keys(specs: Mapping[str, LayerSpec]) -> None:
    """Shared input factors need one size; a group key must not be a layer's own key."""
    sizes: dict[str, set] = {}
    for s in specs.values():
        sizes.setdefault(s.a_key, set()).add(s.d_a)
    for key, ds in sizes.items():
        if len(ds) > 1:
            members = {s.name: s.d_a for s in specs.values() if s.a_key == key}
            raise ValueError(f"input group {key!r} has layers with input factors of "
                             f"different sizes: {members}")
    own = {k for s in specs.values() for k in (f"{s.name}/A", s.g_key)}
    for s in specs.values():
        if s.a_key != f"{s.name}/A" and s.a_key in own:
            raise ValueError(f"input group key {s.a_key!r} is also a layer's own factor key")


def factor_sizes(specs: Mapping[str, LayerSpec]) -> dict[str, int]:
    """``{factor key: dimension}`` of every factor of ``specs``."""
    out = {}
    for s in specs.values():
        out[s.a_key] = s.d_a
        out[s.g_key] = s.d_g
    return dict(sorted(out.items()))


def captured_layers(probes) -> Callable[[str, Any], LayerView]:
    """A ``layer_filter`` registering exactly the kernels that have a probe in
    ``probes`` (the ``"kfac"`` collection a model created), with the
    :class:`LayerView` that makes the kernel fit the probe: the probe's
    leading axes are stack axes (``nn.scan``), then the input axes are those
    whose size (plus a bias) is the probe's ``A``. A layer that records
    statistics is then never left out, and a layer that does not is never
    registered."""
    sizes = {}
    for p, s in jax.tree_util.tree_flatten_with_path(
            probes, is_leaf=lambda x: hasattr(x, "num_tokens"))[0]:
        sizes[path_str(p)] = (s.A.shape[-1], s.G.shape[-1], s.A.ndim - 2)

    def layer_filter(path, leaf) -> LayerView | None:
        if path not in sizes:
            return None
        d_a, d_g, stack = sizes[path]
        shape = tuple(leaf.shape)
        for k in range(1, len(shape) - stack):
            if (math.prod(shape[stack + k:]) == d_g
                    and math.prod(shape[stack:stack + k]) in (d_a, d_a - 1)):
                return LayerView(inputs=k, stack=stack)
        raise ValueError(f"the probe of {path!r} (A {d_a}x{d_a}, G {d_g}x{d_g}, {stack} stack "
                         f"axes) does not fit its kernel of shape {shape}")

    return layer_filter
