"""T5 in Flax against Hugging Face's PyTorch T5, and its K-FAC statistics."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfac_jax_peft import kfac_value_and_grad
from kfac_jax_peft.models import t5
from kfac_jax_peft.models.loading import CheckpointError
from kfac_jax_peft.peft import AdapterConfig, LoRAConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

TINY = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16,
            dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
VARIANTS = {
    "v1_0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                 num_decoder_layers=3),
}

# encoder: right padding, left padding and none; decoder: right padding
ENC_MASK = np.array([[1] * 9 + [0] * 3, [0] * 4 + [1] * 8, [1] * 12], np.int32)
DEC_MASK = np.array([[1] * 5 + [0] * 2, [1] * 7, [1] * 3 + [0] * 4], np.int32)


def _ids(mask, seed):
    ids = np.random.default_rng(seed).integers(2, TINY["vocab_size"], mask.shape)
    return (ids * mask).astype(np.int32)


ENC_IDS, DEC_IDS = _ids(ENC_MASK, 0), _ids(DEC_MASK, 1)


def _hf_model(variant):
    torch.manual_seed(0)
    cfg = transformers.T5Config(**TINY, **VARIANTS[variant])
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    if not VARIANTS[variant]["tie_word_embeddings"]:
        # a distinct output projection, as in v1.1 / Flan checkpoints
        model.lm_head.weight = torch.nn.Parameter(torch.randn(cfg.vocab_size, cfg.d_model))
    with torch.no_grad():  # non-trivial norm weights, so that a misplaced norm shows
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request, tmp_path_factory):
    """``(variant, hf_model, folder)`` with the model saved as safetensors."""
    model = _hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder, safe_serialization=True)
    return request.param, model, str(folder)


def _hf_logits(model, dec_mask=DEC_MASK):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ENC_IDS, dtype=torch.long),
                    attention_mask=torch.tensor(ENC_MASK),
                    decoder_input_ids=torch.tensor(DEC_IDS, dtype=torch.long),
                    decoder_attention_mask=torch.tensor(dec_mask))
    return out.logits.numpy()


def test_logits_match_transformers(checkpoint):
    variant, model, folder = checkpoint
    module, variables = t5.from_pretrained(folder)
    assert module.config.tie_word_embeddings == (variant == "v1_0")
    assert module.config.scale_decoder_outputs == (variant == "v1_0")
    ours = module.apply(variables, ENC_IDS, ENC_MASK, DEC_IDS, DEC_MASK)
    real = DEC_MASK.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[real], _hf_logits(model)[real],
                               atol=1e-4, rtol=1e-4)


def test_bfloat16_compute_is_close(checkpoint):
    _, _, folder = checkpoint
    m32, v32 = t5.from_pretrained(folder)
    m16, v16 = t5.from_pretrained(folder, dtype=jnp.bfloat16)
    a = np.asarray(m32.apply(v32, ENC_IDS, ENC_MASK, DEC_IDS, DEC_MASK))
    b = np.asarray(m16.apply(v16, ENC_IDS, ENC_MASK, DEC_IDS, DEC_MASK))
    assert b.dtype == np.float32 and np.isfinite(b).all()
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()


def test_relative_position_bucket_matches_transformers():
    rel = torch.arange(-40, 41)[None, :]
    attn = transformers.models.t5.modeling_t5.T5Attention
    for bidirectional in (True, False):
        ref = attn._relative_position_bucket(rel, bidirectional, 8, 16).numpy()
        ours = t5.relative_position_bucket(jnp.asarray(rel.numpy()), bidirectional, 8, 16)
        np.testing.assert_array_equal(np.asarray(ours), ref)


def test_shift_right():
    labels = jnp.array([[5, 6, -100], [7, 1, 0]])
    np.testing.assert_array_equal(t5.shift_right(labels, 0, 0), [[0, 5, 6], [0, 7, 1]])


def test_greedy_matches_generate(checkpoint):
    _, model, folder = checkpoint
    module, variables = t5.from_pretrained(folder)
    steps = 4
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor(ENC_IDS, dtype=torch.long),
                             attention_mask=torch.tensor(ENC_MASK), do_sample=False,
                             num_beams=1, max_new_tokens=steps,
                             use_cache=False).numpy()
    gen = jax.jit(t5.greedy_generate, static_argnums=(0, 4))
    ours = np.asarray(gen(module, variables, ENC_IDS, ENC_MASK, steps))
    assert ours.shape == (3, steps + 1)
    np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref)
    assert (ours[:, ref.shape[1]:] == TINY["pad_token_id"]).all()


def test_score_labels_matches_transformers(checkpoint):
    _, model, folder = checkpoint
    module, variables = t5.from_pretrained(folder)
    labels = np.array([[17, 1, 0], [23, 31, 1]], np.int32)  # "word </s>" right-padded
    scores = np.asarray(t5.score_labels(module, variables, ENC_IDS, ENC_MASK, labels))
    assert scores.shape == (3, 2)
    for k, lab in enumerate(labels):
        n = int((lab != 0).sum())
        target = torch.tensor(np.tile(lab[:n], (3, 1)), dtype=torch.long)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(ENC_IDS, dtype=torch.long),
                           attention_mask=torch.tensor(ENC_MASK), labels=target).logits
        logp = torch.log_softmax(logits, -1).gather(-1, target[..., None])[..., 0].sum(-1)
        np.testing.assert_allclose(scores[:, k], logp.numpy(), atol=1e-4, rtol=1e-4)


def _lora_paths(params):
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {tuple(k.key for k in path) for path, _ in flat if "lora_A" in str(path)}


def test_lora_with_zero_b_gives_base_logits(checkpoint):
    _, _, folder = checkpoint
    base, bvars = t5.from_pretrained(folder)
    lora = LoRAConfig(rank=2, alpha=4.0, targets=("q", "v", "wo"))
    module, variables = t5.from_pretrained(folder, lora=lora, seed=3)
    paths = _lora_paths(variables["params"])
    assert ("decoder", "block_1", "layer_1", "EncDecAttention", "v", "lora_A", "kernel") in paths
    assert ("encoder", "block_0", "layer_1", "DenseReluDense", "wo", "lora_A", "kernel") in paths
    assert not any("k" in p[:-2] for p in paths)
    a = module.apply(variables, ENC_IDS, ENC_MASK, DEC_IDS, DEC_MASK)
    b = base.apply(bvars, ENC_IDS, ENC_MASK, DEC_IDS, DEC_MASK)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bumped = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 if "lora_B" in str(p) else x, variables["params"])
    c = module.apply({**variables, "params": bumped}, ENC_IDS, ENC_MASK, DEC_IDS, DEC_MASK)
    assert not np.allclose(np.asarray(c), np.asarray(b))


def test_zero_adapters_give_base_logits(checkpoint):
    _, _, folder = checkpoint
    base, bvars = t5.from_pretrained(folder)
    module, variables = t5.from_pretrained(folder, adapter=AdapterConfig(reduction_factor=4))
    layers = variables["params"]["decoder"]["block_1"]
    assert {"adapter_attention"} <= set(layers["layer_0"]) and "adapter_ffn" in layers["layer_2"]
    a = module.apply(variables, ENC_IDS, ENC_MASK, DEC_IDS, DEC_MASK)
    b = base.apply(bvars, ENC_IDS, ENC_MASK, DEC_IDS, DEC_MASK)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _example_mean_loss(logits, targets, mask):
    """Mean over examples of the per-example mean token cross-entropy."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    m = mask.astype(jnp.float32)
    return jnp.mean(jnp.sum(nll * m, -1) / jnp.maximum(jnp.sum(m, -1), 1.0))


