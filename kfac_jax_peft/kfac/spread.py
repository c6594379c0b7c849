"""Inversions spread over the devices of a mesh, and factor state sharded over it.

Under ``jax.jit`` over a device mesh every device holds the same (replicated)
factors, and left alone every device repeats every eigendecomposition or
Cholesky factorisation. :func:`map_spread` instead stacks the matrices of
one shape, pads the stack with identity matrices to a multiple of the
number of devices ``N``, and splits it over the devices (``jax.shard_map``,
the stack axis over every axis of the mesh): device ``i`` of ``N``
decomposes the ``i``-th block of about ``k / N`` of the ``k`` matrices of
that shape, and the results are gathered back onto every device (an
all-gather), since every device preconditions every layer. Each matrix is
decomposed by the same kernel as without spreading, so the results equal
the replicated ones (to the last bit on CPU, where both call LAPACK once per
matrix). This is kfac-jax's ``distributed_inverses`` and KAISA's
assignment of factors to workers, for the mesh of the user's ``jit``.

:func:`kfac_state_shardings` is the memory option: shardings that keep each
factor matrix of a :class:`~kfac_jax_peft.KFACState` (moving average,
eigenvectors, damped inverses or Cholesky factors) split by rows over a
mesh axis, ``1/N`` of it per device, where the size divides evenly (other
arrays replicated). Passed as the state's sharding to ``jax.device_put``
and as the ``out_shardings`` of the jitted step, the state stays split from
step to step; XLA gathers what a step needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def mesh_axes(option: str = "distribute_inversions") -> tuple[str, ...] | None:
    """The axes of the mesh the current trace runs under (``jax.set_mesh``),
    or None on a mesh of one device (nothing to spread: the stacking would
    only cost copies); a ``ValueError`` naming ``option`` if there is none."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        raise ValueError(f"{option}=True spreads inversions over the devices of a mesh, but "
                         "the step is traced without one: jit the step inside "
                         "`with jax.set_mesh(mesh):` (jit over a device mesh; under pmap "
                         "leave it False)")
    return tuple(mesh.axis_names) if mesh.size > 1 else None


def map_spread(fn: Callable, mats: Sequence[jnp.ndarray], over_batch: Callable,
               axes: tuple[str, ...]) -> list:
    """``[fn(m) for m in mats]``, each shape's stack split over the mesh axes.

    ``over_batch(fn, stack)`` applies ``fn`` to a local stack (batched, or
    one matrix at a time on CPU). Results are replicated, in order.
    """
    mesh = jax.sharding.get_abstract_mesh()
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    spec = P(axes)
    groups: dict = {}
    for i, m in enumerate(mats):
        groups.setdefault(m.shape, []).append(i)
    out: list = [None] * len(mats)
    for shape, idx in groups.items():
        stack = jnp.stack([mats[i] for i in idx])
        pad = -len(idx) % n  # identity matrices: every device gets an equal block
        if pad:
            eye = jnp.broadcast_to(jnp.eye(shape[-1], dtype=stack.dtype), (pad,) + shape)
            stack = jnp.concatenate([stack, eye])
        res = jax.shard_map(lambda s: over_batch(fn, s), in_specs=spec, out_specs=spec)(stack)
        res = jax.lax.with_sharding_constraint(res, P())  # gathered onto every device
        for j, i in enumerate(idx):
            out[i] = jax.tree_util.tree_map(lambda r, j=j: r[j], res)
    return out


def kfac_state_shardings(opt_state, mesh: jax.sharding.Mesh, axis: str = "data"):
    """Shardings for ``opt_state`` (any optimizer state holding a
    :class:`~kfac_jax_peft.KFACState`, or arrays of the same structure)
    that split each K-FAC factor matrix by rows over ``axis`` of ``mesh``
    where its size is a multiple of the axis size; everything else
    replicated. A tree of ``NamedSharding`` of the structure of
    ``opt_state``."""
    from kfac_jax_peft.kfac.transform import KFACState

    if axis not in mesh.axis_names:
        raise ValueError(f"axis {axis!r} is not an axis of the mesh {mesh.axis_names}")
    n = mesh.shape[axis]
    replicated = NamedSharding(mesh, P())
    rows = NamedSharding(mesh, P(axis))

    def leaf(x):
        shape = getattr(x, "shape", ())
        square = len(shape) == 2 and shape[0] == shape[1]
        return rows if square and shape[0] % n == 0 else replicated

    def sub(s):
        if isinstance(s, KFACState):
            return s._replace(
                count=replicated, last_inversion=replicated, num_inversions=replicated,
                factors=jax.tree_util.tree_map(leaf, s.factors),
                layers=jax.tree_util.tree_map(leaf, s.layers))
        return jax.tree_util.tree_map(lambda _: replicated, s)

    return jax.tree_util.tree_map(sub, opt_state, is_leaf=lambda x: isinstance(x, KFACState))
