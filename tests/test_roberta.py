"""RoBERTa/BERT model: parity with Hugging Face transformers, task heads,
adapters, dtypes and K-FAC statistics of LoRA layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from kfac_jax_peft.capture import kfac_value_and_grad
from kfac_jax_peft.models.roberta import (
    RobertaClassifier,
    RobertaConfig,
    from_pretrained,
    init_variables,
)
from kfac_jax_peft.peft import AdapterConfig, LoRAConfig

TINY = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=40, layer_norm_eps=1e-5)
# two sequences, the second padded (pad id 1): RoBERTa style
IDS = np.array([[0, 5, 6, 7, 8, 2], [0, 9, 10, 2, 1, 1]])
MASK = (IDS != 1).astype(np.int32)


def tiny_config(**kw):
    return RobertaConfig(**{**TINY, "type_vocab_size": 1, "pad_token_id": 1, **kw})


def hf_checkpoint(tmp_path_factory, name, model_cls, config_cls, **kw):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**TINY, **kw))
    model.eval()
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(str(folder), safe_serialization=True)
    return torch, model, str(folder)


@pytest.fixture(scope="module")
def roberta_ckpt(tmp_path_factory):
    return hf_checkpoint(tmp_path_factory, "roberta", "RobertaForSequenceClassification",
                         "RobertaConfig", num_labels=3, type_vocab_size=1)


@pytest.fixture(scope="module")
def bert_ckpt(tmp_path_factory):
    return hf_checkpoint(tmp_path_factory, "bert", "BertForSequenceClassification",
                         "BertConfig", num_labels=2, type_vocab_size=2)


def test_roberta_classification_parity_with_padding(roberta_ckpt):
    torch, model, folder = roberta_ckpt
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits
    module, variables = from_pretrained(folder, num_labels=3)
    out = module.apply({"params": variables["params"]}, jnp.asarray(IDS), jnp.asarray(MASK))
    np.testing.assert_allclose(np.asarray(out), ref.numpy(), atol=1e-4, rtol=0)


def test_bert_hidden_states_pooler_and_logits_parity(bert_ckpt):
    torch, model, folder = bert_ckpt
    ids = np.array([[2, 7, 8, 9, 3, 11], [2, 12, 13, 3, 0, 0]])
    mask = (ids != 0).astype(np.int32)
    types = np.array([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]])
    with torch.no_grad():
        t = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 token_type_ids=torch.tensor(types))
        base = model.bert(**t)
        logits = model(**t).logits.numpy()
    module, variables = from_pretrained(folder, num_labels=2)
    v = {"params": variables["params"]}
    args = (jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    hidden = np.asarray(module.apply(v, *args, method=RobertaClassifier.encode))
    real = mask.astype(bool)
    np.testing.assert_allclose(hidden[real], base.last_hidden_state.numpy()[real], atol=1e-4)
    pooled = module.apply(v, *args, method=RobertaClassifier.pooled)
    np.testing.assert_allclose(np.asarray(pooled), base.pooler_output.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(module.apply(v, *args)), logits, atol=1e-4)


def test_regression_and_multiple_choice_heads():
    cfg = tiny_config()
    reg = RobertaClassifier(cfg, num_labels=1)
    v = init_variables(reg)
    assert reg.apply(v, jnp.asarray(IDS), jnp.asarray(MASK)).shape == (2, 1)

    mc = RobertaClassifier(cfg, task="multiple_choice")
    vm = init_variables(mc)
    ids = jnp.stack([jnp.asarray(IDS), jnp.asarray(IDS[::-1])])  # [B=2, C=2, T]
    mask = (ids != 1).astype(jnp.int32)
    scores = jax.jit(mc.apply)(vm, ids, mask)
    assert scores.shape == (2, 2)
    # each choice scored on its own equals the joint [B, C, T] pass
    single = jax.jit(reg.apply)({"params": vm["params"]}, ids.reshape(4, -1),
                                mask.reshape(4, -1))
    np.testing.assert_allclose(np.asarray(scores).reshape(-1), np.asarray(single)[:, 0],
                               atol=1e-5)


def test_adapter_placement_and_identity_at_init():
    cfg = tiny_config()
    base = RobertaClassifier(cfg)
    vb = init_variables(base)
    ref = base.apply(vb, jnp.asarray(IDS), jnp.asarray(MASK))
    for placement, sites in (("houlsby", {"adapter_attention", "adapter_ffn"}),
                             ("pfeiffer", {"adapter_ffn"})):
        model = RobertaClassifier(cfg, adapter=AdapterConfig(reduction_factor=4,
                                                              placement=placement))
        v = init_variables(model)
        layer = v["params"]["encoder"]["layer_0"]
        assert {k for k in layer if k.startswith("adapter")} == sites
        assert layer["adapter_ffn"]["down"]["kernel"].shape == (32, 8)
        params = _with_adapters(vb["params"], v["params"])
        out = model.apply({"params": params}, jnp.asarray(IDS), jnp.asarray(MASK))
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-6)


def _with_adapters(base, peft):
    """``base`` params plus the adapter leaves of ``peft``."""
    flat = traverse_util.flatten_dict(dict(base))
    for k, val in traverse_util.flatten_dict(dict(peft)).items():
        if any(p.startswith("adapter") for p in k):
            flat[k] = val
    return traverse_util.unflatten_dict(flat)


def test_bfloat16_compute_close_to_float32():
    cfg = tiny_config()
    f32 = RobertaClassifier(cfg, lora=LoRAConfig(rank=2))
    v = init_variables(f32)
    bf16 = RobertaClassifier(cfg, lora=LoRAConfig(rank=2), dtype=jnp.bfloat16)
    a = f32.apply(v, jnp.asarray(IDS), jnp.asarray(MASK))
    b = bf16.apply(v, jnp.asarray(IDS), jnp.asarray(MASK))
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=5e-2)


def test_dropout_needs_rng_and_changes_outputs():
    model = RobertaClassifier(tiny_config(), lora=LoRAConfig(rank=2, dropout=0.5))
    v = init_variables(model)
    args = (jnp.asarray(IDS), jnp.asarray(MASK))
    det = model.apply(v, *args)
    train = model.apply(v, *args, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)})
    assert not np.allclose(np.asarray(det), np.asarray(train))


def _perturbed_lora_params(params, seed=1):
    """Give every ``lora_B`` a non-zero kernel so that ``lora_A`` has gradients."""
    flat = traverse_util.flatten_dict(dict(params))
    keys = jax.random.split(jax.random.PRNGKey(seed), len(flat))
    for key, (k, val) in zip(keys, sorted(flat.items()), strict=True):
        if "lora_B" in k:
            flat[k] = 0.1 * jax.random.normal(key, val.shape)
    return traverse_util.unflatten_dict(flat)


def test_kfac_statistics_of_a_lora_layer_match_independent_computation():
    cfg = tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    lora = LoRAConfig(rank=3, alpha=6.0)
    model = RobertaClassifier(cfg, num_labels=3, lora=lora)
    v = init_variables(model)
    params = _perturbed_lora_params(v["params"])
    ids, mask = jnp.asarray(IDS), jnp.asarray(MASK)
    labels = jnp.array([0, 2])

    def loss_from_logits(logits):
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))

    def loss_fn(p, probes):
        return loss_from_logits(model.apply({"params": p, "kfac": probes}, ids, mask))

    _, _, stats = jax.jit(kfac_value_and_grad(loss_fn))(params, v["kfac"])
    flat_stats = traverse_util.flatten_dict(dict(stats), is_leaf=lambda k, x: hasattr(x, "A"))
    assert all(k[-2] in ("lora_A", "lora_B") or k[0] == "classifier" for k in flat_stats)

    target = ("encoder", "layer_1", "attention", "value", "lora_A")
    x, g = _layer_input_and_output_cotangent(model, params, target, ids, mask,
                                             loss_from_logits, lora.rank)
    m = np.asarray(mask, np.float64).reshape(-1)
    xf = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    gf = np.asarray(g, np.float64).reshape(-1, g.shape[-1])
    n_ex = 2.0
    want_A = (xf * m[:, None]).T @ xf
    want_G = n_ex**2 * (gf * m[:, None]).T @ gf
    got = stats
    for name in target:
        got = got[name]
    got = got["kernel"]
    assert float(got.num_tokens) == m.sum() and float(got.num_examples) == n_ex
    np.testing.assert_allclose(np.asarray(got.A), want_A, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got.G), want_G, rtol=1e-4, atol=1e-9)
    assert np.abs(want_G).max() > 0


def _layer_input_and_output_cotangent(model, params, target, ids, mask, loss_from_logits,
                                      width):
    """Input of the module at ``target`` and ``dL/d(output)``, found by
    intercepting its call (no K-FAC probes involved): an additive zero
    ``delta`` on its output is differentiated."""
    seen = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.module.scope.path == target and context.method_name == "__call__":
            seen["x"] = args[0]
            return out + seen["delta"]
        return out

    def run(delta):
        seen["delta"] = delta
        with nn.intercept_methods(interceptor):
            loss = loss_from_logits(model.apply({"params": params}, ids, mask))
        return loss, seen["x"]

    g, x = jax.jit(jax.grad(run, has_aux=True))(jnp.zeros(ids.shape + (width,)))
    return x, g
