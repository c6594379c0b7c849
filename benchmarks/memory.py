"""Peak memory and step time of the K-FAC chain relative to AdamW, same process, model and batch.

Two models with LoRA (rank 8, alpha 16) on the attention query and value
projections, built from configs with random weights (nothing is downloaded):

* RoBERTa (``query``/``value``), sequence classification with 2 labels and
  cross-entropy; the classification head (``dense`` + ``out_proj``) is
  trainable too, as in Hugging Face ``peft``;
* T5 v1.0 (``q``/``v``, in the encoder's self-attention and in the decoder's
  self- and cross-attention), the logits of ``T5.__call__`` with a
  token-level cross-entropy averaged over the real decoder tokens.

Sizes: ``--size small`` (default; about a minute on 2 CPU cores): RoBERTa
hidden 256, 4 layers, 4 heads, intermediate 1024, vocabulary 1000, batch
8 x 64; T5 d_model 256, d_ff 1024, 4 + 4 layers, 4 heads, vocabulary 1000,
batch 8 x 64 (encoder) and 8 x 8 (decoder). ``--size base`` (for a GPU):
RoBERTa-base (hidden 768, 12 layers, 12 heads, intermediate 3072, vocabulary
50265, batch 32 x 128) and T5-base (d_model 768, d_ff 3072, 12 + 12 layers,
12 heads, vocabulary 32128, batch 32 x 128 encoder / 32 x 8 decoder).
Sequences have random lengths between half and all of the padded length.

Optimizers, on the same trainable tree (LoRA + head), both in float32:

* ``adamw``: ``clip_by_update_norm(1.0)`` (gradient clipping) -> ``optax.adamw``;
* ``kfac``: ``kfac_precondition(damping=1e-3)`` (exact damping in the
  Kronecker eigenbasis; ``--damping-mode factored`` for the pi-adjusted
  factored inverse with Cholesky) -> ``clip_by_update_norm(1.0)`` (Newton-step
  clipping) -> ``optax.add_decayed_weights`` -> ``optax.scale_by_learning_rate``.
  Every 2-D trainable ``kernel`` is a K-FAC layer (the default filter).

Each train step is ``jax.jit(step, donate_argnums=(0, 1))``: the trainable
parameters and the optimizer state are donated, as in any real training
loop, so their outputs may reuse the input buffers. The frozen base weights,
the K-FAC probes and the batch are ordinary (non-donated) arguments.
K-FAC has two step kinds, compiled and timed separately (as in
``benchmarks/step_time.py``):

* ``kfac invert``: statistics captured in the backward pass, folded into
  the factors, and an inversion (``invert_every=1``, so every step inverts);
  this is the kind with the largest footprint;
* ``kfac plain``: ``kfac_stats=None``, multiply by the stored inverse only.

Memory, from XLA's own accounting of each compiled step (``jax.jit(step)
.lower(*args).compile().memory_analysis()``, the same on CPU and GPU)::

    peak = argument_size + output_size + temp_size - alias_size

i.e. all inputs (frozen model, trainable parameters, optimizer state, batch),
plus the outputs, minus the outputs that alias donated inputs, plus XLA's
scratch buffers (activations kept for the backward pass, gradients, K-FAC
statistics and inversion workspace). ``generated_code_size`` (the compiled
program, the same order for both optimizers) is left out. This is the
device memory the step needs while it runs, up to allocator fragmentation.
``opt state`` is the sum of ``nbytes`` over the optimizer-state leaves.
On a GPU (where ``jax.devices()[0].memory_stats()`` has
``peak_bytes_in_use``) the allocator's measured peak is printed too. It is a
process-wide high-water mark that cannot be reset: per model the arms run
in the order AdamW, K-FAC invert, K-FAC plain (the buffers of each arm are
freed before the next), and each row shows the high-water mark after that
arm, so a K-FAC row is max(AdamW, K-FAC) and a later model includes the
earlier one's peak; run ``--models roberta`` and ``--models t5`` in separate
processes for clean measured peaks.

Time: median wall time over ``--reps`` steps after one warm-up call, with
parameters and optimizer state carried from step to step and batches
rotating. ``--reps 0`` compiles and reads the memory analysis only (no step
runs, no time; the quickest way to compare memory).

K-FAC variants (``--variants``, comma-separated, each ``default`` or a
``+``-joined set of the options below; every variant gets its own invert
and plain rows against the same AdamW arm):

* ``shared``: ``input_groups`` declares the layers that read one input, so
  that they keep one input factor ``A`` (and one eigendecomposition of it):
  the ``lora_A`` of the query and value projections of each self-attention
  block (RoBERTa and T5), and the ``lora_A`` of the cross-attention value
  projections of all T5 decoder blocks, which all read the encoder output
  (rules in ``INPUT_GROUPS``). Same updates, bit for bit.
* ``curvature-only``: ``store_factors=False``, the state keeps the
  eigendecomposition of each factor and not the moving average beside it
  (exact damping only; this benchmark inverts at every statistics step,
  as that option needs). Same updates up to float round-off.

Reference, the paper's Table 1 (peak GPU memory of K-FAC relative to AdamW
for LoRA fine-tuning): 1.18x RoBERTa-large, 1.21x T5-base, 1.62x T5-XL; our
target is <= 1.10x.

Caveat on the T5 loss: K-FAC's ``G`` normalisation
(:mod:`kfac_jax_peft.capture`) assumes a loss that is a mean over the
examples of the batch; a token-level mean over real decoder tokens differs
from it by a constant factor (the average number of decoder tokens per
example), which rescales the effective damping. That changes neither memory
nor time, so it is fine for this benchmark.

On CPU the script sets ``OPENBLAS_NUM_THREADS=1`` (unless already set)
before anything loads OpenBLAS (see ``benchmarks/step_time.py`` for why).

Usage: ``python benchmarks/memory.py [--size small|base] [--reps 10]
[--models roberta,t5] [--damping-mode exact|factored]
[--variants default,shared,curvature-only,shared+curvature-only]``
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import kfac_jax_peft as kp  # noqa: E402
from kfac_jax_peft.models import roberta, t5  # noqa: E402
from kfac_jax_peft.peft import LoRAConfig, merge_trainable, split_trainable  # noqa: E402

MiB = 2.0**20

# (config, batch size, encoder length[, decoder length])
SIZES = {
    "small": {
        "roberta": (roberta.RobertaConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4,
                                          num_attention_heads=4, intermediate_size=1024),
                    8, 64, None),
        "t5": (t5.T5Config(vocab_size=1000, d_model=256, d_kv=64, d_ff=1024, num_layers=4,
                           num_heads=4), 8, 64, 8),
    },
    "base": {
        "roberta": (roberta.RobertaConfig(), 32, 128, None),  # defaults are RoBERTa-base
        "t5": (t5.T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12,
                           num_heads=12), 32, 128, 8),
    },
}
LORA_TARGETS = {"roberta": ("query", "value"), "t5": ("q", "v")}
# layers whose LoRA ``lora_A`` read one input tensor (``input_groups`` of kfac_precondition)
INPUT_GROUPS = {"roberta": roberta.INPUT_GROUPS, "t5": t5.INPUT_GROUPS}
VARIANT_OPTIONS = ("shared", "curvature-only")


def _lengths(rng, batch, length):
    lengths = rng.integers(length // 2, length + 1, batch)
    return (np.arange(length)[None] < lengths[:, None]).astype(np.int32)


def build(name, cfg, batch, enc_len, dec_len, seed=0):
    """``(loss_fn, trainable, frozen, probes, batches, description)``; ``loss_fn(
    trainable, probes, frozen, batch)`` is a mean (``probes=None``: no capture)."""
    lora = LoRAConfig(rank=8, alpha=16.0, targets=LORA_TARGETS[name])
    rng = np.random.default_rng(seed)
    if name == "roberta":
        module = roberta.RobertaClassifier(cfg, num_labels=2, lora=lora)
        variables = roberta.init_variables(module, seed)

        def make_batch():
            mask = _lengths(rng, batch, enc_len)
            ids = rng.integers(cfg.pad_token_id + 2, cfg.vocab_size, (batch, enc_len))
            ids = np.where(mask > 0, ids, cfg.pad_token_id)
            return {"ids": jnp.asarray(ids, jnp.int32), "mask": jnp.asarray(mask),
                    "labels": jnp.asarray(rng.integers(0, 2, batch), jnp.int32)}

        def loss_fn(trainable, probes, frozen, b):
            variables = {"params": merge_trainable(trainable, frozen)}
            if probes is not None:
                variables["kfac"] = probes
            logits = module.apply(variables, b["ids"], b["mask"])
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"]))

        desc = (f"RoBERTa hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, vocab "
                f"{cfg.vocab_size}, batch {batch} x {enc_len}")
    else:
        cfg = dataclasses.replace(cfg, lora=lora)
        module = t5.T5(cfg)
        variables = dict(t5.init_variables(module, jax.random.PRNGKey(seed)))

        def make_batch():
            mask = _lengths(rng, batch, enc_len)
            ids = np.where(mask > 0, rng.integers(2, cfg.vocab_size, (batch, enc_len)), 0)
            dec_mask = _lengths(rng, batch, dec_len)
            labels = np.where(dec_mask > 0, rng.integers(2, cfg.vocab_size, (batch, dec_len)), 0)
            dec_ids = t5.shift_right(jnp.asarray(labels, jnp.int32), cfg.decoder_start_token_id,
                                     cfg.pad_token_id)
            return {"ids": jnp.asarray(ids, jnp.int32), "mask": jnp.asarray(mask),
                    "dec_ids": dec_ids, "dec_mask": jnp.asarray(dec_mask),
                    "labels": jnp.asarray(labels, jnp.int32)}

        def loss_fn(trainable, probes, frozen, b):
            variables = {"params": merge_trainable(trainable, frozen)}
            if probes is not None:
                variables["kfac"] = probes
            logits = module.apply(variables, b["ids"], b["mask"], b["dec_ids"], b["dec_mask"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"])
            m = b["dec_mask"].astype(ce.dtype)
            return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)  # mean over real tokens

        desc = (f"T5 d_model {cfg.d_model}, {cfg.num_layers}+{cfg.num_decoder_layers} layers, "
                f"vocab {cfg.vocab_size}, batch {batch} x {enc_len} enc / {batch} x {dec_len} dec")

    trainable, frozen = split_trainable(variables["params"])
    # non-zero LoRA B, so that every layer has a gradient and non-trivial statistics
    trainable = jax.tree_util.tree_map(lambda x: x + 0.01, trainable)
    batches = [make_batch() for _ in range(4)]
    return loss_fn, trainable, frozen, variables["kfac"], batches, desc


def make_step(loss_fn, tx, with_stats):
    """A train step ``(trainable, opt_state, frozen, probes, batch) -> (trainable,
    opt_state, loss)``; ``with_stats`` passes K-FAC statistics to ``tx``."""
    grad_stats = kp.kfac_value_and_grad(loss_fn)

    def step(trainable, opt_state, frozen, probes, batch):
        if with_stats:
            loss, grads, stats = grad_stats(trainable, probes, frozen, batch)
            updates, opt_state = tx.update(grads, opt_state, trainable, kfac_stats=stats)
        else:
            loss, grads = jax.value_and_grad(loss_fn)(trainable, None, frozen, batch)
            updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def tree_bytes(tree) -> int:
    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(tree)))


def measured_peak():
    """The allocator's process-wide peak (bytes), or None where not reported (CPU)."""
    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


