"""RoBERTa/BERT encoders (Flax linen) with LoRA and bottleneck adapters.

Layout follows Hugging Face so checkpoints load through one name table
(:data:`ENCODER_TABLE`, at the end of this module)::

    encoder/embeddings/{word,position,token_type}_embeddings, LayerNorm
    encoder/layer_{i}/attention/{query,key,value,output}     PEFTDense
    encoder/layer_{i}/adapter_attention                      Houlsby only
    encoder/layer_{i}/attention_norm                         LayerNorm
    encoder/layer_{i}/{intermediate,output}                  PEFTDense
    encoder/layer_{i}/adapter_ffn                            with adapters
    encoder/layer_{i}/output_norm                            LayerNorm
    classifier/{dense,out_proj}                              KFACDense head

Inputs are ``input_ids [..., T]`` with any leading shape (``[B, T]`` for
classification, ``[B, C, T]`` for multiple choice: the encoder runs on all
choices at once so that K-FAC counts ``B`` examples). ``attention_mask``
(1 = token, 0 = padding) is the K-FAC token mask of every PEFT layer.
RoBERTa position ids are ``cumsum(m) * m + pad_token_id`` with
``m = input_ids != pad_token_id`` (as in Hugging Face); BERT's are
``0..T-1``. For BERT the head's ``dense`` layer is the pretrained pooler and
``out_proj`` the linear classifier, i.e. ``BertForSequenceClassification``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kfac_jax_peft.capture import KFACDense
from kfac_jax_peft.models.loading import (
    PEFT_PATHS,
    SUPPORTED_ENCODERS,
    CheckpointError,
    Row,
    StateDict,
    assign,
    check_model_type,
    load_state_dict,
    read_config,
    strip_prefixes,
)
from kfac_jax_peft.peft import ACTIVATIONS, Adapter, AdapterConfig, LoRAConfig, PEFTDense
from kfac_jax_peft.peft.adapters import adapter_sites

Array = jax.Array
TASKS = ("classification", "multiple_choice")

#: ``kfac_precondition(..., input_groups=INPUT_GROUPS)``: the LoRA ``A``
#: layers of one attention block's query, key and value read the same hidden
#: states, so they can share one input factor (exact without LoRA dropout).
INPUT_GROUPS = [(r"(.*/attention)/(query|key|value)/lora_A/kernel", r"\1")]
_INIT = nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class RobertaConfig:
    """Architecture hyper-parameters (names as in Hugging Face config.json)."""

    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    model_type: str = "roberta"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RobertaConfig:
        """From a config.json dict; unknown keys are ignored."""
        check_model_type(d, SUPPORTED_ENCODERS)
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"hidden_size {cfg.hidden_size} is not a multiple of "
                             f"num_attention_heads {cfg.num_attention_heads}")
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r}")
        return cfg

    @property
    def head_dropout(self) -> float:
        return (self.hidden_dropout_prob if self.classifier_dropout is None
                else self.classifier_dropout)


def position_ids(input_ids: Array, config: RobertaConfig) -> Array:
    """Position ids of ``input_ids [..., T]`` (see module doc)."""
    if config.model_type == "roberta":
        m = (input_ids != config.pad_token_id).astype(jnp.int32)
        return jnp.cumsum(m, axis=-1) * m + config.pad_token_id
    return jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)


def _layer_norm(config: RobertaConfig, dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype,
                        use_fast_variance=False, name=name)


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout."""

    config: RobertaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: Array, token_type_ids: Array, deterministic: bool) -> Array:
        cfg = self.config

        def embed(n, name):
            return nn.Embed(n, cfg.hidden_size, embedding_init=_INIT, dtype=self.dtype, name=name)

        h = (embed(cfg.vocab_size, "word_embeddings")(input_ids)
             + embed(cfg.max_position_embeddings, "position_embeddings")(
                 position_ids(input_ids, cfg))
             + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids))
        h = _layer_norm(cfg, self.dtype, "LayerNorm")(h)
        return nn.Dropout(cfg.hidden_dropout_prob)(h, deterministic=deterministic)


