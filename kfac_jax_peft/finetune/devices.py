"""Where a run's arrays live: every device decision of the loop is here.

:class:`Placement` is a device mesh with one axis, ``"data"``, over the
run's devices: the first ``devices`` local devices of every process (one
process; or, after :func:`initialize_distributed`, every process of the
job). The step functions of :mod:`kfac_jax_peft.finetune.steps` are
compiled by ``jax.jit`` over it (:meth:`Placement.compile`): a batch is one
global ``jax.Array`` split by rows over ``data`` (``NamedSharding(mesh,
P("data"))``); the parameters and the optimizer state are replicated, or,
with ``shard_factors``, the K-FAC factor matrices are split by rows
(:func:`kfac_jax_peft.kfac_state_shardings`). XLA partitions each step:
every device runs the forward and backward pass of its rows, and the
sums over the batch (loss, gradients, K-FAC statistics) are global, so a
step *is* the one-device step on the global batch, and the steps need no
axis name or ``pmean``. In particular the dropout masks are those of the
global batch, drawn from one key: the same seed gives the same parameters
on 1 and on N devices, up to the order of float32 sums.

Moving trees: :meth:`~Placement.put` (host values, the same on every
process, onto the mesh), :meth:`~Placement.shard` (a global host batch
onto the mesh, each process transferring only the rows of its own
devices), :meth:`~Placement.get` (back to the host: the whole value on
every process; every process must call it), :meth:`~Placement.scalar`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kfac_jax_peft.finetune.config import PER_SAMPLE, ConfigError, TrainConfig
from kfac_jax_peft.finetune.steps import TrainState, all_finite

#: The data-parallel axis of the mesh.
AXIS = "data"


class Placement:
    """The mesh of ``n`` local devices per process (axis ``"data"``).

    ``shard_factors``: keep the K-FAC factor state split over the mesh.
    """

    def __init__(self, n: int, *, shard_factors: bool = False):
        devices = [d for p in range(jax.process_count())
                   for d in sorted((d for d in jax.devices() if d.process_index == p),
                                   key=lambda d: d.id)[:n]]
        self.mesh = Mesh(np.array(devices), (AXIS,))
        self.n = len(devices)  # over all processes
        self.shard_factors = shard_factors
        self.replicated = NamedSharding(self.mesh, P())
        self.rows = NamedSharding(self.mesh, P(AXIS))
        self.main = jax.process_index() == 0
        self._finite = self.compile(all_finite, out_shardings=self.replicated)

    def compile(self, fn: Callable, donate_argnums: tuple[int, ...] = (),
                out_shardings=None) -> Callable:
        """``jax.jit(fn)`` over the mesh: traced and run inside ``jax.set_mesh``
        (so that ``kfac_precondition(distribute_inversions=True)`` sees the
        mesh). ``out_shardings``: where the results go (a prefix tree);
        ``None`` leaves the choice to XLA."""
        jitted = jax.jit(fn, donate_argnums=donate_argnums, out_shardings=out_shardings)
        mesh = self.mesh

        def call(*args):
            with jax.set_mesh(mesh):
                return jitted(*args)

        return call

    def state_shardings(self, state: TrainState) -> TrainState:
        """Where each leaf of a :class:`TrainState` lives: replicated, the
        K-FAC factor matrices split by rows with ``shard_factors``."""
        def rep(tree):
            return jax.tree_util.tree_map(lambda _: self.replicated, tree)

        if self.shard_factors:
            from kfac_jax_peft.kfac.spread import kfac_state_shardings

            opt = kfac_state_shardings(state.opt_state, self.mesh, AXIS)
        else:
            opt = rep(state.opt_state)
        return TrainState(self.replicated, rep(state.trainable), opt, self.replicated)

    def put(self, tree, shardings=None):
        """Host values (the same on every process) onto the mesh, replicated
        or with ``shardings`` (a tree of the structure of ``tree``); arrays
        already placed so are kept."""
        if shardings is None:
            shardings = jax.tree_util.tree_map(lambda _: self.replicated, tree)
        return jax.tree_util.tree_map(_put, tree, shardings)

    def shard(self, batch: dict) -> dict:
        """A global host batch as global arrays split by rows over the mesh."""
        return {k: _put(v, self.rows) for k, v in batch.items()}

    def get(self, tree):
        """Host numpy copies of placed arrays, the whole value on every process."""
        return jax.tree_util.tree_map(_get, tree)

    def scalar(self, x) -> float:
        return float(_get(x))

    def finite(self, tree) -> bool:
        """Whether every element of a placed tree is finite: one reduction on
        the devices, one boolean transferred."""
        return bool(self.scalar(self._finite(tree)))


def _put(x, sharding: NamedSharding) -> jax.Array:
    if isinstance(x, jax.Array):
        if x.sharding == sharding:
            return x
        if x.is_fully_addressable and jax.process_count() == 1:
            return jax.device_put(x, sharding)
    x = np.asarray(x)
    # each process transfers the blocks of its own devices only
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _get(x) -> np.ndarray:
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def num_devices(cfg: TrainConfig) -> int:
    """How many local devices (per process) a run of ``cfg`` trains on
    (checked: available, and the global batch split evenly over the
    devices of all processes)."""
    available = jax.local_device_count()
    n = available if cfg.devices == 0 else cfg.devices
    total = n * jax.process_count()
    if total > 1 and (cfg.optimizer in PER_SAMPLE or cfg.log_gamma):
        raise ValueError(f"optimizer={cfg.optimizer!r}, log_gamma={cfg.log_gamma}: the "
                         "per-sample-gradient steps and diagnostics run on one device "
                         "(devices=1, one process)")
    if n > available:
        raise ValueError(f"devices={n} but only {available} local devices are available")
    for name in ("batch_size", "eval_batch_size"):
        value = getattr(cfg, name) or cfg.batch_size
        if value % total:
            raise ValueError(f"{name}={value} is not divisible by the {total} devices "
                             f"({n} on each of {jax.process_count()} processes)")
    return n


#: The environment variables read by :func:`initialize_distributed`.
ENVIRONMENT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Join a multi-process job (``jax.distributed.initialize``), before any
    array is made; returns whether this process is part of one (also when
    it joined before).

    Each argument left ``None`` is read from its environment variable
    (:data:`ENVIRONMENT`); nothing is done when no coordinator address is
    given either way (one process). With an address, the process count and
    this process's id (0 .. count - 1) are required; process 0 hosts the
    coordinator. Every process then runs the same ``train``: each feeds the
    rows of the global batch that belong to its devices, the checkpoints
    are written by all together (orbax; ``output_dir`` must be one folder
    that every process sees), and the log, ``best.safetensors``,
    ``results.json`` and the progress bar come from process 0 only.
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    count = num_processes if num_processes is not None else env.get("JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else env.get("JAX_PROCESS_ID")
    if address is None:
        if count is not None or pid is not None:
            raise ConfigError("coordinator_address", "is required with num_processes and "
                              "process_id (--coordinator-address or JAX_COORDINATOR_ADDRESS)")
        return False
    if count is None or pid is None:
        raise ConfigError("num_processes" if count is None else "process_id",
                          f"is required with coordinator_address={address!r} (flag, or "
                          "JAX_NUM_PROCESSES and JAX_PROCESS_ID)")
    count, pid = _int("num_processes", count, 1), _int("process_id", pid, 0)
    if pid >= count:
        raise ConfigError("process_id", f"must be below num_processes={count}, got {pid}")
    jax.distributed.initialize(address, num_processes=count, process_id=pid)
    return True


def _int(name: str, value, low: int) -> int:
    try:
        out = int(str(value).strip())
    except ValueError:
        raise ConfigError(name, f"must be an integer >= {low}, got {value!r}") from None
    if out < low:
        raise ConfigError(name, f"must be an integer >= {low}, got {value!r}")
    return out
