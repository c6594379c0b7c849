"""PEFT layers and trees: LoRA identity at init, merging, targets, the
trainable/frozen split, gradients and save/load."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from flax.errors import InvalidRngError

from kfac_jax_peft.models.roberta import RobertaClassifier, RobertaConfig, init_variables
from kfac_jax_peft.peft import (
    Adapter,
    AdapterConfig,
    LoRAConfig,
    PEFTDense,
    count_trainable,
    format_count,
    is_trainable_path,
    load_peft,
    lora_matches,
    merge_lora,
    merge_trainable,
    save_peft,
    split_trainable,
)

CFG = RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=37, max_position_embeddings=40, type_vocab_size=1)
IDS = jnp.array([[0, 5, 6, 7, 8, 2], [0, 9, 10, 2, 1, 1]])
MASK = (IDS != 1).astype(jnp.int32)
LORA = LoRAConfig(rank=4, alpha=8.0, targets=("query", "value"))


def flat(tree):
    return traverse_util.flatten_dict(dict(tree))


def drop_lora(params):
    return traverse_util.unflatten_dict(
        {k: v for k, v in flat(params).items() if "lora_A" not in k and "lora_B" not in k})


def perturb_lora_b(params, seed=0):
    out = flat(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(out))
    for key, (k, v) in zip(keys, sorted(out.items()), strict=True):
        if "lora_B" in k:
            out[k] = 0.05 * jax.random.normal(key, v.shape)
    return traverse_util.unflatten_dict(out)


@pytest.fixture(scope="module")
def lora_model():
    model = RobertaClassifier(CFG, num_labels=2, lora=LORA)
    return model, init_variables(model)


def test_lora_config_scaling_and_validation():
    assert LoRAConfig(rank=8, alpha=16.0).scaling == 2.0
    assert LoRAConfig(rank=16, alpha=16.0, use_rslora=True).scaling == 4.0
    assert LoRAConfig(targets="query").targets == ("query",)
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="placement"):
        AdapterConfig(placement="middle")


def test_lora_target_matching():
    path = ("encoder", "layer_1", "attention", "value")
    assert lora_matches(LoRAConfig(targets=("value",)), path)
    assert not lora_matches(LoRAConfig(targets=("query",)), path)
    assert lora_matches(LoRAConfig(targets=("encoder/layer_1/*",)), path)
    assert not lora_matches(LoRAConfig(targets=("encoder/layer_0/*",)), path)
    assert lora_matches(LoRAConfig(targets=("all-linear",)), path)


def test_lora_layers_present_only_on_targets(lora_model):
    _, v = lora_model
    with_lora = {"/".join(k[:-2]) for k in flat(v["params"]) if k[-2] == "lora_A"}
    assert with_lora == {f"encoder/layer_{i}/attention/{n}" for i in (0, 1)
                         for n in ("query", "value")}
    model = RobertaClassifier(CFG, lora=LoRAConfig(rank=2, targets=("all-linear",)))
    n = sum(k[-2] == "lora_A" for k in flat(init_variables(model)["params"]))
    assert n == 2 * 6  # query, key, value, attention output, intermediate, output


def test_lora_with_zero_b_gives_exactly_base_outputs(lora_model):
    model, v = lora_model
    base = RobertaClassifier(CFG, num_labels=2)
    out = model.apply({"params": v["params"]}, IDS, MASK)
    ref = base.apply({"params": drop_lora(v["params"])}, IDS, MASK)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_merged_lora_equals_unmerged(lora_model):
    model, v = lora_model
    params = perturb_lora_b(v["params"])
    out = model.apply({"params": params}, IDS, MASK)
    merged = merge_lora(params, LORA)
    assert not any("lora_A" in k for k in flat(merged))
    base = RobertaClassifier(CFG, num_labels=2)
    ref = base.apply({"params": merged}, IDS, MASK)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
    assert not np.allclose(np.asarray(out),
                           np.asarray(model.apply({"params": v["params"]}, IDS, MASK)))


def test_split_trainable_holds_only_peft_and_head(lora_model):
    _, v = lora_model
    trainable, frozen = split_trainable(v["params"])
    keys = set(flat(trainable))
    assert keys and all(k[-2] in ("lora_A", "lora_B") or k[0] == "classifier" for k in keys)
    assert not any(is_trainable_path(k) for k in flat(frozen))
    merged = merge_trainable(trainable, frozen)
    assert set(flat(merged)) == set(flat(v["params"]))
    with pytest.raises(ValueError, match="overlap"):
        merge_trainable(trainable, trainable)
    assert is_trainable_path(("encoder", "layer_0", "adapter_ffn", "up", "kernel"))


def test_gradient_only_for_trainable_leaves(lora_model):
    model, v = lora_model
    trainable, frozen = split_trainable(perturb_lora_b(v["params"]))

    def loss(tr):
        logits = model.apply({"params": merge_trainable(tr, frozen)}, IDS, MASK)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[:, 0])

    grads = jax.grad(loss)(trainable)
    assert set(flat(grads)) == set(flat(trainable))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in flat(grads).values())
    assert np.abs(np.asarray(grads["encoder"]["layer_0"]["attention"]["query"]["lora_A"]
                             ["kernel"])).max() > 0


def test_count_trainable_format(lora_model):
    _, v = lora_model
    assert format_count(800_000) == "0.8M"
    assert format_count(125_000_000) == "125M"
    tree = {"encoder": {"kernel": np.zeros(990)}, "classifier": {"kernel": np.zeros(10)}}
    assert count_trainable(tree) == "10 (1.00%)"
    trainable, _ = split_trainable(v["params"])
    n = sum(np.size(x) for x in flat(trainable).values())
    assert count_trainable(v["params"]).startswith(format_count(n) + " (")


def test_peft_save_load_roundtrip(lora_model, tmp_path):
    _, v = lora_model
    trainable, _ = split_trainable(perturb_lora_b(v["params"]))
    path = str(tmp_path / "peft.safetensors")
    save_peft(path, trainable, {"lora": LORA.to_dict(), "num_labels": 2})
    save_peft(path, trainable, {"lora": LORA.to_dict(), "num_labels": 2})  # overwrite
    assert os.listdir(tmp_path) == ["peft.safetensors"]  # no temporary files left
    loaded, config = load_peft(path)
    assert LoRAConfig(**config["lora"]) == LORA and config["num_labels"] == 2
    a, b = flat(trainable), flat(loaded)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), b[k])


def test_peft_dense_lora_branch_and_dropout():
    layer = PEFTDense(5, lora=LoRAConfig(rank=2, dropout=0.5, targets=("all-linear",)))
    x = jnp.ones((2, 3, 4))
    v = layer.init(jax.random.PRNGKey(0), x)
    assert v["params"]["lora_A"]["kernel"].shape == (4, 2)
    assert not np.any(np.asarray(v["params"]["lora_B"]["kernel"]))
    bound = 1 / np.sqrt(4)
    assert np.abs(np.asarray(v["params"]["lora_A"]["kernel"])).max() <= bound
    assert set(v["kfac"]) == {"lora_A", "lora_B"}  # the base kernel records nothing
    with pytest.raises(InvalidRngError):
        layer.apply(v, x, deterministic=False)  # dropout needs an rng
    y = layer.apply(v, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    assert y.shape == (2, 3, 5)


def test_adapter_is_identity_at_init_and_records_statistics():
    adapter = Adapter(AdapterConfig(reduction_factor=4, activation="gelu"))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 16))
    v = adapter.init(jax.random.PRNGKey(1), x)
    assert v["params"]["down"]["kernel"].shape == (16, 4)
    assert set(v["kfac"]) == {"down", "up"}
    np.testing.assert_array_equal(np.asarray(adapter.apply(v, x)), np.asarray(x))