def run_arm(step, tr, state, frozen, probes, batches, reps):
    """Compile ``step`` (donating parameters and state), read XLA's memory
    analysis, then time ``reps`` steps after a warm-up. Returns ``(result
    dict, trainable, state)``, the last two carried from the final step."""
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
        tr, state, frozen, probes, batches[0]).compile()
    ma = compiled.memory_analysis()
    peak = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
            - ma.alias_size_in_bytes)
    opt_bytes = tree_bytes(state)
    res = {"peak": peak, "args": ma.argument_size_in_bytes, "temp": ma.temp_size_in_bytes,
           "code": ma.generated_code_size_in_bytes, "opt": opt_bytes,
           "measured": None, "time": None, "loss": None}
    if reps < 1:  # memory analysis only
        return res, tr, state
    tr, state, loss = jax.block_until_ready(compiled(tr, state, frozen, probes, batches[0]))
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        tr, state, loss = jax.block_until_ready(
            compiled(tr, state, frozen, probes, batches[(i + 1) % len(batches)]))
        times.append(time.perf_counter() - t0)
    res.update(measured=measured_peak(), time=statistics.median(times), loss=float(loss))
    return res, tr, state


def fresh(tree):
    """A copy with its own buffers (the steps donate their inputs)."""
    return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--models", default="roberta,t5",
                    help="comma-separated subset of roberta,t5")
    ap.add_argument("--damping-mode", choices=("exact", "factored"), default="exact")
    ap.add_argument("--variants", default="default",
                    help="comma-separated K-FAC variants: default, or '+'-joined options "
                         f"from {', '.join(VARIANT_OPTIONS)}")
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in LORA_TARGETS:
            ap.error(f"unknown model {m!r}; expected roberta and/or t5")
    variants = []
    for v in args.variants.split(","):
        opts = () if v == "default" else tuple(v.split("+"))
        bad = [o for o in opts if o not in VARIANT_OPTIONS]
        if bad or not v:
            ap.error(f"unknown variant {v!r}; expected default or '+'-joined options from "
                     f"{VARIANT_OPTIONS}")
        if "curvature-only" in opts and args.damping_mode != "exact":
            ap.error("curvature-only needs --damping-mode exact")
        variants.append((v, opts))

    adamw = optax.chain(kp.clipped(optax.identity(), "pre", 1.0),
                        optax.adamw(1e-3, weight_decay=1e-4))
    precond = (dict(damping_mode="exact") if args.damping_mode == "exact"
               else dict(damping_mode="factored", inverse_method="cholesky"))

    def make_kfac(name, opts):
        extra = {}
        if "shared" in opts:
            extra["input_groups"] = INPUT_GROUPS[name]
        if "curvature-only" in opts:
            extra["store_factors"] = False
        pre = kp.kfac_precondition(1e-3, invert_every=1, **precond, **extra)
        return optax.chain(kp.clipped(pre, "post", 1.0), optax.add_decayed_weights(1e-4),
                           optax.scale_by_learning_rate(1e-3))

    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), size {args.size}, "
          f"LoRA rank 8, K-FAC damping 1e-3 ({args.damping_mode}), median of {args.reps} steps "
          f"(OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')})")
    rows = []
    for name in models:
        cfg, batch, enc_len, dec_len = SIZES[args.size][name]
        loss_fn, trainable, frozen, probes, batches, desc = build(name, cfg, batch, enc_len,
                                                                  dec_len)
        n_train = sum(x.size for x in jax.tree_util.tree_leaves(trainable))
        n_frozen = sum(x.size for x in jax.tree_util.tree_leaves(frozen))
        print(f"{name}: {desc}; {n_train} trainable / {n_frozen} frozen parameters")

        tr = fresh(trainable)
        res_a, _, _ = run_arm(make_step(loss_fn, adamw, False), tr, adamw.init(tr), frozen,
                              probes, batches, args.reps)
        gc.collect()
        rows.append((name, "adamw", res_a, res_a))
        for v, opts in variants:
            kfac = make_kfac(name, opts)
            tr = fresh(trainable)
            res_i, tr, st = run_arm(make_step(loss_fn, kfac, True), tr, kfac.init(tr), frozen,
                                    probes, batches, args.reps)
            res_p, _, _ = run_arm(make_step(loss_fn, kfac, False), tr, st, frozen, probes,
                                  batches, args.reps)
            del tr, st
            gc.collect()
            tag = "kfac" if v == "default" else f"kfac[{v}]"
            rows.append((name, f"{tag} invert", res_i, res_a))
            rows.append((name, f"{tag} plain", res_p, res_a))

    print()
    print("peak = argument + output + temp - alias of the compiled step (XLA memory analysis); "
          "x = ratio to AdamW")
    width = max(12, *(len(label) for _, label, _, _ in rows))
    print(f"{'model':8s} {'optimizer':{width}s} {'peak MiB':>9s} {'x':>6s} {'args MiB':>9s} "
          f"{'temp MiB':>9s} {'opt MiB':>8s} {'x':>7s} {'meas. MiB':>9s} {'x':>6s} "
          f"{'ms/step':>8s} {'x':>6s} {'loss':>7s}")
    for name, label, r, a in rows:
        if r["measured"] is None or a["measured"] is None:
            meas = f"{'-':>9s} {'-':>6s}"
        else:
            meas = f"{r['measured'] / MiB:9.1f} {r['measured'] / a['measured']:6.3f}"
        if r["time"] is None:
            timing = f"{'-':>8s} {'-':>6s} {'-':>7s}"
        else:
            timing = (f"{1e3 * r['time']:8.2f} {r['time'] / a['time']:6.2f} "
                      f"{r['loss']:7.3f}")
        print(f"{name:8s} {label:{width}s} {r['peak'] / MiB:9.1f} {r['peak'] / a['peak']:6.3f} "
              f"{r['args'] / MiB:9.1f} {r['temp'] / MiB:9.1f} {r['opt'] / MiB:8.2f} "
              f"{r['opt'] / a['opt']:7.2f} {meas} {timing}")


if __name__ == "__main__":
    main()
