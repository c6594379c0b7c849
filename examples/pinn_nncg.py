"""Adam, then L-BFGS, then NysNewton-CG on a 1-D Poisson PINN.

The schedule of Rathore et al. 2024 ("Challenges in training PINNs"):
Adam to get into a good basin, L-BFGS (``optax.lbfgs``, zoom line search)
to descend fast, and NysNewton-CG (:func:`kfac_jax_peft.nys_newton_cg`) when
L-BFGS stalls, since a PINN must be trained to near-zero loss before its
solution is accurate. The problem::

    -u''(x) = f(x) on (0, 1),  u(0) = u(1) = 0,
    u*(x) = sin(2 pi x) + 0.1 sin(8 pi x),  f = -u*''

with ``u`` a tanh MLP (1 -> width -> width -> 1), and the PINN loss (the
source's, mean squares halved)::

    L = 1/(2 n_res) sum_i (u''(x_i) + f(x_i))^2 + 1/(2 n_bc) sum_b u(x_b)^2

on ``n_res`` evenly spaced interior points. Everything runs in float64 (as
PINN training usually does: in float32 the loss stalls at rounding level).
It prints the loss after each phase and the relative L2 error of ``u``
against ``u*`` on a fine grid. Usage::

    python examples/pinn_nncg.py             # full size (about a minute on a CPU)
    python examples/pinn_nncg.py --smoke     # seconds: the test's size
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import kfac_jax_peft as kp

FULL = dict(width=32, n_res=128, adam_steps=2000, lbfgs_steps=1000, nncg_steps=100)
SMOKE = dict(width=16, n_res=32, adam_steps=1000, lbfgs_steps=300, nncg_steps=20)


def exact(x):
    return jnp.sin(2 * jnp.pi * x) + 0.1 * jnp.sin(8 * jnp.pi * x)


def forcing(x):
    """``f = -u*''``."""
    return (2 * jnp.pi) ** 2 * jnp.sin(2 * jnp.pi * x) + 0.1 * (8 * jnp.pi) ** 2 * jnp.sin(
        8 * jnp.pi * x)


def init_mlp(key, width: int):
    sizes = [1, width, width, 1]
    keys = jax.random.split(key, len(sizes) - 1)
    return [{"w": jax.random.normal(k, (m, n)) * jnp.sqrt(1.0 / m), "b": jnp.zeros(n)}
            for k, m, n in zip(keys, sizes[:-1], sizes[1:])]


def mlp(params, x):
    """``u(x)`` for a scalar ``x``."""
    h = jnp.reshape(x, (1,))
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    return (h @ params[-1]["w"] + params[-1]["b"])[0]


def make_loss(n_res: int):
    x_res = jnp.linspace(0.0, 1.0, n_res + 2)[1:-1]
    x_bc = jnp.array([0.0, 1.0])
    f = forcing(x_res)

    def loss(params):
        u_xx = jax.vmap(jax.grad(jax.grad(lambda x: mlp(params, x))))(x_res)
        u_b = jax.vmap(lambda x: mlp(params, x))(x_bc)
        return 0.5 * jnp.mean((u_xx + f) ** 2) + 0.5 * jnp.mean(u_b ** 2)

    return loss


def relative_error(params) -> float:
    x = jnp.linspace(0.0, 1.0, 1001)
    u = jax.vmap(lambda t: mlp(params, t))(x)
    return float(jnp.linalg.norm(u - exact(x)) / jnp.linalg.norm(exact(x)))


def run_adam(loss, params, steps: int, learning_rate: float = 1e-3):
    tx = optax.adam(learning_rate)

    def step(carry, _):
        p, s = carry
        v, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), v

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return params


def run_lbfgs(loss, params, steps: int):
    tx = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry, _):
        p, s = carry
        v, g = value_and_grad(p, state=s)
        u, s = tx.update(g, s, p, value=v, grad=g, value_fn=loss)
        return (optax.apply_updates(p, u), s), v

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return params


def run_nncg(loss, params, steps: int, *, rank: int, mu: float):
    tx = kp.nys_newton_cg(rank=rank, mu=mu, precondition_every=20)

    def step(carry, _):
        p, s = carry
        v, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p, value=v, value_fn=loss)
        return (optax.apply_updates(p, u), s), (v, s.step_size, s.cg_iterations)

    (params, state), trace = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return params, state, trace


def run(*, width: int, n_res: int, adam_steps: int, lbfgs_steps: int, nncg_steps: int,
        rank: int = 60, mu: float = 0.3, seed: int = 0, verbose: bool = True) -> dict:
    """The three phases; returns the loss and relative L2 error after each."""
    out = {}
    with jax.enable_x64(True):
        loss = jax.jit(make_loss(n_res))
        params = init_mlp(jax.random.PRNGKey(seed), width)
        phases = (("adam", lambda p: run_adam(loss, p, adam_steps)),
                  ("adam+lbfgs", lambda p: run_lbfgs(loss, p, lbfgs_steps)),
                  ("adam+lbfgs+nncg", lambda p: run_nncg(
                      loss, p, nncg_steps, rank=min(rank, _size(p)), mu=mu)[0]))
        for name, phase in phases:
            start = time.perf_counter()
            params = jax.block_until_ready(jax.jit(phase)(params))
            out[name] = {"loss": float(loss(params)), "l2re": relative_error(params),
                         "seconds": time.perf_counter() - start}
            if verbose:
                r = out[name]
                print(f"{name:16s} loss {r['loss']:.3e}  rel. L2 error {r['l2re']:.3e}  "
                      f"({r['seconds']:.1f} s)", flush=True)
    return out


def _size(params) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(params))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a few seconds (the test's size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rank", type=int, default=60, help="Nystrom sketch size")
    ap.add_argument("--mu", type=float, default=0.3,
                    help="NNCG damping (the best of 1e-6, 1e-3, 1e-2, 0.1, 0.3, 1 here)")
    args = ap.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    return run(**sizes, rank=args.rank, mu=args.mu, seed=args.seed)


if __name__ == "__main__":
    main()
