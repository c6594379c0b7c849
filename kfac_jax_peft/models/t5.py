"""T5 encoder-decoder (v1.0, v1.1 and Flan) in Flax linen, matching Hugging Face's PyTorch T5.

Conventions:

* Parameters are stored in float32; ``T5Config.dtype`` is the compute dtype
  (``float32`` or ``bfloat16``). RMS norms are computed in float32.
* Module names follow the Hugging Face checkpoint (``block_0`` for
  ``block.0``), so ``encoder/block_0/layer_0/SelfAttention/q/kernel`` holds
  ``encoder.block.0.layer.0.SelfAttention.q.weight`` transposed to Flax's
  ``[d_in, d_out]``. Attention projections are ``q, k, v, o`` and the
  feed-forward projections ``wi`` (v1.0) or ``wi_0, wi_1`` (gated) and ``wo``,
  so LoRA targets such as ``("q", "v")`` match by name.
* Masks are ``[batch, length]`` with 1 for real tokens and 0 for padding. Every
  trainable projection receives, as its K-FAC token mask, the mask of the
  tokens it reads: encoder mask on the encoder side, decoder mask on the
  decoder side; in cross-attention ``q``/``o`` read decoder positions and
  ``k``/``v`` encoder positions.
* Attention scores are *not* scaled by ``1/sqrt(d_kv)`` (the T5 convention).
  A relative position bias is computed by the first block of each stack
  (bidirectional buckets in the encoder, causal in the decoder) and shared by
  the later blocks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from kfac_jax_peft.capture import KFACDense
from kfac_jax_peft.models import loading
from kfac_jax_peft.peft import Adapter, AdapterConfig, LoRAConfig, PEFTDense, adapter_sites
from kfac_jax_peft.peft.tree import is_trainable_path

Array = jax.Array

#: ``kfac_precondition(..., input_groups=INPUT_GROUPS)``: LoRA ``A`` layers
#: reading the same input share one input factor: ``q``/``k``/``v`` of one
#: self-attention, and the cross-attention ``k``/``v`` of every decoder
#: block (all read the encoder output). Exact without LoRA dropout.
INPUT_GROUPS = [(r"(.*/SelfAttention)/[qkv]/lora_A/kernel", r"\1"),
                (r".*/EncDecAttention/[kv]/lora_A/kernel", "encoder_output")]
_NEG = -1e9  # attention logit of masked keys (finite: a fully masked row stays finite)


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hyper-parameters of a T5 model (field names as in Hugging Face's ``config.json``).

    ``tie_word_embeddings`` says whether the output projection reuses the
    ``shared`` embedding; ``scale_decoder_outputs`` whether the decoder output is
    multiplied by ``d_model ** -0.5`` before it (v1.0 does both, v1.1/Flan
    neither). ``lora``/``adapter`` inject parameter-efficient layers;
    ``num_labels`` adds an encoder-only classification head named ``classifier``.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool | None = None
    dropout_rate: float = 0.1
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    num_labels: int | None = None
    lora: LoRAConfig | None = None
    adapter: AdapterConfig | None = None
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.feed_forward_proj not in ("relu", "gated-gelu"):
            raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r} is not supported; "
                             "expected 'relu' (T5 v1.0) or 'gated-gelu' (T5 v1.1 / Flan)")
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        if self.scale_decoder_outputs is None:
            object.__setattr__(self, "scale_decoder_outputs", self.tie_word_embeddings)

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj == "gated-gelu"

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> T5Config:
        """Config from a Hugging Face ``config.json`` dict; unknown keys are ignored.

        ``eos_token_id`` given as a list keeps its first entry.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and v is not None}
        if isinstance(kw.get("eos_token_id"), (list, tuple)):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        kw.update(overrides)
        return cls(**kw)


# ----------------------------------------------------------------------------- pure helpers


