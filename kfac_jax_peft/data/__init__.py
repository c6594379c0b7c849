"""GLUE / SuperGLUE data for fine-tuning: tasks, loading, the paper's splits, batching.

Typical use::

    spec = get_task("rte")
    raw = load_raw(spec, data_dir)             # or load_raw(spec): the HF hub
    splits = paper_splits(raw, seed=0)         # {"train", "validation", "test"}
    train = encode(splits["train"], tokenizer, spec, max_length=128)
    batches = train_batches(train, 32, seed=0)  # infinite, resumable by step

Conventions (labels, file layouts, the split protocol, padding) are
documented in :mod:`.tasks`, :mod:`.loaders`, :mod:`.splits` and
:mod:`.batching`.
"""

from __future__ import annotations

from kfac_jax_peft.data.batching import (
    Encoded,
    collate,
    encode,
    epoch_batches,
    eval_batches,
    train_batches,
)
from kfac_jax_peft.data.loaders import (
    DataError,
    Example,
    examples_from_rows,
    find_task_folder,
    load_raw,
    parse_label,
)
from kfac_jax_peft.data.splits import paper_splits
from kfac_jax_peft.data.tasks import TASKS, TaskSpec, get_task

__all__ = [
    "TASKS",
    "DataError",
    "Encoded",
    "Example",
    "TaskSpec",
    "collate",
    "encode",
    "epoch_batches",
    "eval_batches",
    "examples_from_rows",
    "find_task_folder",
    "get_task",
    "load_raw",
    "paper_splits",
    "parse_label",
    "train_batches",
]