class SelfAttention(nn.Module):
    """Multi-head self-attention with output projection and dropout (the
    residual and LayerNorm are in :class:`Layer`)."""

    config: RobertaConfig
    lora: LoRAConfig | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: Array, mask: Array, deterministic: bool) -> Array:
        cfg = self.config
        n_heads = cfg.num_attention_heads
        d_head = cfg.hidden_size // n_heads

        def proj(name):
            y = PEFTDense(cfg.hidden_size, lora=self.lora, dtype=self.dtype,
                          kernel_init=_INIT, name=name)(h, mask, deterministic)
            return y.reshape(y.shape[:-1] + (n_heads, d_head))

        q, k, v = proj("query"), proj("key"), proj("value")
        scores = jnp.einsum("...qhd,...khd->...hqk", q, k).astype(jnp.float32)
        scores = scores / jnp.sqrt(jnp.float32(d_head))
        keep = (mask > 0)[..., None, None, :]
        scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        probs = nn.Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        ctx = jnp.einsum("...hqk,...khd->...qhd", probs, v)
        ctx = ctx.reshape(ctx.shape[:-2] + (cfg.hidden_size,))
        out = PEFTDense(cfg.hidden_size, lora=self.lora, dtype=self.dtype,
                        kernel_init=_INIT, name="output")(ctx, mask, deterministic)
        return nn.Dropout(cfg.hidden_dropout_prob)(out, deterministic=deterministic)


class Layer(nn.Module):
    """One post-LayerNorm transformer block with optional adapters."""

    config: RobertaConfig
    lora: LoRAConfig | None = None
    adapter: AdapterConfig | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: Array, mask: Array, deterministic: bool) -> Array:
        cfg = self.config
        sites = adapter_sites(self.adapter)
        a = SelfAttention(cfg, self.lora, self.dtype, name="attention")(h, mask, deterministic)
        if "attention" in sites:
            a = Adapter(self.adapter, dtype=self.dtype, name="adapter_attention")(a, mask)
        h = _layer_norm(cfg, self.dtype, "attention_norm")(a + h)
        f = PEFTDense(cfg.intermediate_size, lora=self.lora, dtype=self.dtype,
                      kernel_init=_INIT, name="intermediate")(h, mask, deterministic)
        f = ACTIVATIONS[cfg.hidden_act](f)
        f = PEFTDense(cfg.hidden_size, lora=self.lora, dtype=self.dtype,
                      kernel_init=_INIT, name="output")(f, mask, deterministic)
        f = nn.Dropout(cfg.hidden_dropout_prob)(f, deterministic=deterministic)
        if "ffn" in sites:
            f = Adapter(self.adapter, dtype=self.dtype, name="adapter_ffn")(f, mask)
        return _layer_norm(cfg, self.dtype, "output_norm")(f + h)


class Encoder(nn.Module):
    """Embeddings and ``num_hidden_layers`` blocks -> last hidden state."""

    config: RobertaConfig
    lora: LoRAConfig | None = None
    adapter: AdapterConfig | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array, token_type_ids: Array,
                 deterministic: bool) -> Array:
        h = Embeddings(self.config, self.dtype, name="embeddings")(
            input_ids, token_type_ids, deterministic)
        for i in range(self.config.num_hidden_layers):
            h = Layer(self.config, self.lora, self.adapter, self.dtype, name=f"layer_{i}")(
                h, attention_mask, deterministic)
        return h