def relative_position_bucket(relative_position: Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
    """Bucket of ``memory_position - query_position`` (integer array, any shape).

    Half of the buckets hold exact small distances, the other half
    logarithmically wider bins up to ``max_distance``. Bidirectional buckets
    split the range between negative and positive offsets; causal buckets only
    count how far back the key lies.
    """
    rel = relative_position.astype(jnp.int32)
    bucket = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (rel > 0).astype(jnp.int32) * num_buckets
        rel = jnp.abs(rel)
    else:
        rel = -jnp.minimum(rel, 0)
    max_exact = num_buckets // 2
    log_ratio = jnp.log(jnp.maximum(rel, 1).astype(jnp.float32) / max_exact)
    large = max_exact + (log_ratio / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(rel < max_exact, rel, large)


def shift_right(labels: Array, decoder_start_token_id: int = 0, pad_token_id: int = 0) -> Array:
    """Decoder inputs from targets ``[..., L]``: prepend the start token, drop the
    last token and replace ignored labels (``-100``) by padding."""
    start = jnp.full(labels.shape[:-1] + (1,), decoder_start_token_id, labels.dtype)
    shifted = jnp.concatenate([start, labels[..., :-1]], axis=-1)
    return jnp.where(shifted == -100, pad_token_id, shifted)


def _attention_allowed(kv_mask: Array, q_len: int, causal: bool) -> Array:
    """Boolean ``[batch, 1, q_len, kv_len]``: the keys each query may attend to (real
    tokens, and with ``causal`` not after the query; queries and keys then align)."""
    allowed = kv_mask[:, None, None, :].astype(bool)
    if causal:
        allowed = allowed & jnp.tril(jnp.ones((q_len, kv_mask.shape[-1]), bool))[None, None]
    return allowed


def _ones_mask(ids: Array) -> Array:
    return jnp.ones(ids.shape, jnp.int32)


# ----------------------------------------------------------------------------- layers


def _dense(cfg: T5Config, features: int, name: str) -> nn.Module:
    """A bias-free projection named like its Hugging Face counterpart (LoRA if targeted)."""
    return PEFTDense(features, use_bias=False, lora=cfg.lora, dtype=cfg.dtype, name=name)


def _apply_adapter(cfg: T5Config, site: str, y: Array, mask: Array) -> Array:
    """``y`` through the adapter ``adapter_{site}`` when ``cfg.adapter`` places one there."""
    if site not in adapter_sites(cfg.adapter):
        return y
    return Adapter(cfg.adapter, dtype=cfg.dtype, name=f"adapter_{site}")(y, mask)


class T5LayerNorm(nn.Module):
    """RMS norm: ``weight * x / sqrt(mean(x^2) + eps)``, no mean subtraction, no bias."""

    eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        xf = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
        return (weight * (xf * jax.lax.rsqrt(var + self.eps))).astype(self.dtype)


class T5Attention(nn.Module):
    """Multi-head attention with projections ``q, k, v, o``; the first block of a stack
    also owns ``relative_attention_bias`` (an ``[num_buckets, num_heads]`` table)."""

    config: T5Config
    has_relative_bias: bool = False
    causal: bool = False

    def setup(self):
        c = self.config
        inner = c.num_heads * c.d_kv
        self.q = _dense(c, inner, "q")
        self.k = _dense(c, inner, "k")
        self.v = _dense(c, inner, "v")
        self.o = _dense(c, c.d_model, "o")
        if self.has_relative_bias:
            self.relative_attention_bias = nn.Embed(
                c.relative_attention_num_buckets, c.num_heads,
                embedding_init=nn.initializers.normal(c.d_model ** -0.5))
        self.dropout = nn.Dropout(c.dropout_rate)

    def compute_bias(self, q_len: int, k_len: int) -> Array:
        """Relative position bias ``[1, num_heads, q_len, k_len]``."""
        c = self.config
        rel = jnp.arange(k_len)[None, :] - jnp.arange(q_len)[:, None]
        buckets = relative_position_bucket(rel, not self.causal, c.relative_attention_num_buckets,
                                           c.relative_attention_max_distance)
        return jnp.transpose(self.relative_attention_bias(buckets), (2, 0, 1))[None]

    def __call__(self, x, kv, q_mask, kv_mask, position_bias, deterministic):
        """Attend from ``x [B, Tq, D]`` to ``kv [B, Tk, D]``; returns ``(out, position_bias)``."""
        c = self.config
        b, tq, tk = x.shape[0], x.shape[1], kv.shape[1]

        def heads(y, t):
            return y.reshape(b, t, c.num_heads, c.d_kv)

        q = heads(self.q(x, q_mask, deterministic), tq)
        k = heads(self.k(kv, kv_mask, deterministic), tk)
        v = heads(self.v(kv, kv_mask, deterministic), tk)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        if position_bias is None:
            position_bias = (self.compute_bias(tq, tk) if self.has_relative_bias
                             else jnp.zeros((1, c.num_heads, tq, tk), jnp.float32))
        scores = scores + position_bias.astype(jnp.float32)
        scores = jnp.where(_attention_allowed(kv_mask, tq, self.causal), scores, _NEG)
        weights = jax.nn.softmax(scores, axis=-1).astype(c.dtype)
        weights = self.dropout(weights, deterministic=deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, tq, -1)
        return self.o(out, q_mask, deterministic), position_bias


class T5DenseActDense(nn.Module):
    """Feed-forward ``wo(act(wi x))`` (ReLU), or ``wo(gelu(wi_0 x) * wi_1 x)`` when gated."""

    config: T5Config

    @nn.compact
    def __call__(self, x, mask, deterministic):
        c = self.config
        if c.gated:
            gate = jax.nn.gelu(_dense(c, c.d_ff, "wi_0")(x, mask, deterministic), approximate=True)
            h = gate * _dense(c, c.d_ff, "wi_1")(x, mask, deterministic)
        else:
            h = jax.nn.relu(_dense(c, c.d_ff, "wi")(x, mask, deterministic))
        h = nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)
        return _dense(c, c.d_model, "wo")(h, mask, deterministic)


class T5LayerSelfAttention(nn.Module):
    """Pre-norm self-attention sub-layer with residual (and optional adapter)."""

    config: T5Config
    has_relative_bias: bool = False
    causal: bool = False

    @nn.compact
    def __call__(self, h, mask, position_bias, deterministic):
        c = self.config
        x = T5LayerNorm(c.layer_norm_epsilon, c.dtype, name="layer_norm")(h)
        y, position_bias = T5Attention(c, self.has_relative_bias, self.causal,
                                       name="SelfAttention")(x, x, mask, mask, position_bias,
                                                             deterministic)
        y = _apply_adapter(c, "attention", y, mask)
        return h + nn.Dropout(c.dropout_rate)(y, deterministic=deterministic), position_bias


class T5LayerCrossAttention(nn.Module):
    """Pre-norm attention from decoder positions to the encoder output, with residual."""

    config: T5Config

    @nn.compact
    def __call__(self, h, enc, mask, enc_mask, deterministic):
        c = self.config
        x = T5LayerNorm(c.layer_norm_epsilon, c.dtype, name="layer_norm")(h)
        y, _ = T5Attention(c, name="EncDecAttention")(x, enc, mask, enc_mask, None, deterministic)
        return h + nn.Dropout(c.dropout_rate)(y, deterministic=deterministic)


class T5LayerFF(nn.Module):
    """Pre-norm feed-forward sub-layer with residual (and optional adapter)."""

    config: T5Config

    @nn.compact
    def __call__(self, h, mask, deterministic):
        c = self.config
        x = T5LayerNorm(c.layer_norm_epsilon, c.dtype, name="layer_norm")(h)
        y = T5DenseActDense(c, name="DenseReluDense")(x, mask, deterministic)
        y = _apply_adapter(c, "ffn", y, mask)
        return h + nn.Dropout(c.dropout_rate)(y, deterministic=deterministic)


class T5Block(nn.Module):
    """Self-attention (``layer_0``), cross-attention (``layer_1``, decoder only), FFN."""

    config: T5Config
    is_decoder: bool = False
    has_relative_bias: bool = False

    @nn.compact
    def __call__(self, h, mask, position_bias, enc, enc_mask, deterministic):
        c = self.config
        h, position_bias = T5LayerSelfAttention(c, self.has_relative_bias, self.is_decoder,
                                                name="layer_0")(h, mask, position_bias,
                                                                deterministic)
        if self.is_decoder:
            h = T5LayerCrossAttention(c, name="layer_1")(h, enc, mask, enc_mask, deterministic)
        ff_name = "layer_2" if self.is_decoder else "layer_1"
        return T5LayerFF(c, name=ff_name)(h, mask, deterministic), position_bias


class T5Stack(nn.Module):
    """Encoder or decoder stack acting on embedded tokens ``[B, T, D]``."""

    config: T5Config
    is_decoder: bool = False

    @nn.compact
    def __call__(self, h, mask, enc=None, enc_mask=None, deterministic=True):
        c = self.config
        n = c.num_decoder_layers if self.is_decoder else c.num_layers
        h = nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)
        position_bias = None
        for i in range(n):
            h, position_bias = T5Block(c, self.is_decoder, i == 0, name=f"block_{i}")(
                h, mask, position_bias, enc, enc_mask, deterministic)
        h = T5LayerNorm(c.layer_norm_epsilon, c.dtype, name="final_layer_norm")(h)
        return nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)


