"""The configuration of one fine-tuning run, from flags and/or a config file.

A run is fully described by a :class:`TrainConfig`; it is written to
``<output_dir>/config.json`` at the start of the run, and a config file
(JSON, or TOML with a ``[train]`` table or top-level keys) is read by
:func:`load_config`. Unknown keys are errors naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Mapping
from typing import Any

OPTIMIZERS = ("adamw", "kfac", "sgd", "ef", "ief", "sf")
#: Optimizers whose step needs per-sample gradients (kfac_jax_peft.fisher).
PER_SAMPLE = ("ef", "ief", "sf")
CLIP_MODES = ("post", "pre", "none")
PEFT_METHODS = ("lora", "houlsby", "pfeiffer", "head")

#: The paper's four arms (Section 5, Fig. 4) as config overrides.
ARMS: dict[str, dict[str, Any]] = {
    "adamw": {"optimizer": "adamw", "clip": "pre"},
    "kfac-none": {"optimizer": "kfac", "clip": "none"},
    "kfac-pre": {"optimizer": "kfac", "clip": "pre"},
    "kfac-post": {"optimizer": "kfac", "clip": "post"},
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one run depends on.

    Data: ``task`` (a name of :data:`kfac_jax_peft.data.TASKS`), ``data_dir``
    (a local folder in a supported layout; ``None`` loads from the hub),
    ``max_length`` tokens, ``batch_size`` (the global batch, split over
    ``devices``). Batches are padded to their longest sequence rounded up to
    ``pad_to_multiple_of`` (each padded length is one compiled shape).

    Model: ``model`` is a Hugging Face checkpoint folder (RoBERTa, BERT or
    T5). ``peft``: ``"lora"`` (rank ``lora_rank``, ``lora_alpha``, on
    ``lora_targets``), ``"houlsby"``/``"pfeiffer"`` adapters with
    ``adapter_reduction``, or ``"head"`` (only the classification head
    trains). The classification head always trains. ``dropout`` overrides
    the checkpoint's dropout rates when set, and is also LoRA's dropout (0
    when unset).

    Optimizer: ``"adamw"`` (``clip`` = ``"pre"`` clips the gradient norm to
    ``max_norm``; the paper's baseline), ``"kfac"`` (``kfac_precondition``
    with ``damping``, EMA ``decay``, re-inversion every ``invert_every``
    steps, statistics captured every ``stats_every`` steps, default: on
    inversion steps only; ``share_input_factors``: LoRA ``A`` layers that
    read the same input keep one input factor (the model's
    ``INPUT_GROUPS``; less memory, same update unless LoRA dropout is on);
    ``clip`` = ``"post"`` Newton-step clipping,
    ``"pre"`` gradient clipping, ``"none"``), ``"sgd"``. The learning rate
    follows a linear warm-up over ``warmup_ratio * steps`` steps, then a
    linear decay to 0 at ``steps``. ``weight_decay`` is decoupled and
    applies to matrices (not biases or LayerNorm scales).
    ``"ef"``, ``"ief"``, ``"sf"``: the exact damped empirical, improved
    empirical and sampled (``num_samples`` labels per example) Fisher updates
    of :mod:`kfac_jax_peft.fisher` (Woodbury on the batch's per-sample
    gradients; damping ``fisher_damping``, ``fisher_damping_mode``
    ``"absolute"`` or ``"relative"`` to the largest Gram diagonal); their
    step is deterministic (no dropout) and runs on one device.
    ``log_gamma``: at every log step, also log the gamma indicator of that
    step's direction relative to SGD's (< 1: closer to the natural gradient;
    K-FAC's curvature as it stands before the step) on the step's batch, and
    the per-sample gradient-norm imbalance.

    Loop: ``eval_every`` steps (the paper: 200) evaluate on validation; the
    best validation checkpoint is evaluated on test at the end.
    ``save_every`` steps (default ``eval_every``) write a resumable
    checkpoint. ``log_every`` steps write a training record. ``devices``:
    how many local devices to train on data-parallel (0 = all).
    ``precompile``: compile every step kind for every padded length before
    the clock starts, so that the logged wall-clock is training time and
    not compilation time.
    """

    task: str = "rte"
    data_dir: str | None = None
    model: str | None = None
    output_dir: str = "runs/run"
    max_length: int = 128
    pad_to_multiple_of: int = 16
    batch_size: int = 16
    eval_batch_size: int | None = None
    peft: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("query", "value")
    adapter_reduction: int = 16
    dropout: float | None = None
    optimizer: str = "kfac"
    clip: str = "post"
    learning_rate: float = 0.05
    max_norm: float = 1.0
    weight_decay: float = 1e-4
    warmup_ratio: float = 0.06
    damping: float = 1e-3
    decay: float = 0.95
    invert_every: int = 50
    stats_every: int | None = None
    damping_mode: str = "exact"
    share_input_factors: bool = False
    fisher_damping: float = 1e-7
    fisher_damping_mode: str = "absolute"
    num_samples: int = 1
    log_gamma: bool = False
    steps: int = 1000
    eval_every: int = 200
    save_every: int | None = None
    log_every: int = 10
    seed: int = 0
    devices: int = 1
    progress: bool = True
    precompile: bool = True

    def __post_init__(self):
        if isinstance(self.lora_targets, str):
            object.__setattr__(self, "lora_targets", (self.lora_targets,))
        else:
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("clip", self.clip, CLIP_MODES)
        _check_choice("peft", self.peft, PEFT_METHODS)
        for name in ("batch_size", "steps", "eval_every", "log_every", "invert_every",
                     "max_length", "pad_to_multiple_of"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.stats_every is not None and self.stats_every < 1:
            raise ValueError(f"stats_every must be >= 1, got {self.stats_every}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")

    @property
    def checkpoint_every(self) -> int:
        return self.save_every or self.eval_every

    @property
    def stats_interval(self) -> int:
        """Steps between statistics captures (``invert_every`` by default)."""
        return self.stats_every or self.invert_every

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {choices}")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def from_mapping(d: Mapping[str, Any], *, source: str = "config") -> TrainConfig:
    """A :class:`TrainConfig` from a mapping; unknown keys are errors."""
    unknown = sorted(set(d) - set(FIELDS))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(FIELDS)}")
    return TrainConfig(**d)


def load_config(path: str) -> dict[str, Any]:
    """The key/value pairs of a JSON or TOML config file (``.json`` /
    ``.toml``); a TOML file may put them in a ``[train]`` table. The values
    are checked by :func:`from_mapping` once merged with the flags."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if path.endswith(".toml"):
            d = tomllib.loads(raw.decode())
            d = d.get("train", d)
        else:
            d = json.loads(raw)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {path!r} is malformed: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"config file {path!r} must hold a table of keys, got {type(d)}")
    unknown = sorted(set(d) - set(FIELDS))
    if unknown:
        raise ValueError(f"config file {path!r}: unknown key(s) {unknown}")
    return d
