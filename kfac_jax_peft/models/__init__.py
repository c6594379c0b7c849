"""Transformer models with PEFT layers, and Hugging Face checkpoint loading."""

from kfac_jax_peft.models.loading import (
    CheckpointError,
    assign,
    load_state_dict,
    load_tokenizer,
    read_config,
)
from kfac_jax_peft.models.roberta import RobertaClassifier, RobertaConfig, from_pretrained
from kfac_jax_peft.models.t5 import T5, T5Config, greedy_generate, score_labels
from kfac_jax_peft.models.t5 import from_pretrained as t5_from_pretrained

__all__ = [
    "CheckpointError",
    "RobertaClassifier",
    "RobertaConfig",
    "T5",
    "T5Config",
    "assign",
    "from_pretrained",
    "greedy_generate",
    "load_state_dict",
    "load_tokenizer",
    "read_config",
    "score_labels",
    "t5_from_pretrained",
]
