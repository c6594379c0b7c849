"""SGD, EF, iEF and natural-gradient update fields on 2-D least squares.

The picture of Figure 1 of the iEF paper's supporting material (after
Kunstner et al. 2019): a linear regression ``z = theta_0 x + theta_1`` on a
few noisy points, loss ``mean_n (z_n - y_n)^2 / 2``. For a grid of
parameters it draws the direction of each update (arrows of unit length
over the loss contours) and a few trajectories of each method:

* SGD: the gradient ``g``;
* NGD: ``(F + lambda/N I)^-1 g`` with the exact Fisher ``F`` (the Hessian
  here), which points at the minimum from everywhere;
* iEF: :func:`kfac_jax_peft.fisher.ief_precondition`, identical to NGD on least squares
  (the residual scale ``s_n = r_n^2`` cancels in ``J^T S^-1 J = X^T X``);
* EF: :func:`kfac_jax_peft.fisher.ef_precondition`, whose ``sum_n r_n^2 x_n x_n^T``
  weights the examples by their squared residuals and bends the field.

Everything runs in float64. Usage::

    python examples/ef_least_squares.py [--out ef_least_squares.png]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kfac_jax_peft import fisher

METHODS = ("sgd", "ngd", "ief", "ef")
TITLES = {"sgd": "SGD", "ngd": "NGD (Fisher)", "ief": "iEF (= NGD)", "ef": "EF"}
# step sizes of the trajectories (per method: the updates differ in scale)
LEARNING_RATES = {"sgd": 0.15, "ngd": 0.3, "ief": 0.3, "ef": 0.3}


def make_data(n: int = 16, seed: int = 0):
    """Features ``[x, 1]`` ``[n, 2]`` (x off-centre, so the Hessian is skewed) and
    targets ``y = 2x - 1 + noise``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(1.5, 1.0, size=n)
    y = 2.0 * x - 1.0 + 0.8 * rng.normal(size=n)
    return np.stack([x, np.ones(n)], 1), y


def model_fn(theta, X, y):
    del y
    return (X @ theta)[:, None]  # one Gaussian output per example


def loss_fn(z, X, y):
    del X
    return 0.5 * (z[:, 0] - y) ** 2


def directions(theta, X, y, damping: float = 1e-7) -> dict:
    """The four update directions (before the learning rate) at ``theta``."""
    vg = fisher.per_sample_value_and_grad(model_fn, loss_fn, fisher_type="ief")
    _, g, extras = vg(theta, X, y)
    out = {"sgd": g}
    for name, tx in (("ef", fisher.ef_precondition(damping)),
                     ("ief", fisher.ief_precondition(damping))):
        out[name] = tx.update(g, tx.init(theta), theta, **extras)[0]
    fvp = fisher.fisher_vector_product(model_fn, theta, X, y, likelihood="gaussian")
    F = jnp.stack([fvp(e) for e in jnp.eye(theta.shape[0], dtype=theta.dtype)], 1)
    n = X.shape[0]
    out["ngd"] = jnp.linalg.solve(F + damping / n * jnp.eye(F.shape[0], dtype=F.dtype), g)
    return out


def update_fields(thetas, X, y, damping: float = 1e-7) -> dict:
    """``{method: [M, 2]}`` directions at the ``[M, 2]`` parameter points."""
    fn = jax.jit(jax.vmap(lambda t: directions(t, X, y, damping)))
    return {k: np.asarray(v) for k, v in fn(jnp.asarray(thetas)).items()}


@functools.partial(jax.jit, static_argnames=("method", "steps"))
def trajectory(start, method: str, X, y, steps: int, lr: float, damping: float = 1e-7):
    """``[steps + 1, 2]`` iterates of ``theta <- theta - lr * direction``."""

    def step(t, _):
        t = t - lr * directions(t, X, y, damping)[method]
        return t, t

    start = jnp.asarray(start, X.dtype)
    _, path = jax.lax.scan(step, start, None, length=steps)
    return jnp.concatenate([start[None], path])


def loss_grid(T0, T1, X, y):
    z = T0[..., None] * X[:, 0] + T1[..., None] * X[:, 1]
    return np.mean(0.5 * (z - y) ** 2, -1)


def main(argv=None) -> dict:
    """Draw the figure; returns the update fields (for tests)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="ef_least_squares.png")
    ap.add_argument("--grid", type=int, default=15, help="arrows per axis")
    ap.add_argument("--steps", type=int, default=25, help="steps per trajectory")
    ap.add_argument("--damping", type=float, default=1e-7)
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with jax.enable_x64(True):
        X, y = make_data()
        X, y = jnp.asarray(X), jnp.asarray(y)
        opt = np.linalg.lstsq(np.asarray(X), np.asarray(y), rcond=None)[0]
        lo, hi = opt - 3.0, opt + 3.0
        g0 = np.linspace(lo[0], hi[0], args.grid)
        g1 = np.linspace(lo[1], hi[1], args.grid)
        T0, T1 = np.meshgrid(g0, g1)
        thetas = np.stack([T0.ravel(), T1.ravel()], 1)
        fields = update_fields(thetas, X, y, args.damping)
        starts = [opt + np.array(d) for d in ([-2.5, 2.5], [2.5, 2.0], [-2.0, -2.5],
                                               [2.5, -2.5])]
        paths = {m: [np.asarray(trajectory(s, m, X, y, args.steps, LEARNING_RATES[m],
                                           args.damping)) for s in starts] for m in METHODS}
        c0, c1 = np.meshgrid(np.linspace(lo[0], hi[0], 100), np.linspace(lo[1], hi[1], 100))
        L = loss_grid(c0, c1, np.asarray(X), np.asarray(y))

    fig, axes = plt.subplots(1, 5, figsize=(22, 4.4))
    xs = np.asarray(X)[:, 0]
    axes[0].scatter(xs, np.asarray(y), s=14, c="k")
    xx = np.linspace(xs.min(), xs.max(), 10)
    axes[0].plot(xx, opt[0] * xx + opt[1], "r-", lw=1)
    axes[0].set_title("data and least-squares fit")
    axes[0].set_xlabel("x")
    axes[0].set_ylabel("y")
    colors = ["tab:red", "tab:green", "tab:purple", "tab:orange"]
    for ax, m in zip(axes[1:], METHODS):
        ax.contour(c0, c1, L, levels=np.quantile(L, np.linspace(0.02, 0.9, 12)),
                   colors="0.75", linewidths=0.7)
        d = -fields[m]
        nrm = np.linalg.norm(d, axis=1, keepdims=True)
        d = d / np.where(nrm > 0, nrm, 1.0)
        ax.quiver(thetas[:, 0], thetas[:, 1], d[:, 0], d[:, 1], angles="xy", pivot="mid",
                  scale=args.grid * 1.4, width=0.004, color="tab:blue")
        for p, c in zip(paths[m], colors):
            ax.plot(p[:, 0], p[:, 1], "-o", ms=2, lw=1.2, color=c)
        ax.plot(*opt, "k*", ms=10)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_title(f"{TITLES[m]} (lr {LEARNING_RATES[m]})")
        ax.set_xlabel("slope")
        ax.set_ylabel("intercept")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    print(f"wrote {args.out}")
    return fields


if __name__ == "__main__":
    main()
