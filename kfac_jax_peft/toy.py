"""A small LoRA transformer encoder and a synthetic task, built in.

Used by the demo, the benchmarks and the tests: no downloads. The frozen
base is a randomly initialised pre-LayerNorm encoder; LoRA
(:class:`~kfac_jax_peft.peft.PEFTDense`) adapts the query and value
projections; a dense head classifies the first token.
Split the trainable LoRA and head weights from the frozen base with
:func:`kfac_jax_peft.peft.split_trainable`. Labels come from a *teacher*,
the same network with a random non-zero LoRA update and its own head, so
the task is realisable by the student's trainable parameters and training
loss can go to (near) zero.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kfac_jax_peft.capture import KFACDense
from kfac_jax_peft.kfac.layers import path_str
from kfac_jax_peft.peft import LoRAConfig, PEFTDense


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    vocab_size: int = 64
    hidden: int = 32
    heads: int = 4
    layers: int = 2
    mlp: int = 64
    rank: int = 4
    alpha: float = 8.0
    num_labels: int = 2
    max_len: int = 16


class Block(nn.Module):
    cfg: ToyConfig

    @nn.compact
    def __call__(self, x, mask):
        c = self.cfg
        hd = c.hidden // c.heads
        h = nn.LayerNorm(name="ln1")(x)
        lora = LoRAConfig(rank=c.rank, alpha=c.alpha, targets=("query", "value"))
        q = PEFTDense(c.hidden, lora=lora, name="query")(h, mask)
        k = nn.Dense(c.hidden, name="key")(h)
        v = PEFTDense(c.hidden, lora=lora, name="value")(h, mask)
        split = lambda t: t.reshape(t.shape[:2] + (c.heads, hd))  # noqa: E731
        s = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / np.sqrt(hd)
        s = jnp.where(mask[:, None, None, :] > 0, s, -1e9)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), split(v))
        x = x + nn.Dense(c.hidden, name="out")(o.reshape(x.shape))
        h = nn.LayerNorm(name="ln2")(x)
        return x + nn.Dense(c.hidden, name="fc2")(nn.gelu(nn.Dense(c.mlp, name="fc1")(h)))


class ToyEncoder(nn.Module):
    """Token ids ``[B, T]`` and mask ``[B, T]`` -> logits ``[B, num_labels]``."""

    cfg: ToyConfig

    @nn.compact
    def __call__(self, ids, mask):
        c = self.cfg
        x = nn.Embed(c.vocab_size, c.hidden, name="embed")(ids)
        x = x + self.param("pos", nn.initializers.normal(0.02), (c.max_len, c.hidden))[
            : ids.shape[1]]
        for i in range(c.layers):
            x = Block(c, name=f"layer_{i}")(x, mask)
        x = nn.LayerNorm(name="ln_f")(x)
        return KFACDense(c.num_labels, name="classifier")(x[:, 0])


def init(cfg: ToyConfig, seed: int = 0, batch_shape=(2, 8)) -> dict[str, Any]:
    ids = jnp.zeros(batch_shape, jnp.int32)
    return ToyEncoder(cfg).init(jax.random.key(seed), ids, jnp.ones(batch_shape))


def make_teacher(cfg: ToyConfig, variables, seed: int = 1, scale: float = 0.5):
    """Variables of the teacher: random LoRA ``B`` and head on the same base."""
    key = jax.random.key(seed)

    def perturb(path, x):
        nonlocal key
        p = path_str(path)
        if "lora_B" in p or "classifier" in p or "lora_A" in p:
            key, sub = jax.random.split(key)
            return jax.random.normal(sub, x.shape) * scale * (3.0 if "classifier" in p else 1.0)
        return x

    params = jax.tree_util.tree_map_with_path(perturb, variables["params"])
    return {"params": params}


def make_dataset(cfg: ToyConfig, teacher, n: int, seed: int = 0, min_len: int = 4):
    """``n`` examples: random ids, random lengths (padding masked), teacher labels."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, size=(n, cfg.max_len)).astype(np.int32)
    lengths = rng.integers(min_len, cfg.max_len + 1, size=n)
    mask = (np.arange(cfg.max_len)[None] < lengths[:, None]).astype(np.float32)
    ids = ids * mask.astype(np.int32)
    logits = ToyEncoder(cfg).apply(teacher, jnp.asarray(ids), jnp.asarray(mask))
    labels = np.asarray(jnp.argmax(logits, -1), np.int32)
    return {"ids": ids, "mask": mask, "labels": labels}


def batches(data, batch_size: int, steps: int, seed: int = 0):
    """``steps`` shuffled mini-batches (reshuffled every epoch)."""
    n = len(data["labels"])
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = rng.permutation(n), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        yield {k: jnp.asarray(v[idx]) for k, v in data.items()}