class ClassificationHead(nn.Module):
    """``out_proj(dropout(tanh(dense(dropout(h_0)))))`` on the first token;
    the first dropout is RoBERTa's only. ``mask`` is the first token's mask
    (so that all-padding examples are left out of K-FAC statistics)."""

    config: RobertaConfig
    num_labels: int
    dtype: Any = jnp.float32

    def setup(self):
        self.dense = KFACDense(self.config.hidden_size, dtype=self.dtype, kernel_init=_INIT)
        self.out_proj = KFACDense(self.num_labels, dtype=self.dtype, kernel_init=_INIT)
        self.dropout = nn.Dropout(self.config.head_dropout)

    def pool(self, h: Array, mask: Array, deterministic: bool = True) -> Array:
        """``tanh(dense(h[..., 0, :]))`` (BERT's pooler output)."""
        x = h[..., 0, :]
        if self.config.model_type == "roberta":
            x = self.dropout(x, deterministic=deterministic)
        return jnp.tanh(self.dense(x, mask))

    def __call__(self, h: Array, mask: Array, deterministic: bool = True) -> Array:
        x = self.dropout(self.pool(h, mask, deterministic), deterministic=deterministic)
        return self.out_proj(x, mask)


class RobertaClassifier(nn.Module):
    """Encoder + ``classifier`` head.

    ``task="classification"``: ``[B, T]`` -> logits ``[B, num_labels]``
    (``num_labels=1`` is regression). ``task="multiple_choice"``: ``[B, C, T]``
    -> scores ``[B, C]`` (the head has one output). Logits are float32.
    """

    config: RobertaConfig
    num_labels: int = 2
    lora: LoRAConfig | None = None
    adapter: AdapterConfig | None = None
    dtype: Any = jnp.float32
    task: str = "classification"

    def setup(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {TASKS}")
        n_out = 1 if self.task == "multiple_choice" else self.num_labels
        self.encoder = Encoder(self.config, self.lora, self.adapter, self.dtype)
        self.classifier = ClassificationHead(self.config, n_out, self.dtype)

    def encode(self, input_ids: Array, attention_mask: Array | None = None,
               token_type_ids: Array | None = None, deterministic: bool = True) -> Array:
        """Last hidden state ``[..., T, hidden_size]``."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
        return self.encoder(input_ids, attention_mask, token_type_ids, deterministic)

    def pooled(self, input_ids: Array, attention_mask: Array | None = None,
               token_type_ids: Array | None = None, deterministic: bool = True) -> Array:
        """``tanh(classifier.dense(first token))``: BERT's pooler output."""
        h = self.encode(input_ids, attention_mask, token_type_ids, deterministic)
        return self.classifier.pool(h, _first_mask(attention_mask, h), deterministic)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 token_type_ids: Array | None = None, deterministic: bool = True) -> Array:
        h = self.encode(input_ids, attention_mask, token_type_ids, deterministic)
        logits = self.classifier(h, _first_mask(attention_mask, h), deterministic)
        logits = logits.astype(jnp.float32)
        return logits[..., 0] if self.task == "multiple_choice" else logits


def _first_mask(attention_mask: Array | None, h: Array) -> Array:
    if attention_mask is None:
        return jnp.ones(h.shape[:-2], h.dtype)
    return attention_mask[..., 0]


def init_variables(module: RobertaClassifier, seed: int = 0) -> dict:
    """Random ``{"params", "kfac"}`` variables of ``module``."""
    shape = (1, 2, 4) if module.task == "multiple_choice" else (1, 4)
    ids = jnp.full(shape, module.config.pad_token_id + 1, jnp.int32)
    return dict(module.init(jax.random.PRNGKey(seed), ids, jnp.ones(shape, jnp.int32)))


def from_pretrained(path: str, lora: LoRAConfig | None = None,
                    adapter: AdapterConfig | None = None, num_labels: int = 2,
                    dtype: Any = jnp.float32, task: str = "classification",
                    seed: int = 0) -> tuple[RobertaClassifier, dict]:
    """Build a :class:`RobertaClassifier` from a Hugging Face checkpoint folder
    (``config.json`` + ``model.safetensors``). The encoder must be complete;
    LoRA/adapter weights and a head absent from the checkpoint are freshly
    initialised from ``seed``. Returns ``(module, variables)`` with
    ``variables = {"params": ..., "kfac": ...}``."""
    config = RobertaConfig.from_dict(read_config(path))
    module = RobertaClassifier(config, num_labels=num_labels, lora=lora, adapter=adapter,
                               dtype=dtype, task=task)
    variables = init_variables(module, seed)
    params = load_encoder_params(variables["params"], load_state_dict(path), config.model_type,
                                 source=f"checkpoint {path!r}")
    variables["params"] = jax.tree_util.tree_map(jnp.asarray, params)
    return module, variables


