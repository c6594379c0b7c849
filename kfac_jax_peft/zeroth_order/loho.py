"""LoHO: first-order on some parameters, zeroth-order on the rest, one step.

The trainable leaves are labelled ``"fo"`` or ``"zo"`` (every leaf exactly
one label). A step computes

* the ``"fo"`` leaves' exact gradient by ONE backward pass that
  differentiates the loss with respect to those leaves only, the ``"zo"``
  leaves closed over as constants: no cotangent is formed for them, and
  when the ``"fo"`` leaves are the last layers the backward pass stops at
  the first of them (LoHO puts the first-order layers last for this);
* the ``"zo"`` leaves' SPSA estimate (:mod:`.spsa`) from two forward passes
  that perturb only them, the ``"fo"`` leaves held at their current values;

and returns one gradient tree, to be fed to ``optax.partition({"fo": sgd or
adam, "zo": sgd}, labels)`` (:func:`loho`). LoHO-SGD is ``sgd``/``sgd``,
LoHO-Adam ``adam`` on ``"fo"`` and ``sgd`` on ``"zo"``; the learning rates
differ by orders of magnitude (the source's tables: ZO ``1e-6`` to
``1e-12``, FO ``1e-7`` to ``3e-3``, ``eps = 1e-3``).

The two partitions of the source:

* inter-layer (:func:`inter_layer_labels`): whole layers; the last (or
  first) ``num_fo_layers`` layers are first-order (the source's
  "#FO layers");
* intra-layer (:func:`intra_layer_labels`): inside every layer a fraction
  ``fo_ratio`` of its parameters is first-order (the source: 50% and 20%).

A leaf's layer is the integer captured by ``layer_pattern`` (default
``layer_(\\d+)``) in its ``/``-joined path, e.g. ``encoder/layer_3/query/
lora_a``. Leaves with no layer index (heads, embeddings) get the label
``unindexed`` (default ``"zo"``). Intra-layer labels are chosen per leaf
(``optax.partition`` assigns transformations to whole leaves): a layer's
leaves are taken in path order and a leaf is first-order when the midpoint
of its span in the layer's cumulative parameter count falls below
``fo_ratio`` times the layer's size, deterministic and the nearest a
per-leaf split gets to the ratio.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import optax

from kfac_jax_peft.zeroth_order.directions import check_eps, check_num_directions
from kfac_jax_peft.zeroth_order.spsa import spsa_estimate

FO = "fo"
ZO = "zo"
LAYER_PATTERN = r"layer_(\d+)"


def leaf_paths(params: Any) -> list[str]:
    """The ``/``-joined path of every leaf, in flattening order."""
    return [jax.tree_util.keystr(tuple(p), simple=True, separator="/")
            for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _layer_indices(params, layer_pattern):
    pattern = re.compile(layer_pattern)
    found = [pattern.search(path) for path in leaf_paths(params)]
    return [int(m.group(1)) if m else None for m in found]


def _check_label(name, label):
    if label not in (FO, ZO):
        raise ValueError(f"{name} must be {FO!r} or {ZO!r}, got {label!r}")


def _labels_tree(params, labels):
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), labels)


def inter_layer_labels(num_fo_layers: int, fo_layers: str = "last",
                       layer_pattern: str = LAYER_PATTERN,
                       unindexed: str = ZO) -> Callable[[Any], Any]:
    """Labels with the last (``fo_layers="last"``) or first ``num_fo_layers``
    layers first-order and the other layers zeroth-order.

    Returns a function ``params -> labels tree``, usable as
    ``optax.partition``'s ``param_labels``.
    """
    if int(num_fo_layers) != num_fo_layers or num_fo_layers < 0:
        raise ValueError(f"num_fo_layers must be an integer >= 0, got {num_fo_layers!r}")
    if fo_layers not in ("first", "last"):
        raise ValueError(f"fo_layers must be 'first' or 'last', got {fo_layers!r}")
    _check_label("unindexed", unindexed)

    def labels(params):
        index = _layer_indices(params, layer_pattern)
        layers = sorted({i for i in index if i is not None})
        k = int(num_fo_layers)
        chosen = set(layers[len(layers) - k:] if fo_layers == "last" else layers[:k])
        chosen = chosen if k else set()
        return _labels_tree(params, [unindexed if i is None else FO if i in chosen else ZO
                                     for i in index])

    return labels


def _intra_layer_split(sizes: list[int], fo_ratio: float) -> list[str]:
    """Labels of one layer's leaves (in path order) by the midpoint rule."""
    total, seen, out = sum(sizes), 0, []
    for size in sizes:
        out.append(FO if seen + size / 2 < fo_ratio * total else ZO)
        seen += size
    return out


