"""Where a run's arrays live: every device decision of the loop is here.

:class:`Placement` compiles the step functions of
:mod:`kfac_jax_peft.finetune.steps` with ``jit`` on one device, or with
``pmap`` over ``n`` local devices, and moves trees between the host and
that layout: ``put`` (replicate a state), ``get`` (one replica back to the
host), ``shard`` (split a global batch into ``n`` equal shards),
``unshard`` and ``scalar`` for what comes back. Every argument of a
compiled function is either replicated or sharded along its leading axis,
so the ``pmap`` needs no ``in_axes``; the loop never looks at the layout.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from kfac_jax_peft.finetune.config import PER_SAMPLE, TrainConfig
from kfac_jax_peft.finetune.steps import all_finite

#: The data-parallel axis of the pmapped steps.
AXIS = "devices"


class Placement:
    """One device (``n == 1``, ``jit``) or ``n`` local devices (``pmap``)."""

    def __init__(self, n: int):
        self.n = n
        self.devices = jax.local_devices()[:n]
        self._replicate = None if n == 1 else jax.pmap(lambda x: x, devices=self.devices)
        self._finite = self.compile(all_finite)

    @property
    def axis_name(self) -> str | None:
        """The axis name the steps reduce over (``None`` on one device)."""
        return None if self.n == 1 else AXIS

    def compile(self, fn: Callable, donate_argnums: tuple[int, ...] = ()) -> Callable:
        if self.n == 1:
            return jax.jit(fn, donate_argnums=donate_argnums)
        return jax.pmap(fn, AXIS, devices=self.devices, donate_argnums=donate_argnums)

    def put(self, tree):
        if self.n == 1:
            return jax.device_put(tree)
        return self._replicate(jax.tree_util.tree_map(
            lambda x: np.broadcast_to(np.asarray(x), (self.n,) + np.shape(x)), tree))

    def get(self, tree):
        if self.n == 1:
            return jax.device_get(tree)
        return jax.device_get(jax.tree_util.tree_map(lambda x: x[0], tree))

    def shard(self, batch: dict) -> dict:
        if self.n == 1:
            return batch
        return {k: v.reshape((self.n, v.shape[0] // self.n) + v.shape[1:])
                for k, v in batch.items()}

    def unshard(self, x) -> np.ndarray:
        x = np.asarray(x)
        return x if self.n == 1 else x.reshape((-1,) + x.shape[2:])

    def scalar(self, x) -> float:
        x = np.asarray(x)
        return float(x if self.n == 1 else x[0])

    def finite(self, tree) -> bool:
        """Whether every element of a placed tree is finite: one reduction on
        the device(s), one boolean transferred."""
        return bool(self.scalar(self._finite(tree)))


def num_devices(cfg: TrainConfig) -> int:
    """How many local devices a run of ``cfg`` trains on (checked)."""
    available = jax.local_device_count()
    n = available if cfg.devices == 0 else cfg.devices
    if n > 1 and (cfg.optimizer in PER_SAMPLE or cfg.log_gamma):
        raise ValueError(f"optimizer={cfg.optimizer!r}, log_gamma={cfg.log_gamma}: the "
                         "per-sample-gradient steps and diagnostics run on one device "
                         "(devices=1)")
    if n > available:
        raise ValueError(f"devices={n} but only {available} local devices are available")
    for name in ("batch_size", "eval_batch_size"):
        value = getattr(cfg, name) or cfg.batch_size
        if value % n:
            raise ValueError(f"{name}={value} is not divisible by the {n} devices")
    return n
