"""Parameter-efficient fine-tuning layers (LoRA, bottleneck adapters) and
parameter-tree utilities."""

from kfac_jax_peft.peft.adapters import (
    ACTIVATIONS,
    Adapter,
    AdapterConfig,
    adapter_sites,
)
from kfac_jax_peft.peft.lora import (
    ALL_LINEAR,
    LoRAConfig,
    PEFTDense,
    lora_a_init,
    lora_matches,
)
from kfac_jax_peft.peft.tree import (
    count_trainable,
    format_count,
    is_trainable_path,
    load_peft,
    merge_lora,
    merge_trainable,
    save_peft,
    split_trainable,
)

__all__ = [
    "ACTIVATIONS",
    "ALL_LINEAR",
    "Adapter",
    "AdapterConfig",
    "LoRAConfig",
    "PEFTDense",
    "adapter_sites",
    "count_trainable",
    "format_count",
    "is_trainable_path",
    "load_peft",
    "lora_a_init",
    "lora_matches",
    "merge_lora",
    "merge_trainable",
    "save_peft",
    "split_trainable",
]