class T5(nn.Module):
    """T5 for conditional generation: ``__call__`` returns logits ``[B, T_dec, vocab]``.

    Sub-modules: ``shared`` (token embedding), ``encoder``, ``decoder``, ``lm_head``
    (only when untied) and ``classifier`` (only with ``config.num_labels``).
    """

    config: T5Config

    def setup(self):
        c = self.config
        self.shared = nn.Embed(c.vocab_size, c.d_model, dtype=c.dtype,
                               embedding_init=nn.initializers.normal(1.0))
        self.encoder = T5Stack(c, is_decoder=False)
        self.decoder = T5Stack(c, is_decoder=True)
        if not c.tie_word_embeddings:
            self.lm_head = _dense(dataclasses.replace(c, lora=None), c.vocab_size, "lm_head")
        if c.num_labels:
            self.classifier = KFACDense(c.num_labels, dtype=c.dtype)

    def _embed(self, ids: Array) -> Array:
        return self.shared(ids).astype(self.config.dtype)

    def encode(self, input_ids, attention_mask=None, deterministic=True):
        """Encoder hidden states ``[B, T, D]``."""
        mask = _ones_mask(input_ids) if attention_mask is None else attention_mask
        return self.encoder(self._embed(input_ids), mask, deterministic=deterministic)

    def decode(self, encoder_hidden, attention_mask, decoder_input_ids,
               decoder_attention_mask=None, deterministic=True):
        """Logits ``[B, T_dec, vocab]`` (float32) from encoder states and decoder inputs."""
        c = self.config
        enc_mask = (jnp.ones(encoder_hidden.shape[:2], jnp.int32) if attention_mask is None
                    else attention_mask)
        dec_mask = (_ones_mask(decoder_input_ids) if decoder_attention_mask is None
                    else decoder_attention_mask)
        h = self.decoder(self._embed(decoder_input_ids), dec_mask, encoder_hidden, enc_mask,
                         deterministic=deterministic)
        if c.scale_decoder_outputs:
            h = h * (c.d_model ** -0.5)
        if c.tie_word_embeddings:
            logits = self.shared.attend(h)
        else:
            logits = self.lm_head(h)
        return logits.astype(jnp.float32)

    def __call__(self, input_ids, attention_mask, decoder_input_ids,
                 decoder_attention_mask=None, deterministic=True):
        """Logits ``[B, T_dec, vocab]`` (float32). ``decoder_input_ids`` are the shifted
        targets (:func:`shift_right`); ``deterministic=False`` applies dropout and needs
        ``rngs={"dropout": key}``."""
        enc = self.encode(input_ids, attention_mask, deterministic)
        return self.decode(enc, attention_mask, decoder_input_ids, decoder_attention_mask,
                           deterministic)

    def classify(self, input_ids, attention_mask=None, deterministic=True):
        """Encoder-only classification: masked mean of encoder states -> ``classifier``."""
        mask = _ones_mask(input_ids) if attention_mask is None else attention_mask
        h = self.encode(input_ids, mask, deterministic).astype(jnp.float32)
        m = mask.astype(jnp.float32)[..., None]
        pooled = jnp.sum(h * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
        return self.classifier(pooled.astype(self.config.dtype)).astype(jnp.float32)

    def init_all(self, input_ids, attention_mask, decoder_input_ids):
        """Touch every sub-module (use as ``method`` at ``init``)."""
        logits = self(input_ids, attention_mask, decoder_input_ids)
        if self.config.num_labels:
            return logits, self.classify(input_ids, attention_mask)
        return logits


def init_variables(module: T5, rng: Array, batch: int = 1, length: int = 4) -> dict:
    """Freshly initialised variables (``params`` and the ``kfac`` probes) of ``module``."""
    ids = jnp.zeros((batch, length), jnp.int32)
    return module.init(rng, ids, _ones_mask(ids), ids, method=T5.init_all)


# ----------------------------------------------------------------------------- inference


def greedy_generate(module: T5, variables: dict, input_ids: Array, attention_mask: Array,
                    max_new_tokens: int) -> Array:
    """Greedy decoding; returns ``[B, 1 + max_new_tokens]`` tokens starting with the
    decoder start token, ``pad_token_id`` after each sequence's end-of-sequence token.

    Every step re-runs the decoder on the fixed-length buffer (no KV cache), so the
    function has static shapes and can be jitted with ``max_new_tokens`` static.
    """
    c = module.config
    enc = module.apply(variables, input_ids, attention_mask, method=T5.encode)
    b = input_ids.shape[0]
    tokens = jnp.full((b, max_new_tokens + 1), c.pad_token_id, jnp.int32)
    tokens = tokens.at[:, 0].set(c.decoder_start_token_id)

    def step(i, carry):
        tokens, done = carry
        logits = module.apply(variables, enc, attention_mask, tokens[:, :-1], method=T5.decode)
        nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, i, 1, keepdims=False), axis=-1)
        nxt = jnp.where(done, c.pad_token_id, nxt).astype(jnp.int32)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, nxt, i + 1, 1)
        return tokens, done | (nxt == c.eos_token_id)

    tokens, _ = jax.lax.fori_loop(0, max_new_tokens, step, (tokens, jnp.zeros((b,), bool)))
    return tokens