# --------------------------------------------------------------------------- checkpoint names


def _linear(src: str, dst: str) -> list[Row]:
    return [(f"{src}.weight", f"{dst}/kernel", "T"), (f"{src}.bias", f"{dst}/bias", None)]


def _norm(src: str, dst: str) -> list[Row]:
    return [(f"{src}.weight", f"{dst}/scale", None), (f"{src}.bias", f"{dst}/bias", None)]


_L, _F = "encoder.layer.{i}", "encoder/layer_{i}"

#: HF RoBERTa/BERT encoder names (after stripping "roberta."/"bert.") -> flax paths
ENCODER_TABLE: list[Row] = [
    ("embeddings.word_embeddings.weight", "encoder/embeddings/word_embeddings/embedding", None),
    ("embeddings.position_embeddings.weight",
     "encoder/embeddings/position_embeddings/embedding", None),
    ("embeddings.token_type_embeddings.weight",
     "encoder/embeddings/token_type_embeddings/embedding", None),
    *_norm("embeddings.LayerNorm", "encoder/embeddings/LayerNorm"),
    *_linear(f"{_L}.attention.self.query", f"{_F}/attention/query"),
    *_linear(f"{_L}.attention.self.key", f"{_F}/attention/key"),
    *_linear(f"{_L}.attention.self.value", f"{_F}/attention/value"),
    *_linear(f"{_L}.attention.output.dense", f"{_F}/attention/output"),
    *_norm(f"{_L}.attention.output.LayerNorm", f"{_F}/attention_norm"),
    *_linear(f"{_L}.intermediate.dense", f"{_F}/intermediate"),
    *_linear(f"{_L}.output.dense", f"{_F}/output"),
    *_norm(f"{_L}.output.LayerNorm", f"{_F}/output_norm"),
]

#: task heads: RoBERTa's classification head; BERT's pooler + linear classifier
HEAD_TABLES: dict[str, list[Row]] = {
    "roberta": [*_linear("classifier.dense", "classifier/dense"),
                *_linear("classifier.out_proj", "classifier/out_proj")],
    "bert": [*_linear("pooler.dense", "classifier/dense"),
             *_linear("classifier", "classifier/out_proj")],
}

#: checkpoint names that are not part of an encoder classifier
ENCODER_IGNORE: dict[str, tuple[str, ...]] = {
    "roberta": ("*position_ids", "lm_head.*", "pooler.*"),
    "bert": ("*position_ids", "cls.*"),
}


def normalise_encoder_names(state_dict: Mapping[str, Any]) -> StateDict:
    """Strip the ``roberta.``/``bert.`` prefix and rename legacy LayerNorm
    ``gamma``/``beta`` to ``weight``/``bias``."""
    out = {}
    for name, value in strip_prefixes(state_dict, ("roberta.", "bert.")).items():
        name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
        name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
        out[name] = value
    return out


def load_encoder_params(params_template: Mapping, state_dict: Mapping[str, Any],
                        model_type: str, source: str = "checkpoint") -> dict:
    """Fill a RoBERTa/BERT classifier template from a HF state dict. PEFT
    modules and the ``classifier`` head may be absent (they keep their
    initial values, as Hugging Face does for a new task head)."""
    if model_type not in SUPPORTED_ENCODERS:
        raise CheckpointError(f"unsupported model_type {model_type!r}; supported model "
                              f"types: {', '.join(SUPPORTED_ENCODERS)}")
    return assign(params_template, ENCODER_TABLE + HEAD_TABLES[model_type],
                  normalise_encoder_names(state_dict), ignore=ENCODER_IGNORE[model_type],
                  optional=PEFT_PATHS + ("classifier/*",), source=source)