def intra_layer_labels(fo_ratio: float, layer_pattern: str = LAYER_PATTERN,
                       unindexed: str = ZO) -> Callable[[Any], Any]:
    """Labels with about ``fo_ratio`` of each layer's parameters first-order
    (see the module doc for the rule). ``fo_ratio`` in ``(0, 1)``."""
    if not 0 < fo_ratio < 1:
        raise ValueError(f"fo_ratio must be in (0, 1), got {fo_ratio!r}")
    _check_label("unindexed", unindexed)

    def labels(params):
        index = _layer_indices(params, layer_pattern)
        paths = leaf_paths(params)
        sizes = [leaf.size for leaf in jax.tree_util.tree_leaves(params)]
        out = [unindexed] * len(index)
        for layer in {i for i in index if i is not None}:
            members = sorted((paths[j], j) for j, i in enumerate(index) if i == layer)
            split = _intra_layer_split([sizes[j] for _, j in members], fo_ratio)
            for (_, j), label in zip(members, split):
                out[j] = label
        return _labels_tree(params, out)

    return labels


def _resolve(labels, params):
    tree = labels(params) if callable(labels) else labels
    flat = jax.tree_util.tree_structure(params).flatten_up_to(tree)
    for path, label in zip(leaf_paths(params), flat):
        if label not in (FO, ZO):
            raise ValueError(f"labels must be {FO!r} or {ZO!r} for every leaf; "
                             f"{path!r} has {label!r}")
    return tree


def split_by_label(params: Any, labels: Any) -> tuple[Any, Any]:
    """``(fo, zo)``: two trees shaped like ``params`` in which the leaves of the
    other label are ``optax.MaskedNode()``. ``labels``: a tree of ``"fo"`` /
    ``"zo"`` or a function of ``params`` returning one."""
    tree = _resolve(labels, params)
    masked = optax.MaskedNode()
    return (jax.tree_util.tree_map(lambda x, lab: x if lab == FO else masked, params, tree),
            jax.tree_util.tree_map(lambda x, lab: x if lab == ZO else masked, params, tree))


def merge_labels(fo: Any, zo: Any) -> Any:
    """Inverse of :func:`split_by_label`: each leaf from the tree where it is
    not masked."""
    is_masked = lambda x: isinstance(x, optax.MaskedNode)
    return jax.tree_util.tree_map(lambda a, b: b if is_masked(a) else a, fo, zo,
                                  is_leaf=is_masked)


def loho_value_and_grad(loss_fn: Callable[..., jax.Array], labels: Any, eps: float = 1e-3,
                        num_directions: int = 1) -> Callable[..., tuple[jax.Array, Any]]:
    """LoHO's gradient tree: exact on ``"fo"`` leaves, SPSA on ``"zo"`` leaves.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      labels: a tree of ``"fo"``/``"zo"`` shaped like the parameters, or a
        function of the parameters returning one (:func:`inter_layer_labels`,
        :func:`intra_layer_labels`).
      eps, num_directions: of the zeroth-order part (:func:`spsa_value_and_grad`).

    Returns:
      ``value_and_grad(params, *args, rng) -> (loss, grads)``; ``loss`` is
      ``L(theta)`` from the first-order pass (with no ``"fo"`` leaf, the mean
      of the SPSA evaluations, as in :func:`spsa_value_and_grad`); the SPSA part uses ``rng``
      exactly as ``spsa_value_and_grad`` does on the ``"zo"`` subtree (the
      ``"zo"`` half of :func:`split_by_label`), so the two agree for a key.
    """
    eps = check_eps(eps)
    num_directions = check_num_directions(num_directions)

    def value_and_grad(params, *args):
        if not args:
            raise TypeError("value_and_grad(params, *args, rng): the PRNG key comes last")
        *args, rng = args
        fo, zo = split_by_label(params, labels)
        # An empty part costs no pass: all "zo" is MeZO, all "fo" backprop.
        if not jax.tree_util.tree_leaves(zo):
            return jax.value_and_grad(lambda f: loss_fn(merge_labels(f, zo), *args))(fo)
        zo_value, zo_grad = spsa_estimate(lambda z: loss_fn(merge_labels(fo, z), *args), zo,
                                          rng, eps, num_directions)
        if not jax.tree_util.tree_leaves(fo):
            return zo_value, merge_labels(fo, zo_grad)
        loss, fo_grad = jax.value_and_grad(lambda f: loss_fn(merge_labels(f, zo), *args))(fo)
        return loss, merge_labels(fo_grad, zo_grad)

    return value_and_grad


def loho(fo_optimizer: optax.GradientTransformation, zo_optimizer: optax.GradientTransformation,
         labels: Any) -> optax.GradientTransformationExtraArgs:
    """``optax.partition({"fo": fo_optimizer, "zo": zo_optimizer}, labels)``:
    the optimizer that consumes :func:`loho_value_and_grad`'s gradients."""
    return optax.partition({FO: fo_optimizer, ZO: zo_optimizer}, labels)