def score_labels(module: T5, variables: dict, input_ids: Array, attention_mask: Array,
                 label_token_ids: Array, label_mask: Array | None = None) -> Array:
    """Log-likelihood ``[B, K]`` of each of ``K`` label sequences given each input.

    ``label_token_ids`` is ``[K, L]`` (targets, e.g. a label word and ``</s>``),
    right-padded with ``pad_token_id``; ``label_mask`` (default: non-pad tokens)
    selects the tokens whose log-probabilities are summed. Use
    ``argmax(-1)`` of the result for text-to-text classification.
    """
    c = module.config
    if label_mask is None:
        label_mask = label_token_ids != c.pad_token_id
    b, (k, length) = input_ids.shape[0], label_token_ids.shape
    enc = module.apply(variables, input_ids, attention_mask, method=T5.encode)
    enc = jnp.repeat(enc, k, axis=0)
    enc_mask = jnp.repeat(attention_mask, k, axis=0)
    targets = jnp.broadcast_to(label_token_ids, (b, k, length)).reshape(b * k, length)
    dec_in = shift_right(targets, c.decoder_start_token_id, c.pad_token_id)
    logits = module.apply(variables, enc, enc_mask, dec_in, method=T5.decode)
    logp = jax.nn.log_softmax(logits, axis=-1)
    tok = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0].reshape(b, k, length)
    return jnp.sum(tok * label_mask.astype(tok.dtype)[None], axis=-1)


