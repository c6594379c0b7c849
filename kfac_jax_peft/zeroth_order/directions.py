"""Random directions regenerated from a key, and perturbations along them.

A direction ``z ~ N(0, I)`` over a parameter tree is drawn leaf by leaf: the
key is split into one key per leaf (in ``jax.tree_util`` flattening order)
and each leaf gets ``jax.random.normal`` of its own shape, drawn in float32
and cast to the leaf's dtype where it is combined with the leaf.

Nothing here stores ``z``. Every function that needs it draws it again from
the same key, so a zeroth-order step keeps a key (two uint32) instead of a
parameter-sized array between its forward passes. Two trees with the same
leaves in the same order (for example a subtree whose other leaves are
``optax.MaskedNode``) get the same directions from the same key.

``scale`` (an optional tree like the parameters) multiplies the direction
leaf by leaf: HiZOO perturbs along ``Sigma^{1/2} z`` with ``scale =
Sigma^{1/2}``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def leaf_keys(key: jax.Array, tree: Any) -> list[jax.Array]:
    """One key per leaf of ``tree``, in flattening order."""
    n = len(jax.tree_util.tree_leaves(tree))
    return list(jax.random.split(key, max(n, 1)))[:n]


def normal_like(key: jax.Array, tree: Any) -> Any:
    """``z ~ N(0, I)`` with the structure and shapes of ``tree``, float32."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = leaf_keys(key, tree)
    z = [jax.random.normal(k, jnp.shape(x), jnp.float32) for k, x in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(treedef, z)


def perturb(tree: Any, key: jax.Array, step, scale: Any = None) -> Any:
    """``tree + step * scale * z`` with ``z`` drawn from ``key``; each leaf
    keeps its dtype (the sum is formed in float32)."""
    z = normal_like(key, tree)
    if scale is None:
        return jax.tree_util.tree_map(
            lambda x, d: (x.astype(jnp.float32) + step * d).astype(x.dtype), tree, z)
    return jax.tree_util.tree_map(
        lambda x, d, s: (x.astype(jnp.float32) + step * s * d).astype(x.dtype), tree, z, scale)


def scaled_direction(tree: Any, key: jax.Array, coeff, scale: Any = None) -> Any:
    """``coeff * scale * z`` in float32, shaped like ``tree`` (whose values
    are not used)."""
    z = normal_like(key, tree)
    if scale is None:
        return jax.tree_util.tree_map(lambda d: coeff * d, z)
    return jax.tree_util.tree_map(lambda d, s: coeff * s * d, z, scale)


def check_eps(eps) -> float:
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    return float(eps)


def check_num_directions(num_directions) -> int:
    if int(num_directions) != num_directions or num_directions < 1:
        raise ValueError(f"num_directions must be an integer >= 1, got {num_directions!r}")
    return int(num_directions)
