"""Fine-tune the LoRA adapters of a Flax NNX model with K-FAC and Newton-step clipping.

The model is a user's own NNX module: a frozen random encoder layer whose
projections are ``nnx.LoRALinear`` (only the ``nnx.LoRAParam`` adapters
train) and a trainable ``nnx.Linear`` head, on a token-classification task
with padding whose labels come from a random teacher. The K-FAC chain goes
into ``nnx.Optimizer`` as any optax chain would; the statistics reach it as
the extra argument ``kfac_stats`` of ``optimizer.update``. It prints the
training loss against plain SGD with the same clip and learning rate (1.0:
the best of {0.1, 0.3, 1.0} for both; K-FAC damping 1e-2, the best of
{1e-2, 1e-1, 1}). Measured at 60 steps, mean loss of the last 10: SGD 1.06,
K-FAC 0.61.

Usage: ``python examples/nnx_lora.py [--steps 60]``
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import kfac_jax_peft as kp

WIDTH, CLASSES, RANK = 16, 3, 4


class Encoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.query = nnx.LoRALinear(WIDTH, WIDTH, lora_rank=RANK, rngs=rngs)
        self.value = nnx.LoRALinear(WIDTH, WIDTH, lora_rank=RANK, rngs=rngs)
        self.head = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

    def __call__(self, x, mask):
        q, v = self.query(x), self.value(x)
        scores = jnp.einsum("btd,bsd->bts", q, x) / WIDTH**0.5
        scores = jnp.where(mask[:, None, :] > 0, scores, -1e9)
        h = x + jnp.einsum("bts,bsd->btd", jax.nn.softmax(scores, -1), v)
        pooled = jnp.sum(h * mask[..., None], 1) / jnp.sum(mask, 1, keepdims=True)
        return self.head(pooled)


def make_data(n: int, seed: int = 0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k1, (n, 8, WIDTH))
    lengths = jax.random.randint(k2, (n,), 3, 9)
    mask = (jnp.arange(8)[None, :] < lengths[:, None]).astype(jnp.float32)
    teacher = jax.random.normal(k3, (WIDTH, CLASSES))
    pooled = jnp.sum(x * mask[..., None], 1) / jnp.sum(mask, 1, keepdims=True)
    return x, mask, jnp.argmax(jnp.tanh(pooled) @ teacher, -1)


def loss_fn(model, x, mask, y):
    with kp.intercept_nnx(mask=mask):
        logits = model(x, mask)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train(steps: int = 60, use_kfac: bool = True, seed: int = 0) -> list[float]:
    model = Encoder(nnx.Rngs(seed))
    trainable = nnx.Any(nnx.LoRAParam, nnx.PathContains("head"))
    probes = kp.add_probes(model, wrt=trainable)
    pre = (kp.kfac_precondition(1e-2, layer_filter=kp.captured_layers(probes)) if use_kfac
           else optax.identity())
    tx = optax.chain(kp.clipped(pre, "post", 1.0), optax.scale_by_learning_rate(1.0))
    optimizer = nnx.Optimizer(model, tx, wrt=trainable)
    grad_fn = kp.nnx_value_and_grad(loss_fn, trainable)

    @nnx.jit
    def step(model, optimizer, x, mask, y):
        loss, grads, stats = grad_fn(model, x, mask, y)
        optimizer.update(model, grads, kfac_stats=stats)
        return loss

    x, mask, y = make_data(512, seed)
    losses = []
    for i in range(steps):
        sl = slice((32 * i) % 512, (32 * i) % 512 + 32)
        losses.append(float(step(model, optimizer, x[sl], mask[sl], y[sl])))
    return losses


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args(argv)
    for name, use_kfac in (("SGD + clip", False), ("K-FAC + Newton-step clip", True)):
        losses = train(args.steps, use_kfac)
        tail = sum(losses[-10:]) / len(losses[-10:])
        print(f"{name:26s} first loss {losses[0]:.4f}  mean of last 10 {tail:.4f}")


if __name__ == "__main__":
    main()