# (layer path, the token mask its inputs carry)
KFAC_LAYERS = [
    (("encoder", "block_1", "layer_0", "SelfAttention", "v", "lora_A"), ENC_MASK),
    (("decoder", "block_0", "layer_0", "SelfAttention", "q", "lora_B"), DEC_MASK),
    (("decoder", "block_1", "layer_1", "EncDecAttention", "q", "lora_A"), DEC_MASK),
    (("decoder", "block_1", "layer_1", "EncDecAttention", "v", "lora_A"), ENC_MASK),
]


def _inputs_and_cotangents(module, params, targets):
    """Inputs and output cotangents of the ``KFAC_LAYERS``, found by intercepting the
    layers' calls and differentiating the loss with respect to an added zero."""
    wanted = [p for p, _ in KFAC_LAYERS]

    def run(deltas):
        inputs = {}

        def intercept(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            path = tuple(context.module.path)
            if context.method_name == "__call__" and path in wanted:
                inputs[path] = args[0]
                out = out + deltas[path] if deltas else out
            return out

        with nn.intercept_methods(intercept):
            logits = module.apply({"params": params}, ENC_IDS, ENC_MASK, DEC_IDS, DEC_MASK)
        return _example_mean_loss(logits, targets, DEC_MASK), inputs

    _, inputs = jax.eval_shape(run, None)
    zeros = {p: jnp.zeros(x.shape[:-1] + (params_at(params, p)["kernel"].shape[1],))
             for p, x in inputs.items()}
    cots, inputs = jax.jit(jax.grad(run, has_aux=True))(zeros)
    return inputs, cots


def params_at(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def test_kfac_statistics_of_lora_layers(tmp_path):
    _hf_model("v1_0").save_pretrained(tmp_path, safe_serialization=True)
    lora = LoRAConfig(rank=3, alpha=6.0, targets=("q", "v"))
    module, variables = t5.from_pretrained(str(tmp_path), lora=lora,
                                          seed=1)
    params = jax.tree_util.tree_map_with_path(  # non-zero B, so every cotangent is non-zero
        lambda p, x: x + 0.05 if "lora_B" in str(p) else x, variables["params"])
    targets = jnp.asarray(_ids(DEC_MASK, 2))

    def loss_fn(p, probes):
        logits = module.apply({"params": p, "kfac": probes}, ENC_IDS, ENC_MASK, DEC_IDS,
                              DEC_MASK)
        return _example_mean_loss(logits, targets, DEC_MASK)

    _, _, stats = jax.jit(kfac_value_and_grad(loss_fn))(params, variables["kfac"])
    inputs, cots = _inputs_and_cotangents(module, params, targets)
    for path, mask in KFAC_LAYERS:
        x = np.asarray(inputs[path], np.float64).reshape(-1, inputs[path].shape[-1])
        g = np.asarray(cots[path], np.float64).reshape(-1, cots[path].shape[-1])
        m = mask.reshape(-1).astype(np.float64)
        n = float((mask.sum(1) > 0).sum())
        s = params_at(stats, path)["kernel"]
        np.testing.assert_allclose(s.A, (x * m[:, None]).T @ x, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(s.G, n**2 * (g * m[:, None]).T @ g, rtol=1e-3,
                                   atol=1e-6 * np.abs(s.G).max())
        assert float(s.num_tokens) == m.sum() and float(s.num_examples) == n


def test_classification_head(checkpoint):
    _, _, folder = checkpoint
    module, variables = t5.from_pretrained(folder, num_labels=3)
    assert "classifier" in variables["params"] and "classifier" in variables["kfac"]
    logits = module.apply(variables, ENC_IDS, ENC_MASK, method=module.classify)
    assert logits.shape == (3, 3) and np.isfinite(np.asarray(logits)).all()


def _rewrite(folder, edit):
    path = f"{folder}/model.safetensors"
    state = safetensors_torch.load_file(path)
    edit(state)
    safetensors_torch.save_file(state, path, metadata={"format": "pt"})


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s.pop("encoder.block.1.layer.0.SelfAttention.k.weight"),
     "encoder.block.1.layer.0.SelfAttention.k.weight"),
    (lambda s: s.update({"decoder.block.0.layer.2.DenseReluDense.wo.weight": torch.zeros(32, 7)}),
     "decoder.block.0.layer.2.DenseReluDense.wo.weight"),
    (lambda s: s.update({"encoder.block.0.extra.weight": torch.zeros(2)}),
     "encoder.block.0.extra.weight"),
])
def test_bad_checkpoint_names_the_key(tmp_path, edit, needle):
    _hf_model("v1_0").save_pretrained(tmp_path, safe_serialization=True)
    _rewrite(tmp_path, edit)
    with pytest.raises(CheckpointError, match=needle.replace(".", r"\.")):
        t5.from_pretrained(str(tmp_path))
