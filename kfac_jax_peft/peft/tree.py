"""Parameter-tree utilities for PEFT: trainable/frozen split, LoRA merging,
and saving only the PEFT weights.

Trees are nested dicts of arrays (Flax ``params`` collections). A leaf is
*trainable* when some module on its path is ``lora_A``, ``lora_B``, starts
with ``adapter``, or is the task head ``classifier``; everything else is the
frozen base model. Paths are written ``"a/b/c"``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from kfac_jax_peft.peft.lora import LoRAConfig

Params = dict[str, Any]

TRAINABLE_MODULES = ("lora_A", "lora_B", "classifier")
TRAINABLE_PREFIXES = ("adapter",)
CONFIG_METADATA_KEY = "peft_config"


def is_trainable_path(path: tuple[str, ...]) -> bool:
    """Whether the leaf at ``path`` (tuple of names) is a PEFT/head weight."""
    return any(p in TRAINABLE_MODULES or p.startswith(TRAINABLE_PREFIXES) for p in path[:-1])


def _flat(params: Mapping) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(unfreeze(params))


def split_trainable(params: Mapping) -> tuple[Params, Params]:
    """``(trainable, frozen)``: two disjoint nested dicts covering ``params``."""
    flat = _flat(params)
    trainable = {k: v for k, v in flat.items() if is_trainable_path(k)}
    frozen = {k: v for k, v in flat.items() if not is_trainable_path(k)}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge_trainable(trainable: Mapping, frozen: Mapping) -> Params:
    """Inverse of :func:`split_trainable`; raises on overlapping leaves."""
    a, b = _flat(trainable), _flat(frozen)
    overlap = sorted("/".join(k) for k in set(a) & set(b))
    if overlap:
        raise ValueError(f"trainable and frozen trees overlap at: {overlap}")
    return traverse_util.unflatten_dict({**b, **a})


def _num_leaves(tree: Mapping) -> int:
    return int(sum(np.size(v) for v in _flat(tree).values()))


def format_count(n: int) -> str:
    """Parameter count as in papers: ``125M``, ``0.8M``, ``18.4K``, ``640``."""
    if n >= 10_000_000:
        return f"{n / 1e6:.0f}M"
    if n >= 100_000:
        return f"{n / 1e6:.1f}M"
    if n >= 1_000:
        return f"{n / 1e3:.1f}K"
    return str(int(n))


def count_trainable(params: Mapping) -> str:
    """``"<trainable>M (<percent of all parameters>%)"``, e.g. ``"0.8M (0.23%)"``."""
    trainable, _ = split_trainable(params)
    n, total = _num_leaves(trainable), _num_leaves(params)
    return f"{format_count(n)} ({100.0 * n / max(total, 1):.2f}%)"


def _merge_module(module: dict[str, Any], scaling: float) -> dict[str, Any]:
    module = dict(module)
    a = module.pop("lora_A")["kernel"]
    b = module.pop("lora_B")["kernel"]
    kernel = module["kernel"]
    delta = scaling * np.matmul(np.asarray(a, np.float32), np.asarray(b, np.float32))
    module["kernel"] = (np.asarray(kernel, np.float32) + delta).astype(kernel.dtype)
    return module


def merge_lora(params: Mapping, config: LoRAConfig) -> Params:
    """Fold ``scaling * A @ B`` into each LoRA layer's base kernel and drop
    ``lora_A``/``lora_B``: the model built with ``lora=None`` then computes
    the same function. Leaves become numpy arrays."""

    def visit(node):
        if not isinstance(node, Mapping):
            return node
        node = {k: visit(v) for k, v in node.items()}
        if "lora_A" in node and "lora_B" in node and "kernel" in node:
            return _merge_module(node, config.scaling)
        return node

    return visit(unfreeze(params))


def _to_numpy(x) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind == "V" or arr.dtype.name == "bfloat16":
        arr = arr.astype(np.float32)  # numpy safetensors has no bfloat16
    return np.ascontiguousarray(arr)


def save_peft(path: str, trainable: Mapping, config: Mapping | None = None) -> None:
    """Write the (small) trainable tree and a JSON config to one safetensors
    file at ``path``, atomically. Tensor names are ``/``-joined paths; the
    config is stored as JSON in the file's metadata. bfloat16 leaves are
    stored as float32. The file has the mode an ordinary ``open`` gives
    (0644 under the usual umask)."""
    from safetensors.numpy import save

    from kfac_jax_peft._files import atomic_write

    tensors = {"/".join(k): _to_numpy(v) for k, v in _flat(trainable).items()}
    metadata = {CONFIG_METADATA_KEY: json.dumps(dict(config or {}), sort_keys=True)}
    atomic_write(path, save(tensors, metadata=metadata))


def load_peft(path: str) -> tuple[Params, dict[str, Any]]:
    """Inverse of :func:`save_peft`: ``(trainable tree of numpy arrays, config)``."""
    from safetensors.numpy import load

    with open(path, "rb") as f:
        data = f.read()
    tensors = load(data)
    metadata = _read_metadata(data)
    config = json.loads(metadata.get(CONFIG_METADATA_KEY, "{}"))
    tree = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in tensors.items()})
    return tree, config


def _read_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors byte string (8-byte LE header
    length, then the JSON header)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n].decode("utf-8"))
    return header.get("__metadata__", {}) or {}
