"""A task model: a checkpoint with its PEFT modules and head, and its loss.

:func:`build_task_model` reads a Hugging Face checkpoint folder (RoBERTa,
BERT or T5), adds the configured PEFT modules and a fresh head for the
task, and returns a :class:`TaskModel`: pure functions from ``(params,
probes, batch, rng)`` to logits, per-example losses and predictions.

Conventions: the training loss is the mean over the examples of the batch
whose ``valid`` entry is 1 (cross-entropy for classification and multiple
choice, squared error ``(y - t)^2`` for regression, so that the
K-FAC statistics' "mean over examples" assumption holds (see
:mod:`kfac_jax_peft.capture`). ``rng=None`` means deterministic (no
dropout).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from kfac_jax_peft.data import TaskSpec
from kfac_jax_peft.finetune.config import ConfigError, TrainConfig, check_max_length
from kfac_jax_peft.models import loading
from kfac_jax_peft.models import roberta as rb
from kfac_jax_peft.models import t5 as t5m
from kfac_jax_peft.peft import AdapterConfig, LoRAConfig
from kfac_jax_peft.peft.lora import lora_matches

Array = jax.Array

#: RoBERTa attention-projection names in ``lora_targets`` and their T5 names.
_T5_NAMES = {"query": "q", "key": "k", "value": "v"}


@dataclasses.dataclass(frozen=True)
class TaskModel:
    """A model bound to a task. ``logits(params, probes, batch, rng)`` returns
    ``[B, num_labels]`` (``[B, C]`` scores for multiple choice, ``[B]`` for
    regression)."""

    module: Any
    spec: TaskSpec
    architecture: str  # "roberta" | "bert" | "t5"
    logits: Callable[..., Array]

    @property
    def input_groups(self):
        """Layers sharing an input factor (``kfac_precondition(input_groups=)``)."""
        return t5m.INPUT_GROUPS if self.architecture == "t5" else rb.INPUT_GROUPS

    def per_example_loss(self, logits: Array, labels: Array) -> Array:
        if self.spec.kind == "regression":
            return jnp.square(logits - labels.astype(logits.dtype))
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

    def loss(self, logits: Array, batch: dict) -> Array:
        """Mean over the valid examples."""
        valid = batch["valid"].astype(jnp.float32)
        losses = self.per_example_loss(logits, batch["labels"])
        return jnp.sum(losses * valid) / jnp.maximum(jnp.sum(valid), 1.0)

    def predictions(self, logits: Array) -> Array:
        if self.spec.kind == "regression":
            return logits
        return jnp.argmax(logits, axis=-1)


def peft_configs(cfg: TrainConfig, architecture: str
                 ) -> tuple[LoRAConfig | None, AdapterConfig | None]:
    """The LoRA / adapter configs of ``cfg`` for an architecture (T5 names
    its attention projections ``q, k, v, o``: the RoBERTa names in
    ``lora_targets`` are translated)."""
    if cfg.peft == "lora":
        targets = cfg.lora_targets
        if architecture == "t5":
            targets = tuple(_T5_NAMES.get(t, t) for t in targets)
        lora = LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=targets,
                          dropout=cfg.dropout or 0.0)
        return lora, None
    if cfg.peft in ("houlsby", "pfeiffer"):
        return None, AdapterConfig(reduction_factor=cfg.adapter_reduction, placement=cfg.peft)
    return None, None


def build_task_model(cfg: TrainConfig, spec: TaskSpec) -> tuple[TaskModel, dict]:
    """``(task_model, variables)`` for ``cfg.model`` (a checkpoint folder);
    PEFT modules and the head are initialised from ``cfg.seed``."""
    if cfg.model is None:
        raise ValueError("no model: set model to a Hugging Face checkpoint folder "
                         "(config.json, model.safetensors and the tokenizer files)")
    raw = loading.read_config(cfg.model)
    check_max_length(cfg, raw)
    if raw.get("model_type") in ("t5", "mt5"):
        model, variables = _build_t5(cfg, spec)
    else:
        loading.check_model_type(raw, loading.SUPPORTED_ENCODERS)
        model, variables = _build_encoder(cfg, spec, raw)
    check_lora_targets(cfg, variables["params"], model.architecture)
    return model, variables


def _module_paths(params) -> list[tuple[str, ...]]:
    """Paths of the dense layers of a params tree (modules with a kernel)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = {tuple(str(getattr(k, "key", k)) for k in path[:-1]) for path, _ in flat
             if str(getattr(path[-1], "key", "")) == "kernel"}
    return sorted(paths)


