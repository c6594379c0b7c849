"""The built-in comparison: AdamW against K-FAC with Newton-step clipping.

Trains the LoRA parameters of :mod:`kfac_jax_peft.toy`'s encoder on its
teacher task with each optimizer for the same number of steps and prints
the final training loss, the steps K-FAC needs to reach AdamW's final loss,
and the time per step. Everything is embedded; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kfac_jax_peft import toy
from kfac_jax_peft.capture import kfac_value_and_grad
from kfac_jax_peft.clipping import clipped
from kfac_jax_peft.curves import smooth, steps_to_reach
from kfac_jax_peft.kfac.transform import kfac_precondition
from kfac_jax_peft.peft import merge_trainable, split_trainable


@dataclasses.dataclass(frozen=True)
class RunConfig:
    optimizer: str = "kfac"  # "adamw" | "kfac"
    learning_rate: float = 0.1
    clip: str = "post"  # "post" | "pre" | "none"
    max_norm: float = 1.0
    damping: float = 1e-3
    invert_every: int = 1
    stats_every: int = 1
    weight_decay: float = 1e-4
    steps: int = 200
    batch_size: int = 32


def build_tx(rc: RunConfig) -> optax.GradientTransformation:
    """The optimizer chain of one arm (learning rate included)."""
    if rc.optimizer == "adamw":  # gradient clipping
        return optax.chain(clipped(optax.identity(), "pre", rc.max_norm),
                           optax.adamw(rc.learning_rate, weight_decay=rc.weight_decay))
    return optax.chain(clipped(kfac_precondition(rc.damping, invert_every=rc.invert_every),
                               rc.clip, rc.max_norm),
                       optax.add_decayed_weights(rc.weight_decay),
                       optax.scale_by_learning_rate(rc.learning_rate))


def make_steps(cfg: toy.ToyConfig, frozen, probes, tx,
               prepare_probes: Callable | None = None) -> tuple[Callable, Callable]:
    """``(stats_step, plain_step)``, both ``(trainable, opt_state, batch) ->
    (trainable, opt_state, loss)`` and jitted; ``prepare_probes(probes,
    opt_state)`` runs before the capture of a statistics step (EKFAC's
    :func:`~kfac_jax_peft.ekfac_probes`)."""
    model = toy.ToyEncoder(cfg)

    def loss_fn(trainable, probes, batch):
        variables = {"params": merge_trainable(trainable, frozen)}
        if probes is not None:
            variables["kfac"] = probes
        logits = model.apply(variables, batch["ids"], batch["mask"])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]))

    grad_stats = kfac_value_and_grad(loss_fn)

    @jax.jit
    def stats_step(trainable, opt_state, batch):
        pr = probes if prepare_probes is None else prepare_probes(probes, opt_state)
        loss, grads, stats = grad_stats(trainable, pr, batch)
        updates, opt_state = tx.update(grads, opt_state, trainable, kfac_stats=stats)
        return optax.apply_updates(trainable, updates), opt_state, loss

    @jax.jit
    def plain_step(trainable, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, None, batch)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return stats_step, plain_step


def train(rc: RunConfig, cfg: toy.ToyConfig | None = None, data=None, seed: int = 0):
    """Train one arm; returns ``(losses, seconds_per_step, final trainable)``."""
    cfg = cfg or toy.ToyConfig()
    variables = toy.init(cfg, seed=seed)
    if data is None:
        teacher = toy.make_teacher(cfg, variables)
        data = toy.make_dataset(cfg, teacher, 1024, seed=seed)
    trainable, frozen = split_trainable(variables["params"])
    tx = build_tx(rc)
    opt_state = tx.init(trainable)
    stats_step, plain_step = make_steps(cfg, frozen, variables["kfac"], tx)
    losses, t0 = [], None
    for i, batch in enumerate(toy.batches(data, rc.batch_size, rc.steps, seed)):
        use_stats = rc.optimizer == "kfac" and i % rc.stats_every == 0
        step = stats_step if use_stats else plain_step
        trainable, opt_state, loss = step(trainable, opt_state, batch)
        losses.append(loss)  # stays on device: no host sync inside the loop
        if i == 1:  # both traces compiled: time from here
            jax.block_until_ready(loss)
            t0 = time.perf_counter()
    jax.block_until_ready(trainable)
    dt = (time.perf_counter() - t0) / max(1, rc.steps - 2) if t0 else float("nan")
    return np.asarray(jax.device_get(losses), np.float64), dt, trainable


# Tuned on the built-in task (200 steps): AdamW over lr {3e-3, 1e-2, 3e-2};
# K-FAC + Newton-step clip over lr {0.1, 0.3, 1}, damping {1e-3, 1e-2, 1e-1},
# max norm {0.3, 1, 3}. The no-clip and pre-clip arms reuse K-FAC's values,
# as in the paper's Fig. 4.
ARMS = {
    "AdamW (grad clip)": RunConfig(optimizer="adamw", learning_rate=1e-2, max_norm=1.0),
    "K-FAC, no clip": RunConfig(clip="none", learning_rate=0.3, damping=1e-2),
    "K-FAC, pre-clip": RunConfig(clip="pre", learning_rate=0.3, damping=1e-2, max_norm=1.0),
    "K-FAC, Newton-step clip": RunConfig(clip="post", learning_rate=0.3, damping=1e-2,
                                         max_norm=1.0),
}


def check_args(steps: int, seed: int, plot: str | None = None) -> None:
    """Refuse arguments the demo cannot use, before it trains: ``steps`` >= 1
    (the table reads each arm's last loss), ``seed`` >= 0 (numpy's
    generators), ``plot`` in an existing folder (found out only after
    training otherwise). Raises ``ConfigError`` naming the flag."""
    import os

    from kfac_jax_peft.finetune.config import ConfigError

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError("--steps", f"must be an integer >= 1, got {steps!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError("--seed", f"must be an integer >= 0, got {seed!r}")
    folder = os.path.dirname(os.path.abspath(plot)) if plot else None
    if folder is not None and not os.path.isdir(folder):
        raise ConfigError("--plot", f"must be in an existing folder, got {plot!r}")


def compare(steps: int = 200, arms=None, seed: int = 0) -> list[dict]:
    """Run every arm on the same data; rows of the comparison table."""
    check_args(steps, seed)
    arms = arms or ARMS
    cfg = toy.ToyConfig()
    variables = toy.init(cfg, seed=seed)
    data = toy.make_dataset(cfg, toy.make_teacher(cfg, variables), 1024, seed=seed)
    runs = {name: train(dataclasses.replace(rc, steps=steps), cfg, data, seed)
            for name, rc in arms.items()}
    ref = next(iter(runs))
    target = float(smooth(runs[ref][0])[-1])
    rows = []
    for name, (losses, dt, _) in runs.items():
        rows.append({"arm": name, "final_loss": float(smooth(losses)[-1]),
                     "steps_to_ref": steps_to_reach(np.arange(1, len(losses) + 1), losses,
                                                    target, window=10),
                     "ms_per_step": 1e3 * dt,
                     "time_ratio": dt / runs[ref][1],
                     "losses": losses})
    return rows


def plot(rows: list[dict], out: str) -> str:
    """Smoothed training loss of every arm against step and against
    wall-clock (step x measured seconds per step), written to ``out``."""
    from kfac_jax_peft.finetune.plots import plot_curves

    curves = {}
    for r in rows:
        steps = np.arange(1, len(r["losses"]) + 1)
        curves[r["arm"]] = {"step": steps.tolist(), "loss": smooth(r["losses"]).tolist(),
                            "wall_clock": (steps * r["ms_per_step"] / 1e3).tolist()}
    return plot_curves(curves, out, title="built-in task: LoRA training loss")


def format_table(rows: list[dict], ref_name: str) -> str:
    head = f"{'arm':28s} {'final loss':>10s} {'steps to ' + ref_name + ' final':>22s} " \
           f"{'ms/step':>8s} {'x ' + ref_name:>9s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        reach = "-" if r["steps_to_ref"] is None else str(r["steps_to_ref"])
        lines.append(f"{r['arm']:28s} {r['final_loss']:10.4f} {reach:>22s} "
                     f"{r['ms_per_step']:8.2f} {r['time_ratio']:9.2f}")
    return "\n".join(lines)
