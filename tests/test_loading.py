"""Hugging Face checkpoint loading: round trip through HF names, and one
clear error for missing, unexpected and mis-shaped tensors and unknown
model types."""

import json
import re

import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

from kfac_jax_peft.models.loading import (
    CheckpointError,
    assign,
    load_state_dict,
)
from kfac_jax_peft.models.roberta import (
    ENCODER_TABLE,
    HEAD_TABLES,
    RobertaClassifier,
    RobertaConfig,
    from_pretrained,
    init_variables,
)
from kfac_jax_peft.peft import LoRAConfig

HF_CONFIG = dict(model_type="roberta", vocab_size=50, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=37, max_position_embeddings=40,
                 type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5, hidden_act="gelu")


def hf_names(params, model_type="roberta"):
    """Our params under Hugging Face names (inverse of the loader's table)."""
    rows = ENCODER_TABLE + HEAD_TABLES[model_type]
    out = {}
    for path, value in traverse_util.flatten_dict(dict(params)).items():
        joined = "/".join(path)
        for src, dst, transform in rows:
            m = re.fullmatch(re.escape(dst).replace(r"\{i\}", r"(?P<i>\d+)"), joined)
            if m:
                prefix = "" if src.startswith(("classifier", "pooler")) else f"{model_type}."
                arr = np.asarray(value)
                out[prefix + src.format(**m.groupdict())] = arr.T if transform == "T" else arr
                break
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def reference():
    model = RobertaClassifier(RobertaConfig.from_dict(HF_CONFIG), num_labels=2)
    return init_variables(model, seed=5)["params"]


def write_checkpoint(folder, tensors, config=HF_CONFIG):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"))
    return str(folder)


def assert_same_base(params, reference):
    a, b = traverse_util.flatten_dict(dict(params)), traverse_util.flatten_dict(dict(reference))
    for k, v in b.items():
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(v))


def test_round_trip_with_buffers_and_pretraining_heads(tmp_path, reference):
    tensors = hf_names(reference)
    tensors["roberta.embeddings.position_ids"] = np.arange(40)[None]
    tensors["lm_head.dense.weight"] = np.zeros((32, 32), np.float32)
    tensors["roberta.pooler.dense.weight"] = np.zeros((32, 32), np.float32)
    folder = write_checkpoint(tmp_path / "ckpt", tensors)
    _, v = from_pretrained(folder, num_labels=2, lora=LoRAConfig(rank=2))
    assert_same_base(v["params"], reference)
    assert "lora_A" in v["params"]["encoder"]["layer_0"]["attention"]["query"]


def test_absent_head_is_freshly_initialised(tmp_path, reference):
    tensors = {k: v for k, v in hf_names(reference).items() if not k.startswith("classifier")}
    _, v = from_pretrained(write_checkpoint(tmp_path / "base", tensors), num_labels=2)
    assert v["params"]["classifier"]["out_proj"]["kernel"].shape == (32, 2)


def test_missing_tensor_is_named(tmp_path, reference):
    tensors = hf_names(reference)
    del tensors["roberta.encoder.layer.1.attention.self.key.weight"]
    with pytest.raises(CheckpointError, match="missing keys") as err:
        from_pretrained(write_checkpoint(tmp_path / "c", tensors))
    assert "encoder.layer.1.attention.self.key.weight" in str(err.value)


def test_wrong_shape_and_unexpected_keys_are_named_together(tmp_path, reference):
    tensors = hf_names(reference)
    tensors["roberta.encoder.layer.0.intermediate.dense.weight"] = np.zeros((36, 32), np.float32)
    tensors["roberta.encoder.layer.7.output.dense.weight"] = np.zeros((32, 37), np.float32)
    del tensors["roberta.embeddings.LayerNorm.bias"]
    with pytest.raises(CheckpointError) as err:
        from_pretrained(write_checkpoint(tmp_path / "c", tensors))
    msg = str(err.value)
    assert "shape mismatches" in msg and "encoder.layer.0.intermediate.dense.weight" in msg
    assert "(36, 32)" in msg
    assert "unexpected keys" in msg and "encoder.layer.7.output.dense.weight" in msg
    assert "missing keys" in msg and "embeddings.LayerNorm.bias" in msg


def test_classifier_with_other_num_labels_is_a_shape_mismatch(tmp_path, reference):
    folder = write_checkpoint(tmp_path / "c", hf_names(reference))
    with pytest.raises(CheckpointError, match="classifier.out_proj.weight"):
        from_pretrained(folder, num_labels=5)


def test_unknown_model_type_is_named(tmp_path, reference):
    folder = write_checkpoint(tmp_path / "c", hf_names(reference),
                              dict(HF_CONFIG, model_type="gpt2"))
    with pytest.raises(CheckpointError, match="gpt2"):
        from_pretrained(folder)


def test_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        from_pretrained(str(tmp_path))


def test_assign_generic_table_tied_keys_and_transpose():
    template = {"shared": {"embedding": np.zeros((4, 3), np.float32)},
                "block_0": {"dense": {"kernel": np.zeros((3, 2), np.float32)}},
                "new": {"kernel": np.ones((2,), np.float32)}}
    table = [("shared.weight", "shared/embedding", None),
             ("lm_head.weight", "shared/embedding", None),
             ("block.{i}.dense.weight", "block_{i}/dense/kernel", "T")]
    emb = np.arange(12, dtype=np.float32).reshape(4, 3)
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    state = {"shared.weight": emb, "lm_head.weight": emb.copy(), "block.0.dense.weight": w}
    out = assign(template, table, state, optional=("new/*",))
    np.testing.assert_array_equal(out["block_0"]["dense"]["kernel"], w.T)
    np.testing.assert_array_equal(out["shared"]["embedding"], emb)
    np.testing.assert_array_equal(out["new"]["kernel"], np.ones(2))
    with pytest.raises(CheckpointError, match="lm_head.weight and shared.weight both fill"):
        assign(template, table, dict(state, **{"lm_head.weight": emb + 1}), optional=("new/*",))
    with pytest.raises(CheckpointError, match=r"new/kernel"):
        assign(template, table, state)


def test_bfloat16_safetensors_are_read(tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    from safetensors.flax import save_file as save_flax

    save_flax({"w": jnp.arange(4, dtype=jnp.bfloat16)}, str(tmp_path / "model.safetensors"))
    state = load_state_dict(str(tmp_path))
    assert state["w"].dtype.name == "bfloat16"
    np.testing.assert_array_equal(state["w"].astype(np.float32), np.arange(4))


def test_pytorch_bin_is_read_when_torch_is_available(tmp_path, reference):
    torch = pytest.importorskip("torch")
    tensors = {k: torch.from_numpy(v.copy()) for k, v in hf_names(reference).items()}
    torch.save(tensors, str(tmp_path / "pytorch_model.bin"))
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    _, v = from_pretrained(str(tmp_path))
    assert_same_base(v["params"], reference)


def test_sharded_safetensors_are_read(tmp_path, reference):
    tensors = hf_names(reference)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / shard))
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    _, v = from_pretrained(str(tmp_path))
    assert_same_base(v["params"], reference)


def test_roberta_tables_sit_beside_the_model_and_still_resolve_from_loading():
    from kfac_jax_peft.models import loading, roberta

    assert loading.ENCODER_TABLE is roberta.ENCODER_TABLE
    assert loading.load_encoder_params is roberta.load_encoder_params
    with pytest.raises(AttributeError, match="no attribute 'NOPE'"):
        loading.NOPE  # noqa: B018