# ----------------------------------------------------------------------------- checkpoints

# Checkpoint names that alias ``shared.weight`` (exports differ in which of the tied
# copies they keep) and a key the model has no use for.
_SHARED_ALIASES = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def hf_name(path: tuple[str, ...]) -> str:
    """Hugging Face name of the Flax parameter at ``path``.

    ``("encoder", "block_0", "layer_0", "SelfAttention", "q", "kernel")`` maps to
    ``encoder.block.0.layer.0.SelfAttention.q.weight``.
    """
    parts = []
    for p in path[:-1]:
        head, _, idx = p.rpartition("_")
        parts.extend([head, idx] if head in ("block", "layer") and idx.isdigit() else [p])
    return ".".join(parts + ["weight"])


def checkpoint_table(params: dict) -> list[tuple[str, str, str | None]]:
    """Rows ``(hf_name, flax_path, transform)`` of every frozen (base-model) parameter
    (see :mod:`kfac_jax_peft.models.loading`); kernels are transposed, and every
    copy of the tied embedding fills ``shared`` (and ``lm_head`` when it is tied)."""
    rows = []
    for path in traverse_util.flatten_dict(unfreeze(params)):
        if not is_trainable_path(path):
            rows.append((hf_name(path), "/".join(path), "T" if path[-1] == "kernel" else None))
    aliases = _SHARED_ALIASES[1:] + (() if "lm_head" in params else ("lm_head.weight",))
    return rows + [(name, "shared/embedding", None) for name in aliases]


