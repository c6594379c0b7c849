"""A task's splits as a run uses them: loading, the shapes of training
batches, and the metrics of a split.

Splits follow the paper's protocol with split seed 0, so every training
seed sees the same validation and test sets. Training batches are padded to
their longest sequence rounded up to ``pad_to_multiple_of``;
:func:`padded_lengths` lists every such length (each one compiled shape)
and :func:`resize` makes a batch of a given length, so that a run can
compile all of them before its clock starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from kfac_jax_peft import data as D
from kfac_jax_peft.finetune import metrics as M
from kfac_jax_peft.finetune.config import TrainConfig
from kfac_jax_peft.models.loading import load_tokenizer


@dataclasses.dataclass
class Data:
    """Encoded splits of a task: ``train``, ``validation``, ``test``."""

    spec: D.TaskSpec
    train: D.Encoded
    validation: D.Encoded
    test: D.Encoded


def load_data(cfg: TrainConfig, tokenizer=None) -> Data:
    """The task's data in the paper's split protocol (split seed 0, so every
    training seed sees the same validation and test sets), tokenized with
    the model's tokenizer."""
    spec = D.get_task(cfg.task)
    splits = D.paper_splits(D.load_raw(spec, cfg.data_dir), seed=0)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model)
    enc = {k: D.encode(v, tokenizer, spec, max_length=cfg.max_length) for k, v in splits.items()}
    return Data(spec, enc["train"], enc["validation"], enc["test"])


def evaluate(predict: Callable[[dict], np.ndarray], encoded: D.Encoded, spec: D.TaskSpec,
             batch_size: int, pad_to_multiple_of: int = 16) -> dict[str, float]:
    """The task's metrics on one split (all examples, in order);
    ``predict(batch)`` returns the predictions of a host batch."""
    preds, labels = [], []
    for batch in D.eval_batches(encoded, batch_size, pad_to_multiple_of=pad_to_multiple_of):
        keep = batch["valid"] > 0
        preds.append(np.asarray(predict(batch))[keep])
        labels.append(batch["labels"][keep])
    preds, labels = np.concatenate(preds), np.concatenate(labels)
    out = M.compute_metrics(spec, preds, labels)
    out["main"] = M.main_metric(spec, out)
    return out


def padded_lengths(cfg: TrainConfig, data: Data) -> list[int]:
    """Every length a training batch can be padded to."""
    m = cfg.pad_to_multiple_of
    longest = max(int(np.max(data.train.lengths)), 1)
    top = -(-longest // m) * m
    return list(range(m, top + 1, m))


def resize(batch: dict, length: int, pad_id: int) -> dict:
    """A batch cut or padded (with padding tokens) to ``length`` tokens."""
    out = {}
    for k, v in batch.items():
        if k in ("input_ids", "attention_mask", "token_type_ids"):
            cur = v.shape[-1]
            if cur >= length:
                v = v[..., :length]
            else:
                fill = pad_id if k == "input_ids" else 0
                pad = np.full(v.shape[:-1] + (length - cur,), fill, v.dtype)
                v = np.concatenate([v, pad], axis=-1)
        out[k] = v
    return out
