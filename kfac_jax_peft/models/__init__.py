"""Transformer models with PEFT layers, and Hugging Face checkpoint loading."""

from kfac_jax_peft.models.loading import (
    CheckpointError,
    assign,
    load_state_dict,
    load_tokenizer,
    read_config,
)
from kfac_jax_peft.models.roberta import RobertaClassifier, RobertaConfig, from_pretrained

__all__ = [
    "CheckpointError",
    "RobertaClassifier",
    "RobertaConfig",
    "assign",
    "from_pretrained",
    "load_state_dict",
    "load_tokenizer",
    "read_config",
]
