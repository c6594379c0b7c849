"""Padding against compiled shapes: how many padded lengths (one compiled
variant of every step kind each) and how much padding each
``pad_to_multiple_of`` gives on a real task.

For every multiple ``m``, over one epoch of training batches as the
pipeline makes them (length-bucketed, padded to their longest sequence
rounded up to ``m``) and over the validation and test batches:

* padding: the fraction of the tokens computed on that are padding
  (``1 - real tokens / (rows x padded length)``);
* train shapes: the padded lengths training batches take (each one a
  compiled variant of every step kind), eval shapes likewise for the
  evaluation step.

Usage: ``python benchmarks/padding.py --data-dir GLUE_DIR --model CHECKPOINT
[--task sst2] [--max-length 64 128] [--batch-size 32]``
"""

from __future__ import annotations

import argparse
import itertools

from kfac_jax_peft import data as D
from kfac_jax_peft.finetune.config import TrainConfig
from kfac_jax_peft.finetune.tasks import load_data


def batch_lengths(batches, steps: int | None = None) -> list[tuple[int, int, int]]:
    """``(rows, real tokens, longest sequence)`` of each batch (made unpadded)."""
    out = []
    for batch in itertools.islice(batches, steps):
        rows, length = batch["input_ids"].shape[0], batch["input_ids"].shape[-1]
        out.append((rows, int(batch["attention_mask"].sum()), length))
    return out


def measure(lengths, pad) -> tuple[float, set[int]]:
    """Padding fraction and padded lengths when a batch whose longest
    sequence is ``L`` is padded to ``pad(L)``."""
    real = sum(r for _, r, _ in lengths)
    padded = sum(rows * pad(longest) for rows, _, longest in lengths)
    return 1.0 - real / padded, {pad(longest) for _, _, longest in lengths}


def multiple(m: int):
    return lambda n: -(-n // m) * m


def powers_of_two(low: int, top: int):
    """``low``, ``2 low``, ``4 low``, ... capped at ``top``."""
    def pad(n):
        p = low
        while p < n:
            p *= 2
        return min(p, top)

    return pad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--task", default="sst2")
    p.add_argument("--max-length", type=int, nargs="+", default=[64, 128])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--multiples", type=int, nargs="+", default=[8, 16, 32, 64])
    args = p.parse_args()
    print("| max length | padded lengths | train padding | train shapes | "
          "eval padding | eval shapes |")
    print("|---|---|---|---|---|---|")
    for max_length in args.max_length:
        cfg = TrainConfig(task=args.task, data_dir=args.data_dir, model=args.model,
                          max_length=max_length, batch_size=args.batch_size)
        data = load_data(cfg)
        epoch = len(data.train.labels) // args.batch_size
        train = batch_lengths(D.train_batches(data.train, args.batch_size, seed=0,
                                              pad_to_multiple_of=1), epoch)
        evals = [batch_lengths(D.eval_batches(split, args.batch_size, pad_to_multiple_of=1))
                 for split in (data.validation, data.test)]
        schemes = [(f"multiple of {m}", multiple(m)) for m in args.multiples
                   if m <= max_length]
        schemes += [(f"powers of two from {low}", powers_of_two(low, max_length))
                    for low in (8, 16)]
        for name, pad in schemes:
            t = measure(train, pad)
            e = measure(evals[0] + evals[1], pad)
            print(f"| {max_length} | {name} | {t[0]:.1%} | {len(t[1])} | {e[0]:.1%} | "
                  f"{len(e[1])} |", flush=True)


if __name__ == "__main__":
    main()