def _lm_head_tied(cfg: T5Config, state: dict) -> bool:
    """Whether the output projection is the shared embedding: no ``lm_head.weight``
    (and a config that ties), or one equal to the embedding (as Hugging Face decides)."""
    if "lm_head.weight" not in state:
        return cfg.tie_word_embeddings
    shared = next((state[a] for a in _SHARED_ALIASES if a in state), None)
    return shared is not None and bool(np.array_equal(shared, state["lm_head.weight"]))


def from_pretrained(path: str, lora: LoRAConfig | None = None,
                    adapter: AdapterConfig | None = None, dtype: Any = jnp.float32, *,
                    num_labels: int | None = None, dropout_rate: float | None = None,
                    seed: int = 0) -> tuple[T5, dict]:
    """``(module, variables)`` from a Hugging Face folder (``config.json`` and
    ``model.safetensors``). PEFT parameters (LoRA, adapters, ``classifier``) are
    freshly initialised from ``seed``; everything else must come from the checkpoint,
    else :class:`~kfac_jax_peft.models.loading.CheckpointError` lists the missing,
    unexpected and mismatched keys. ``dtype`` is the compute dtype.
    """
    raw = loading.read_config(path)
    loading.check_model_type(raw, ("t5", "mt5"))
    overrides = {} if dropout_rate is None else {"dropout_rate": dropout_rate}
    cfg = T5Config.from_dict(raw, lora=lora, adapter=adapter, dtype=dtype,
                             num_labels=num_labels, **overrides)
    state = loading.load_state_dict(path)
    module = T5(dataclasses.replace(cfg, tie_word_embeddings=_lm_head_tied(cfg, state)))
    variables = dict(init_variables(module, jax.random.PRNGKey(seed)))
    params = loading.assign(variables["params"], checkpoint_table(variables["params"]), state,
                            ignore=_IGNORED, optional=loading.PEFT_PATHS + ("classifier/*",),
                            source=f"checkpoint {path!r}")
    variables["params"] = jax.tree_util.tree_map(jnp.asarray, params)
    return module, variables