def check_lora_targets(cfg: TrainConfig, params, architecture: str) -> None:
    """With LoRA, every pattern of ``cfg.lora_targets`` must have put LoRA on
    at least one layer: a pattern matching nothing would train the head
    alone (or fewer layers than asked) without a word. The error names the
    patterns and lists layer names the model has."""
    if cfg.peft != "lora":
        return
    lora, _ = peft_configs(cfg, architecture)
    layers = [p[:-1] for p in _module_paths(params) if p[-1] == "lora_A"]
    unmatched = [user for user, pattern in zip(cfg.lora_targets, lora.targets)
                 if not any(lora_matches(dataclasses.replace(lora, targets=(pattern,)), path)
                            for path in layers)]
    if unmatched:
        dense = [p for p in _module_paths(params) if p[-1] not in ("lora_A", "lora_B")
                 and "classifier" not in p]
        names = sorted({p[-1] for p in dense})
        raise ConfigError("lora_targets", f"must match layers of the model; {unmatched} match "
                          f"none. Layer names: {', '.join(names)} (full paths such as "
                          f"{'/'.join(dense[0]) if dense else '-'!r} match as patterns)")


def _build_encoder(cfg: TrainConfig, spec: TaskSpec, raw: dict) -> tuple[TaskModel, dict]:
    config = rb.RobertaConfig.from_dict(raw)
    if cfg.dropout is not None:
        config = dataclasses.replace(config, hidden_dropout_prob=cfg.dropout,
                                     attention_probs_dropout_prob=cfg.dropout)
    lora, adapter = peft_configs(cfg, config.model_type)
    task = "multiple_choice" if spec.kind == "multiple_choice" else "classification"
    num_labels = 1 if spec.kind == "regression" else spec.num_labels
    module = rb.RobertaClassifier(config, num_labels=num_labels, lora=lora, adapter=adapter,
                                  task=task)
    variables = rb.init_variables(module, cfg.seed)
    params = rb.load_encoder_params(variables["params"], loading.load_state_dict(cfg.model),
                                    config.model_type, source=f"checkpoint {cfg.model!r}")
    variables["params"] = jax.tree_util.tree_map(jnp.asarray, params)
    regression = spec.kind == "regression"

    def logits(params, probes, batch, rng=None):
        variables = {"params": params} if probes is None else {"params": params,
                                                                "kfac": probes}
        out = module.apply(variables, batch["input_ids"], batch["attention_mask"],
                           batch["token_type_ids"], deterministic=rng is None,
                           rngs=None if rng is None else {"dropout": rng})
        return out[..., 0] if regression else out

    arch = "bert" if config.model_type == "bert" else "roberta"
    return TaskModel(module, spec, arch, logits), variables


def _build_t5(cfg: TrainConfig, spec: TaskSpec) -> tuple[TaskModel, dict]:
    if spec.kind == "multiple_choice":
        raise ValueError(f"task {spec.name!r} is multiple choice; the T5 encoder head "
                         "supports classification and regression only")
    lora, adapter = peft_configs(cfg, "t5")
    num_labels = 1 if spec.kind == "regression" else spec.num_labels
    module, variables = t5m.from_pretrained(cfg.model, lora=lora, adapter=adapter,
                                            num_labels=num_labels, dropout_rate=cfg.dropout,
                                            seed=cfg.seed)
    regression = spec.kind == "regression"

    def logits(params, probes, batch, rng=None):
        variables = {"params": params} if probes is None else {"params": params,
                                                                "kfac": probes}
        out = module.apply(variables, batch["input_ids"], batch["attention_mask"],
                           deterministic=rng is None, method=t5m.T5.classify,
                           rngs=None if rng is None else {"dropout": rng})
        return out[..., 0] if regression else out

    return TaskModel(module, spec, "t5", logits), dict(variables)
