"""The configuration of one fine-tuning run, from flags and/or a config file.

A run is fully described by a :class:`TrainConfig`; it is written to
``<output_dir>/config.json`` at the start of the run, and a config file
(JSON, or TOML with a ``[train]`` table or top-level keys) is read by
:func:`load_config`. Unknown keys are errors naming the key.

Every value is checked once, when the config is made (:func:`validate`):
a value of the wrong type or outside its allowed range raises a
:class:`ConfigError` (a ``ValueError``; :class:`ConfigTypeError`, also a
``TypeError``, for a wrong type) naming the key and the allowed values,
before any data or model is loaded. :func:`check_inputs` then checks the
files a run reads (the checkpoint folder, the data folder, the run folder)
without loading them.

Renamed keys (one name per concept; the old names are read, with a
``DeprecationWarning``, until the next release): ``save_every`` is
``checkpoint_every``; ``fisher_damping_mode`` is ``fisher_damping_scale``
(``damping_mode`` is K-FAC's exact/factored choice, a different concept).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
import tomllib
import warnings
from collections.abc import Mapping
from typing import Any

#: Zeroth-order optimizers (kfac_jax_peft.zeroth_order): forward passes only
#: (MeZO, MeZO-Adam, HiZOO) or LoHO's hybrids of zeroth- and first-order.
ZEROTH_ORDER = ("mezo", "mezo-adam", "hizoo", "loho-sgd-inter", "loho-adam-inter",
                "loho-adam-intra")
OPTIMIZERS = ("adamw", "kfac", "sgd", "ef", "ief", "sf", "sophia") + ZEROTH_ORDER
#: Optimizers whose step needs per-sample gradients (kfac_jax_peft.fisher).
PER_SAMPLE = ("ef", "ief", "sf")
#: Optimizers whose update takes the step's loss as a function (``obj_fn``; or
#: the logits and the loss of the logits, for Sophia's GNB estimator).
TAKES_OBJECTIVE = ("sophia",)
CLIP_MODES = ("post", "pre", "none")
#: What one clipping norm covers (kfac_jax_peft.clipping.CLIP_SCOPES).
CLIP_SCOPES = ("global", "module", "layer")
#: Sophia's Hessian-diagonal estimators (kfac_jax_peft.finetune.sophia).
SOPHIA_ESTIMATORS = ("hutchinson", "gnb")
PEFT_METHODS = ("lora", "houlsby", "pfeiffer", "head")
DAMPING_MODES = ("exact", "ekfac", "factored")
#: How a damping value is read: as it is, or relative to the curvature's own
#: scale (K-FAC: each layer's mean eigenvalue; EF/iEF/SF: the largest Gram diagonal).
DAMPING_SCALES = ("absolute", "relative")
FISHER_DAMPING_SCALES = DAMPING_SCALES

#: The paper's four arms (Section 5, Fig. 4) as config overrides.
ARMS: dict[str, dict[str, Any]] = {
    "adamw": {"optimizer": "adamw", "clip": "pre"},
    "kfac-none": {"optimizer": "kfac", "clip": "none"},
    "kfac-pre": {"optimizer": "kfac", "clip": "pre"},
    "kfac-post": {"optimizer": "kfac", "clip": "post"},
    # Sophia's own per-coordinate clip, nothing else (finetune/sophia.py)
    "sophia": {"optimizer": "sophia", "clip": "none"},
    # the zeroth-order arms (no clipping, as in their sources)
    **{name: {"optimizer": name, "clip": "none"} for name in ZEROTH_ORDER},
}

#: Keys whose values are traced arguments of the compiled steps (kept in the
#: optimizer state, see :mod:`kfac_jax_peft.finetune.optim`): runs that differ
#: only in them (and the seed) share one compilation.
TRACED = ("learning_rate", "max_norm", "weight_decay", "damping", "decay", "fisher_damping")

#: Deprecated key -> its new name (read until the next release).
RENAMED = {"save_every": "checkpoint_every", "fisher_damping_mode": "fisher_damping_scale"}

#: Keys whose unset value (None) follows another key, kept in step by
#: :meth:`TrainConfig.replace`.
FOLLOWS = {"stats_every": "invert_every", "checkpoint_every": "eval_every"}


class ConfigError(ValueError):
    """A configuration value that a run cannot use.

    ``key`` is the offending key and ``detail`` the rest of the sentence
    (``"must be ..., got ..."``), so that a front end can name the key its
    own way (the command line names the flag)."""

    def __init__(self, key: str, detail: str):
        super().__init__(f"{key} {detail}")
        self.key, self.detail = key, detail


class ConfigTypeError(ConfigError, TypeError):
    """A configuration value of the wrong type (``"5"`` where an integer is due)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one run depends on.

    One entry per key below (``key: what it is``); the command line's help
    for each flag is made from these entries (:func:`field_help`), with the
    key's choices and default added, so a new key documented here gets its
    ``--help`` line automatically. Every value is checked by
    :func:`validate` when the config is made. ``stats_every`` and
    ``checkpoint_every`` left unset (``None``) read as ``invert_every`` and
    ``eval_every`` and keep following them through :meth:`replace`;
    :meth:`to_dict` writes them as ``None``.

    Data:
        task: the GLUE/SuperGLUE task to fine-tune on.
        data_dir: a local folder of the task's data in a supported layout;
            unset loads it from the Hugging Face hub.
        model: a Hugging Face checkpoint folder (RoBERTa, BERT or T5:
            config.json, the weights and the tokenizer files).
        output_dir: the run folder (config, log, checkpoints, best weights).
        max_length: tokens per example; longer inputs are truncated.
        pad_to_multiple_of: training batches are padded to their longest
            sequence rounded up to this; each padded length is one compiled
            shape (fewer lengths compile faster, more pad less).
        batch_size: examples per step (the global batch, split over devices).
        eval_batch_size: examples per evaluation batch; unset: batch_size.

    Model:
        peft: what trains besides the classification head: LoRA, Houlsby or
            Pfeiffer adapters, or the head alone.
        lora_rank: the rank of the LoRA updates.
        lora_alpha: LoRA's scale is lora_alpha / lora_rank.
        lora_targets: the modules that get LoRA updates (by name).
        adapter_reduction: the adapters' bottleneck is the hidden size over this.
        dropout: overrides the checkpoint's dropout rates and is LoRA's
            dropout; unset: the checkpoint's rates and no LoRA dropout.

    Optimizer:
        optimizer: adamw (the paper's baseline), kfac (K-FAC), sgd, or the
            exact damped empirical (ef), improved empirical (ief) and
            sampled (sf) Fisher updates (per-sample gradients, one device,
            no dropout), or sophia (optax.contrib.sophia: a clipped
            diagonal-Hessian step, see the sophia keys), or a zeroth-order
            arm: mezo (SPSA + SGD), mezo-adam (SPSA + Adam), hizoo (SPSA
            along Sigma^1/2 z + SGD, Sigma kept in the optimizer state), or
            LoHO's hybrids loho-sgd-inter, loho-adam-inter, loho-adam-intra
            (SGD or Adam with learning_rate on the first-order part, SPSA +
            SGD with zo_lr on the rest); zeroth-order arms run on one
            device, clip pre or none.
        clip: post clips the preconditioned (Newton) step, pre the
            gradient, none nothing; adamw and sophia take pre or none
            (sophia clips each coordinate itself).
        learning_rate: the peak learning rate (linear warm-up, then linear
            decay to 0 at the last step).
        max_norm: the clipping threshold (an L2 norm).
        clip_scope: what one norm covers: global (the whole update, the
            paper), module (each kind of module on its own: lora_A, lora_B,
            the head, ...) or layer (each layer on its own).
        weight_decay: decoupled weight decay on matrices (not biases or
            LayerNorm scales).
        warmup_ratio: the fraction of the steps spent warming up the
            learning rate.
        damping: K-FAC's Tikhonov damping.
        decay: K-FAC's moving-average decay of its factors (0: the current
            batch only).
        invert_every: K-FAC re-inverts its curvature every this many steps.
        stats_every: K-FAC captures statistics every this many steps;
            unset: invert_every (on inversion steps only).
        damping_mode: exact (eigendecomposition), ekfac (the same
            eigenbasis with EKFAC's diagonal re-estimated from the
            statistics between decompositions; needs stats_every below
            invert_every) or factored (pi-adjusted damping of each factor)
            K-FAC damping.
        damping_scale: absolute (damping as it is) or relative (damping
            times each layer's mean eigenvalue (tr A / d_A)(tr G / d_G), so
            one value transfers across layers, widths and batch sizes).
        adaptive_damping: adapt K-FAC's damping (damping is its start) by
            the Levenberg-Marquardt rule on the ratio of the actual to the
            predicted loss reduction (one device).
        adaptive_step: take the step size and momentum minimising the exact
            quadratic model along the clipped K-FAC direction, with the
            learning-rate schedule as a factor on that step (1: the model's
            minimiser) and the absolute damping added to its curvature (one
            device).
        adaptive_every: the adaptive rules recompute every this many steps
            (each time an extra forward pass and Fisher-vector products).
        share_input_factors: LoRA A layers that read the same input keep one
            input factor (less memory; the same update unless LoRA dropout
            is on).
        fisher_damping: the damping of ef, ief and sf.
        fisher_damping_scale: absolute, or relative to the largest Gram
            diagonal (ef, ief, sf).
        num_samples: sf's sampled labels per example.
        sophia_b1: sophia's moving-average decay of the gradient (the
            paper's 0.965).
        sophia_b2: sophia's moving-average decay of its Hessian-diagonal
            estimate; 0.95 rather than the paper's 0.99 because optax does
            not bias-correct it and a fine-tuning run makes ~100 estimates.
        sophia_gamma: sophia's step is -lr * clip(m / max(gamma * h, eps), 1)
            per coordinate (the paper's 0.01).
        sophia_eps: the floor of gamma * h in sophia's step.
        sophia_hessian_every: sophia refreshes its estimate of the Hessian
            diagonal every this many steps (the paper's 10).
        sophia_estimator: sophia's Hessian-diagonal estimate: hutchinson
            (u * Hu, one Hessian-vector product, u Rademacher) or gnb
            (Gauss-Newton-Bartlett: B * g * g, g the gradient of the batch
            loss on labels sampled from the model; non-negative).
        zo_eps: the zeroth-order perturbation size (1e-3, every setting
            of LoHO's tables).
        zo_lr: the peak learning rate of the zeroth-order part (the whole
            tree for mezo and hizoo) on learning_rate's warm-up and decay;
            1e-6 is LoHO-SGD's full fine-tuning rate, far too small for
            LoRA (raise it).
        zo_directions: the n of n-SPSA, directions averaged per step (hizoo
            takes 1).
        fo_layers: LoHO inter-layer: the last this many encoder layers are
            first-order; unset: half of them, rounded down.
        fo_ratio: LoHO intra-layer: the fraction of every layer's
            parameters that is first-order.
        hizoo_smooth: HiZOO's moving-average constant of Sigma (1e-8, as
            its reference code).
        log_gamma: also log, at every log step, indicators of the step's
            direction: gamma relative to SGD's (below 1: closer to the
            natural gradient), the per-sample gradient-norm imbalance, the
            exact curvature along the step (step_curvature, to compare
            with the damping) and the share of its squared norm in each
            trainable module (share_lora_A, share_lora_B, ...).

    Loop:
        steps: training steps.
        eval_every: evaluate on validation every this many steps (the
            paper: 200); the best validation weights are tested at the end.
        checkpoint_every: write a resumable checkpoint every this many
            steps; unset: eval_every.
        log_every: write a training record every this many steps.
        seed: the seed of the PEFT and head initialisation, the batch order
            and dropout.
        devices: local devices (of each process, in a multi-process job) to
            train on, data-parallel (0: all): jax.jit over a device mesh, the
            batch split by rows.
        distribute_inversions: K-FAC: each device decomposes about 1/N of
            the Kronecker factors and the results are gathered, instead of
            every device repeating every inversion (the same update).
        shard_factors: K-FAC: keep the factor matrices split by rows over
            the devices (1/N of their memory on each) instead of replicated.
        progress: show the progress bar and the compilation count-down.
        precompile: compile every step kind for every padded length before
            the clock starts, so that the logged wall-clock is training time.

    The hyperparameters of :data:`TRACED` are arrays of the compiled steps,
    not constants: runs that differ only in them share one compilation.
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
    clip_scope: str = "global"
    learning_rate: float = 0.05
    max_norm: float = 1.0
    weight_decay: float = 1e-4
    warmup_ratio: float = 0.06
    damping: float = 1e-3
    decay: float = 0.95
    invert_every: int = 50
    stats_every: int | None = None
    damping_mode: str = "exact"
    damping_scale: str = "absolute"
    adaptive_damping: bool = False
    adaptive_step: bool = False
    adaptive_every: int = 1
    share_input_factors: bool = False
    fisher_damping: float = 1e-7
    fisher_damping_scale: str = "absolute"
    num_samples: int = 1
    zo_eps: float = 1e-3
    zo_lr: float = 1e-6
    zo_directions: int = 1
    fo_layers: int | None = None
    fo_ratio: float = 0.5
    hizoo_smooth: float = 1e-8
    log_gamma: bool = False
    sophia_b1: float = 0.965
    sophia_b2: float = 0.95
    sophia_gamma: float = 0.01
    sophia_eps: float = 1e-8
    sophia_hessian_every: int = 10
    sophia_estimator: str = "hutchinson"
    steps: int = 1000
    eval_every: int = 200
    checkpoint_every: int | None = None
    log_every: int = 10
    seed: int = 0
    devices: int = 1
    distribute_inversions: bool = False
    shard_factors: bool = False
    progress: bool = True
    precompile: bool = True

    def __post_init__(self):
        validate(self)
        follows = frozenset(k for k in FOLLOWS if getattr(self, k) is None)
        object.__setattr__(self, "_follows", follows)
        for key in follows:
            object.__setattr__(self, key, getattr(self, FOLLOWS[key]))

    # Deprecated attribute names, read until the next release.
    @property
    def stats_interval(self) -> int:
        """Deprecated: ``stats_every``."""
        _warn_renamed("attribute", "stats_interval", "stats_every")
        return self.stats_every

    @property
    def save_every(self) -> int:
        """Deprecated: ``checkpoint_every``."""
        _warn_renamed("attribute", "save_every", "checkpoint_every")
        return self.checkpoint_every

    @property
    def fisher_damping_mode(self) -> str:
        """Deprecated: ``fisher_damping_scale``."""
        _warn_renamed("attribute", "fisher_damping_mode", "fisher_damping_scale")
        return self.fisher_damping_scale

    def replace(self, **changes) -> TrainConfig:
        """A copy with ``changes`` (checked like a new config; deprecated key
        names are read with a warning). A key left unset that follows another
        (``stats_every``, ``checkpoint_every``) keeps following it."""
        changes = rename_deprecated(changes, "key")
        _check_known(changes, "replace()")
        for key in self._follows:
            changes.setdefault(key, None)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The keys as given: ``from_mapping(cfg.to_dict())`` gives ``cfg`` back."""
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        for key in self._follows:
            d[key] = None
        return d


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _warn_renamed(kind: str, old: str, new: str, source: str = "") -> None:
    where = f" in {source}" if source else ""
    warnings.warn(f"{kind} {old!r}{where} is deprecated; use {new!r} (the old name is read "
                  "until the next release)", DeprecationWarning, stacklevel=3)


def rename_deprecated(d: Mapping[str, Any], kind: str = "key",
                      source: str = "") -> dict[str, Any]:
    """``d`` with deprecated keys (:data:`RENAMED`) under their new names,
    warning once per old key (``kind`` says how the warning names it:
    ``"key"``, ``"flag"``; ``source`` where it was read). Both names at once
    is an error."""
    out = dict(d)
    for old, new in RENAMED.items():
        if old in out:
            if new in out:
                raise ConfigError(new, f"is given twice, also under its deprecated name {old!r}")
            shown = ("--" + old.replace("_", "-"), "--" + new.replace("_", "-")) \
                if kind == "flag" else (old, new)
            _warn_renamed(kind, *shown, source)
            out[new] = out.pop(old)
    return out


def _check_known(d: Mapping[str, Any], source: str) -> None:
    unknown = sorted(set(d) - set(FIELDS))
    if unknown:
        raise ConfigError(unknown[0], f"is not a configuration key ({source}: unknown "
                          f"{unknown}); known keys: {', '.join(sorted(FIELDS))}")


# --------------------------------------------------------------------------- validation

def _positive(v) -> bool:
    return v > 0


def _at_least(low):
    return lambda v: v >= low


#: The allowed values of each key beyond its type: (check, how it reads).
#: Choices and the cross-key rules are in :func:`validate` itself.
_RANGES: dict[str, tuple[Any, str]] = {
    "max_length": (_at_least(4), "an integer >= 4 (room for the special tokens of a pair)"),
    "pad_to_multiple_of": (_at_least(1), "an integer >= 1"),
    "batch_size": (_at_least(1), "an integer >= 1"),
    "eval_batch_size": (_at_least(1), "an integer >= 1, or unset (batch_size)"),
    "lora_rank": (_at_least(1), "an integer >= 1"),
    "lora_alpha": (_positive, "a number > 0 (the LoRA scale is lora_alpha / lora_rank)"),
    "adapter_reduction": (_at_least(1), "an integer >= 1"),
    "dropout": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1), or unset (the checkpoint's)"),
    "learning_rate": (_positive, "a number > 0"),
    "max_norm": (_positive, "a number > 0 (0 would stop every update)"),
    "weight_decay": (_at_least(0.0), "a number >= 0"),
    "warmup_ratio": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "damping": (_positive, "a number > 0"),
    "decay": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "invert_every": (_at_least(1), "an integer >= 1"),
    "stats_every": (_at_least(1), "an integer >= 1, or unset (invert_every)"),
    "fisher_damping": (_positive, "a number > 0"),
    "adaptive_every": (_at_least(1), "an integer >= 1"),
    "num_samples": (_at_least(1), "an integer >= 1"),
    "sophia_b1": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "sophia_b2": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "sophia_gamma": (_positive, "a number > 0"),
    "sophia_eps": (_positive, "a number > 0 (the floor of gamma * h)"),
    "sophia_hessian_every": (_at_least(1), "an integer >= 1"),
    "zo_eps": (_positive, "a number > 0"),
    "zo_lr": (_positive, "a number > 0"),
    "zo_directions": (_at_least(1), "an integer >= 1"),
    "fo_layers": (_at_least(0), "an integer >= 0, or unset (half of the layers)"),
    "fo_ratio": (lambda v: 0.0 < v < 1.0, "a number in (0, 1)"),
    "hizoo_smooth": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "steps": (_at_least(1), "an integer >= 1"),
    "eval_every": (_at_least(1), "an integer >= 1"),
    "checkpoint_every": (_at_least(1), "an integer >= 1, or unset (eval_every)"),
    "log_every": (_at_least(1), "an integer >= 1"),
    "seed": (_at_least(0), "an integer >= 0"),
    "devices": (_at_least(0), "an integer >= 0 (0 = all local devices)"),
}

#: Keys that name files or folders (a ``pathlib.Path`` is fine).
_PATHS = ("model", "data_dir", "output_dir")

_CHOICES = {"peft": PEFT_METHODS, "optimizer": OPTIMIZERS, "clip": CLIP_MODES,
            "clip_scope": CLIP_SCOPES,
            "damping_mode": DAMPING_MODES, "damping_scale": DAMPING_SCALES,
            "fisher_damping_scale": FISHER_DAMPING_SCALES,
            "sophia_estimator": SOPHIA_ESTIMATORS}


def _type_error(key: str, value: Any, wanted: str) -> ConfigTypeError:
    return ConfigTypeError(key, f"must be {wanted}, got {value!r} ({type(value).__name__})")


def _coerce(key: str, value: Any, kind: str) -> Any:
    """``value`` as the Python type ``kind`` names, or a :class:`ConfigTypeError`.

    Exact types only: no ``"5"`` for 5, no 8.5 (or 8.0) for an integer, no
    0/1 for a bool, since a config file holding them was probably not meant
    that way; an integer is a fine float."""
    if kind == "bool":
        if not isinstance(value, bool | _np_bool()):
            raise _type_error(key, value, "true or false")
        return bool(value)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise _type_error(key, value, "an integer")
        return int(value)
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _type_error(key, value, "a number")
        if not math.isfinite(value):
            raise ConfigError(key, f"must be a finite number, got {value!r}")
        return float(value)
    if kind == "str":
        if key in _PATHS and isinstance(value, os.PathLike):
            value = os.fspath(value)  # stored as a string: config.json is JSON
        if not isinstance(value, str) or not value:
            raise _type_error(key, value, "a non-empty string")
        return value
    if kind == "tuple[str, ...]":
        items = (value,) if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not items or not all(
                isinstance(v, str) and v for v in items):
            raise _type_error(key, value, "a non-empty list of non-empty strings")
        return tuple(items)
    raise AssertionError(f"no rule for the type {kind!r} of {key}")  # pragma: no cover


def _np_bool():
    import numpy as np

    return np.bool_


def validate(cfg: TrainConfig) -> None:
    """Check and normalise every key of ``cfg`` in place (it is frozen; this
    runs from ``__post_init__``). Raises :class:`ConfigError` naming the
    first bad key and its allowed values:

    * the type of every key (``int``, ``float``, ``str``, ``bool``, a list of
      strings; ``None`` where the annotation allows it);
    * the range of every number (:data:`_RANGES`): positive learning rate,
      ``max_norm``, damping and ``lora_alpha``; ``weight_decay`` >= 0;
      ``dropout``, ``decay``, ``warmup_ratio`` in [0, 1); counts >= 1;
    * the choices (task, peft, optimizer, clip, damping_mode,
      fisher_damping_scale);
    * the rules across keys: AdamW, Sophia and the zeroth-order optimizers
      take no post-clipping; ``ekfac`` damping needs ``stats_every <
      invert_every``; the per-sample and zeroth-order optimizers, the
      adaptive options and ``log_gamma`` run on one device, and
      ``log_gamma`` not with a zeroth-order optimizer; HiZOO takes one
      direction; a multi-device batch splits evenly; ``distribute_inversions``
      and ``shard_factors`` are K-FAC's.

    Checks that need files (the model's position embeddings, the tokenizer,
    the LoRA targets against the model) come later, before anything is
    loaded (:func:`check_inputs`) or right after the model is built.
    """
    from kfac_jax_peft.data.tasks import get_task

    def put(key, value):
        object.__setattr__(cfg, key, value)

    for key, field in FIELDS.items():
        value, kind = getattr(cfg, key), str(field.type)
        if kind.endswith(" | None"):
            if value is None:
                continue
            kind = kind.removesuffix(" | None")
        put(key, value := _coerce(key, value, kind))
        check, allowed = _RANGES.get(key, (None, ""))
        if check is not None and not check(value):
            raise ConfigError(key, f"must be {allowed}, got {value!r}")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ConfigError(key, f"must be one of {', '.join(_CHOICES[key])}, got {value!r}")
    try:
        put("task", get_task(cfg.task).name)
    except ValueError as e:
        raise ConfigError("task", f"must be a known task, got {cfg.task!r} ({e})") from None
    _validate_across(cfg)


def _validate_across(cfg: TrainConfig) -> None:
    """The rules that tie keys together (see :func:`validate`)."""
    if cfg.optimizer == "adamw" and cfg.clip == "post":
        raise ConfigError("clip", "must be 'pre' or 'none' with optimizer 'adamw', got 'post' "
                          "(post-clipping is K-FAC's Newton-step clipping)")
    if cfg.clip_scope != "global" and cfg.clip == "none":
        raise ConfigError("clip_scope", f"must be 'global' with clip 'none' (nothing is "
                          f"clipped), got {cfg.clip_scope!r}")
    _validate_sophia(cfg)
    if cfg.optimizer == "kfac" and cfg.damping_mode == "ekfac":
        stats_every = cfg.invert_every if cfg.stats_every is None else cfg.stats_every
        if stats_every >= cfg.invert_every:
            raise ConfigError("stats_every", "must be smaller than invert_every with "
                              "damping_mode 'ekfac' (its diagonal is re-estimated from the "
                              "statistics between decompositions), got stats_every="
                              f"{stats_every}, invert_every={cfg.invert_every}")
    for key in ("adaptive_damping", "adaptive_step"):
        if getattr(cfg, key) and cfg.optimizer != "kfac":
            raise ConfigError(key, f"needs optimizer 'kfac' (the quadratic model is taken "
                              f"along the K-FAC direction), got {cfg.optimizer!r}")
        if getattr(cfg, key) and cfg.devices > 1:
            raise ConfigError("devices", f"must be 1 with {key} (its extra forward pass and "
                              f"Fisher-vector products run on one device), got {cfg.devices}")
    if cfg.adaptive_step and cfg.damping_scale != "absolute":
        raise ConfigError("damping_scale", "must be 'absolute' with adaptive_step (its quadratic "
                          "model adds the damping to the exact curvature as an absolute value), "
                          f"got {cfg.damping_scale!r}")
    if cfg.optimizer in ZEROTH_ORDER:
        _validate_zeroth_order(cfg)
    for key in ("distribute_inversions", "shard_factors"):
        if getattr(cfg, key) and cfg.optimizer != "kfac":
            raise ConfigError(key, f"must be False with optimizer {cfg.optimizer!r} (it "
                              "applies to K-FAC only), got True")
    if cfg.devices > 1:
        if cfg.optimizer in PER_SAMPLE or cfg.log_gamma:
            raise ConfigError("devices", f"must be 1 with optimizer {cfg.optimizer!r} or "
                              f"log_gamma (per-sample gradients run on one device), got "
                              f"{cfg.devices}")
        for key in ("batch_size", "eval_batch_size"):
            value = getattr(cfg, key) or cfg.batch_size
            if value % cfg.devices:
                raise ConfigError(key, f"must be divisible by devices={cfg.devices}, "
                                  f"got {value}")


def _validate_sophia(cfg: TrainConfig) -> None:
    """Sophia clips each coordinate of its step itself; a norm clip after it
    (``clip="post"``) would be a second, different clip of the same step."""
    if cfg.optimizer == "sophia" and cfg.clip == "post":
        raise ConfigError("clip", "must be 'pre' or 'none' with optimizer 'sophia', got "
                          "'post' (Sophia clips each coordinate of its step itself; "
                          "post-clipping is K-FAC's Newton-step clipping)")


def _validate_zeroth_order(cfg: TrainConfig) -> None:
    """The rules of the zeroth-order optimizers (see :func:`validate`)."""
    name = cfg.optimizer
    if cfg.clip == "post":
        raise ConfigError("clip", f"must be 'pre' or 'none' with optimizer {name!r}, got "
                          "'post' (post-clipping is K-FAC's Newton-step clipping; a "
                          "zeroth-order step has no preconditioned update to clip)")
    if cfg.devices != 1:
        raise ConfigError("devices", f"must be 1 with optimizer {name!r} (the zeroth-order "
                          f"steps run on one device), got {cfg.devices}")
    if cfg.log_gamma:
        raise ConfigError("log_gamma", f"must be false with optimizer {name!r} (the gamma "
                          "indicator is defined for first-order directions)")
    if name == "hizoo" and cfg.zo_directions != 1:
        raise ConfigError("zo_directions", f"must be 1 with optimizer 'hizoo' (HiZOO "
                          f"estimates with one direction), got {cfg.zo_directions}")


# --------------------------------------------------------------------------- help


def plain(text: str) -> str:
    """``text`` without reStructuredText markup (``:func:`~a.b```, double
    back-quotes), for a terminal."""
    text = re.sub(r":\w+:`~?([^`<]+?)(?: <[^>]+>)?`", lambda m: m.group(1).split(".")[-1]
                  if m.group(0).startswith(":") and "~" in m.group(0) else m.group(1), text)
    return re.sub(r"``([^`]+)``", r"\1", text)


def field_docs() -> dict[str, tuple[str, str]]:
    """``{key: (section, entry)}``: each key's entry in :class:`TrainConfig`'s
    docstring (``key: text``, continued on more deeply indented lines) and
    the section it sits in, as plain one-line text."""
    docs: dict[str, tuple[str, str]] = {}
    section, key = "", None
    for line in (TrainConfig.__doc__ or "").splitlines():
        head = re.match(r"^ {4}(\w[\w ]*):$", line)
        entry = re.match(r"^ {8}(\w+): (.*)$", line)
        if head:
            section, key = head.group(1), None
        elif entry and entry.group(1) in FIELDS:
            key = entry.group(1)
            docs[key] = (section, entry.group(2).strip())
        elif key is not None and line.startswith(" " * 12) and line.strip():
            docs[key] = (section, docs[key][1] + " " + line.strip())
        else:
            key = None
    return {k: (sec, plain(text)) for k, (sec, text) in docs.items()}


def choices(key: str) -> tuple[str, ...] | None:
    """The allowed values of a key that has a fixed set of them."""
    if key == "task":
        from kfac_jax_peft.data.tasks import TASKS

        return tuple(TASKS)
    return _CHOICES.get(key)


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return str(value)


def field_help(key: str) -> str:
    """One line of help for ``key``: its docstring entry, its choices, its
    default (and, for the keys of :data:`TRACED`, that a sweep varies it
    without compiling again)."""
    doc = field_docs().get(key, ("", ""))[1].rstrip(".")
    parts = [doc + "."] if doc else []
    if choices(key):
        parts.append(f"Choices: {', '.join(choices(key))}.")
    if key in TRACED:
        parts.append("Traced (a sweep varies it without compiling again).")
    parts.append(f"Default: {_shown(FIELDS[key].default)}.")
    return " ".join(parts)


# --------------------------------------------------------------------------- reading


def from_mapping(d: Mapping[str, Any], *, source: str = "config") -> TrainConfig:
    """A :class:`TrainConfig` from a mapping; unknown keys are errors,
    deprecated keys are read under their new names with a warning."""
    d = rename_deprecated(d, "key")
    _check_known(d, source)
    return TrainConfig(**d)


def load_config(path: str) -> dict[str, Any]:
    """The key/value pairs of a JSON (``.json``) or TOML (``.toml``) config
    file; a TOML file may put them in a ``[train]`` table (then nothing else
    may sit beside it). Deprecated keys come back under their new names
    (with a warning). The values are checked by :func:`from_mapping` once
    merged with the flags."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".json", ".toml"):
        raise ConfigError("config", f"file {path!r} must be .json or .toml, got {suffix!r} "
                          "(other formats are not read)")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        d = tomllib.loads(raw.decode()) if suffix == ".toml" else json.loads(raw)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError("config", f"file {path!r} is malformed: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError("config", f"file {path!r} must hold a table of keys, got "
                          f"{type(d).__name__}")
    if "train" in d and isinstance(d["train"], dict):
        beside = sorted(set(d) - {"train"})
        if beside:
            raise ConfigError("config", f"file {path!r}: keys {beside} sit beside the [train] "
                              "table and would be ignored; move them into it")
        d = d["train"]
    d = rename_deprecated(d, "key", path)
    unknown = sorted(set(d) - set(FIELDS))
    if unknown:
        raise ConfigError("config", f"file {path!r}: unknown key(s) {unknown}; known keys: "
                          f"{', '.join(sorted(FIELDS))}")
    return d


def check_inputs(cfg: TrainConfig, *, resume: bool | None = False) -> None:
    """Check the files a run of ``cfg`` reads, before loading any of them:

    * ``model`` is set and is a checkpoint folder with a readable
      ``config.json`` of a supported architecture, a weights file and
      tokenizer vocabulary files; ``max_length`` fits the model's position
      embeddings; a T5 checkpoint is not given a multiple-choice task;
    * ``data_dir``, when set, holds the task's folder;
    * ``output_dir`` is not a file; with ``resume=False`` it holds no
      checkpoint (a fresh run never writes over one), with ``resume=True``
      it holds one (``resume=None``: either, as ``compare`` continues
      interrupted runs);
    * ``devices`` are available.

    Raises :class:`ConfigError`, ``FileNotFoundError``, ``FileExistsError``,
    :class:`~kfac_jax_peft.models.loading.CheckpointError` or
    :class:`~kfac_jax_peft.data.DataError`, each naming its key or file.
    """
    from kfac_jax_peft import data as D
    from kfac_jax_peft.models import loading

    if cfg.model is None:
        raise ConfigError("model", "is required: a Hugging Face checkpoint folder "
                          "(config.json, model.safetensors and the tokenizer files)")
    if not os.path.isdir(cfg.model):
        raise FileNotFoundError(f"model: checkpoint folder {cfg.model!r} does not exist")
    raw = loading.read_config(cfg.model)
    model_type = loading.check_model_type(raw, loading.SUPPORTED_ENCODERS + ("t5", "mt5"))
    loading.weights_file(cfg.model)
    loading.check_tokenizer_files(cfg.model)
    check_max_length(cfg, raw)
    spec = D.get_task(cfg.task)
    if model_type in ("t5", "mt5") and spec.kind == "multiple_choice":
        raise ConfigError("task", f"{cfg.task!r} is multiple choice; the T5 encoder head "
                          "supports classification and regression only")
    if cfg.data_dir is not None:
        D.find_task_folder(spec, cfg.data_dir)
    _check_output_dir(cfg.output_dir, resume)
    if cfg.devices > 1:
        import jax

        if cfg.devices > jax.local_device_count():
            raise ConfigError("devices", f"must be at most the {jax.local_device_count()} "
                              f"local devices, got {cfg.devices}")


def check_max_length(cfg: TrainConfig, model_config: Mapping[str, Any]) -> None:
    """``max_length`` must fit the position embeddings of the checkpoint
    whose ``config.json`` is ``model_config`` (beyond them, positions would
    be clamped to the last row without an error)."""
    from kfac_jax_peft.models.loading import max_positions

    limit = max_positions(model_config)
    if limit is not None and cfg.max_length > limit:
        raise ConfigError("max_length", f"must be at most {limit}, the positions of the "
                          f"{model_config.get('model_type')} checkpoint {cfg.model!r}, got "
                          f"{cfg.max_length}")


def has_checkpoint(run_dir: str) -> bool:
    """Whether ``run_dir`` holds a finished checkpoint (orbax names each
    step's folder by its number; one being written has a temporary suffix)."""
    folder = os.path.join(run_dir, "checkpoints")
    return os.path.isdir(folder) and any(
        name.isdigit() and os.path.isdir(os.path.join(folder, name))
        for name in os.listdir(folder))


def _check_output_dir(path: str, resume: bool | None) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError("output_dir", f"must be a folder, got the file {path!r}")
    if resume is False and has_checkpoint(path):
        raise FileExistsError(f"output_dir {path!r} already holds a run's checkpoints: pass "
                              "--resume (resume=True) to continue it, or choose another "
                              "output_dir")
    if resume is True and not has_checkpoint(path):
        raise FileNotFoundError(f"resume: no checkpoint in output_dir {path!r}")
