"""Loading Hugging Face checkpoints into Flax parameter trees.

A checkpoint folder holds ``config.json`` and either ``model.safetensors``
(optionally sharded, with ``model.safetensors.index.json``) or
``pytorch_model.bin`` (read only when torch is importable). Its tensors are
mapped onto a Flax ``params`` template with a *table* of rows::

    (hf_name_pattern, flax_path_pattern, transform)

Patterns may hold integer placeholders such as ``{i}`` (the layer index),
which must appear in both. ``transform`` is ``None`` or ``"T"`` (transpose a
torch ``Linear`` weight ``[out, in]`` to a Flax kernel ``[in, out]``).
:func:`assign` fills the template and reports every problem at once in one
:class:`CheckpointError`: missing keys, unexpected keys and shape
mismatches, each by name.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util
from flax.core import unfreeze

Row = tuple[str, str, "str | None"]
StateDict = dict[str, np.ndarray]

#: flax paths that a base-model checkpoint never holds: PEFT modules
PEFT_PATHS = ("*/lora_A/*", "*/lora_B/*", "*adapter*")

SUPPORTED_ENCODERS = ("roberta", "bert")


class CheckpointError(ValueError):
    """A checkpoint folder or state dict that does not fit the model."""


# --------------------------------------------------------------------------- files


def read_config(folder: str) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint folder as a dict; a missing,
    malformed or non-object file is a :class:`CheckpointError` naming it."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"no config.json in checkpoint folder {folder!r}")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: must hold a JSON object of settings, got "
                              f"{type(config).__name__}")
    return config


def max_positions(config: Mapping[str, Any]) -> int | None:
    """The longest sequence the checkpoint's position embeddings cover
    (RoBERTa's first ``pad_token_id + 1`` rows are reserved: positions start
    after the pad id), or None for T5 (relative positions, no limit)."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_ENCODERS:
        return None
    rows = int(config.get("max_position_embeddings", 512))
    if model_type == "roberta":
        return rows - int(config.get("pad_token_id", 1)) - 1
    return rows


#: Files that hold a tokenizer's vocabulary (fast tokenizer, WordPiece,
#: byte-level BPE, SentencePiece).
VOCAB_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model",
               "sentencepiece.bpe.model", "tokenizer.model")

#: How many rows an embedding table may have beyond the tokenizer's
#: vocabulary: checkpoints pad it to a round size (T5: 32100 tokens, 32128
#: rows; mT5: 250100 and 250112); a gap this large means another tokenizer.
VOCAB_PADDING = 256


def check_tokenizer_files(folder: str) -> None:
    """A :class:`CheckpointError` unless ``folder`` holds a vocabulary file:
    without one transformers builds a tokenizer of the special tokens alone,
    and every word becomes ``[UNK]``."""
    if not any(os.path.isfile(os.path.join(folder, name)) for name in VOCAB_FILES):
        raise CheckpointError(f"no tokenizer vocabulary in checkpoint folder {folder!r}: "
                              f"expected one of {', '.join(VOCAB_FILES)} (save the "
                              "tokenizer next to the model)")


def check_vocabulary(num_tokens: int, vocab_size: int | None, folder: str) -> None:
    """The tokenizer's ``num_tokens`` must fit the model's embedding table of
    ``vocab_size`` rows: not larger (ids past the table), and not more than
    :data:`VOCAB_PADDING` smaller (a different tokenizer)."""
    if vocab_size is None:
        return
    if num_tokens > vocab_size or vocab_size - num_tokens > VOCAB_PADDING:
        raise CheckpointError(f"the tokenizer in {folder!r} has {num_tokens} tokens but the "
                              f"model's vocab_size is {vocab_size} (config.json): they do not "
                              "belong together")


def load_tokenizer(folder: str | None):
    """The Hugging Face tokenizer saved in a checkpoint folder, loaded offline
    (``local_files_only``) through ``transformers.AutoTokenizer``, after
    checking that the folder holds vocabulary files and that the tokenizer
    fits the model's ``vocab_size`` (:func:`check_vocabulary`)."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("loading a tokenizer needs transformers: pip install "
                          "'kfac_jax_peft[hf]'") from e
    if folder is None:
        raise CheckpointError("no checkpoint folder given (model is None): set model to a "
                              "Hugging Face checkpoint folder")
    if not os.path.isdir(folder):
        raise CheckpointError(f"tokenizer folder {folder!r} does not exist")
    check_tokenizer_files(folder)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"no usable tokenizer in {folder!r}: {e}") from e
    if os.path.isfile(os.path.join(folder, "config.json")):
        check_vocabulary(len(tokenizer), read_config(folder).get("vocab_size"), folder)
    return tokenizer


def check_model_type(config: Mapping[str, Any], supported: Sequence[str]) -> str:
    """``config["model_type"]``, or a :class:`CheckpointError` naming it."""
    model_type = config.get("model_type")
    if model_type not in supported:
        raise CheckpointError(f"unsupported model_type {model_type!r} in config.json; "
                              f"supported model types: {', '.join(supported)}")
    return model_type


def _read_safetensors(path: str) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        try:
            return load_file(path)
        except (TypeError, KeyError, ValueError):
            # numpy has no bfloat16: read through the Flax backend instead
            from safetensors import safe_open

            out = {}
            with safe_open(path, framework="flax") as f:
                for k in f.keys():
                    out[k] = np.asarray(f.get_tensor(k))
            return out
    except (SafetensorError, OSError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or "
                              f"corrupt? ({type(e).__name__}: {e})") from None


def _read_torch_bin(path: str) -> StateDict:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(f"{path!r} is a PyTorch checkpoint and torch is not installed; "
                              "convert it to model.safetensors") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises pickle, zip and runtime errors alike
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint "
                              f"({type(e).__name__}: {e})") from None
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in state.items()}


def weights_file(folder: str) -> str:
    """The weights file of a checkpoint folder (``model.safetensors``, the
    sharded index, or ``pytorch_model.bin``, in that order of preference)."""
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise CheckpointError(f"no model.safetensors or pytorch_model.bin in {folder!r}")


def _shards(index: str) -> list[str]:
    try:
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index (a JSON object with a "
                              f"'weight_map'): {type(e).__name__}: {e}") from None
    return [os.path.join(os.path.dirname(index), name) for name in names]


def check_finite(state: Mapping[str, np.ndarray], source: str) -> None:
    """A :class:`CheckpointError` naming the tensors of ``state`` that hold
    NaN or infinity (a model would train on them without complaint)."""
    bad = [name for name, value in state.items()
           if np.issubdtype(np.asarray(value).dtype, np.inexact)
           and not np.isfinite(np.asarray(value, np.float32)).all()]
    if bad:
        shown = ", ".join(sorted(bad)[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5
                                               else "")
        raise CheckpointError(f"{source}: tensor(s) {shown} hold NaN or infinite values")


def load_state_dict(folder: str) -> StateDict:
    """All tensors of a checkpoint folder as numpy arrays, by their HF names.
    An unreadable file, a missing shard or a tensor holding NaN or infinity
    is a :class:`CheckpointError` naming the file (and the tensor)."""
    path = weights_file(folder)
    if path.endswith(".index.json"):
        state: StateDict = {}
        for shard in _shards(path):
            if not os.path.isfile(shard):
                raise CheckpointError(f"{path}: shard {os.path.basename(shard)!r} is missing")
            part = _read_safetensors(shard)
            check_finite(part, shard)
            state.update(part)
        return state
    state = _read_safetensors(path) if path.endswith(".safetensors") else _read_torch_bin(path)
    check_finite(state, path)
    return state


# --------------------------------------------------------------------------- mapping


def _pattern_regex(pattern: str) -> re.Pattern:
    """Regex of a name pattern whose ``{name}`` placeholders match integers."""
    parts = re.split(r"\{(\w+)\}", pattern)
    out = []
    for k, part in enumerate(parts):
        out.append(rf"(?P<{part}>\d+)" if k % 2 else re.escape(part))
    return re.compile("^" + "".join(out) + "$")


def _compile(table: Iterable[Row]) -> list[tuple[re.Pattern, re.Pattern, str, str, Any]]:
    return [(_pattern_regex(src), _pattern_regex(dst), src, dst, tf)
            for src, dst, tf in table]


def _transform(value: np.ndarray, transform: str | None) -> np.ndarray:
    if transform is None:
        return value
    if transform == "T":
        return np.ascontiguousarray(value.T)
    raise ValueError(f"unknown transform {transform!r}; expected None or 'T'")


def _source_shape(shape: tuple[int, ...], transform: str | None) -> tuple[int, ...]:
    """Checkpoint-side shape of a flax leaf of ``shape``."""
    return shape[::-1] if transform == "T" else shape


def _source_name(compiled, path: str) -> str:
    """The HF name that would fill flax ``path`` (for error messages)."""
    for _, dst_re, src, _, _ in compiled:
        m = dst_re.match(path)
        if m:
            return f"{src.format(**m.groupdict())} ({path})"
    return path


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _format_error(source: str, missing, unexpected, mismatched, conflicts) -> str:
    lines = [f"{source} does not match the model:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched), ("conflicting tied keys", conflicts)):
        if items:
            lines.append(f"  {title} ({len(items)}):")
            lines.extend(f"    {item}" for item in items)
    return "\n".join(lines)


def assign(params_template: Mapping, table: Iterable[Row], state_dict: Mapping[str, Any], *,
           ignore: Sequence[str] = (), optional: Sequence[str] = (),
           source: str = "checkpoint") -> dict:
    """Fill ``params_template`` from ``state_dict`` through ``table``.

    Args:
      params_template: a Flax ``params`` tree (shapes and dtypes are taken
        from it; leaves not filled keep their value).
      table: rows ``(hf_pattern, flax_pattern, transform)``, see module doc.
      state_dict: HF name -> array.
      ignore: ``fnmatch`` patterns of HF names to drop (buffers, heads of
        other tasks).
      optional: ``fnmatch`` patterns of ``/``-joined flax paths that may be
        absent from the checkpoint (new PEFT modules, a new task head).
      source: how the checkpoint is named in error messages.

    Several HF names may map to one flax path (tied weights); they must then
    hold equal values.

    Returns a new nested dict. Raises :class:`CheckpointError` listing all
    missing keys, unexpected keys, shape mismatches and conflicting tied keys.
    """
    compiled = _compile(table)
    flat = {"/".join(k): v
            for k, v in traverse_util.flatten_dict(unfreeze(params_template)).items()}
    filled: dict[str, np.ndarray] = {}
    filled_from: dict[str, str] = {}
    unexpected, mismatched, conflicts = [], [], []
    mis_shaped: set[str] = set()
    for name in sorted(state_dict):
        if _matches(name, ignore):
            continue
        target = _map_name(compiled, name)
        if target is None or target[0] not in flat:
            unexpected.append(name)
            continue
        path, tf = target
        raw = np.asarray(state_dict[name])
        want = _source_shape(tuple(flat[path].shape), tf)
        if tuple(raw.shape) != want:
            mismatched.append(f"{name}: checkpoint {tuple(raw.shape)}, expected {want} "
                              f"(for {path})")
            mis_shaped.add(path)
            continue
        value = _transform(raw, tf)
        if path in filled and not np.array_equal(filled[path], value):
            conflicts.append(f"{filled_from[path]} and {name} both fill {path} but differ")
        else:
            filled[path], filled_from[path] = value, name
    missing = [_source_name(compiled, p) for p in sorted(flat)
               if p not in filled and p not in mis_shaped and not _matches(p, optional)]
    if missing or unexpected or mismatched or conflicts:
        raise CheckpointError(_format_error(source, missing, unexpected, mismatched, conflicts))
    out = {p: (np.asarray(filled[p], dtype=v.dtype) if p in filled else v) for p, v in flat.items()}
    return traverse_util.unflatten_dict({tuple(p.split("/")): v for p, v in out.items()})


def _map_name(compiled, name: str) -> tuple[str, str | None] | None:
    for src_re, _, _, dst, tf in compiled:
        m = src_re.match(name)
        if m:
            return dst.format(**m.groupdict()), tf
    return None


def strip_prefixes(state_dict: Mapping[str, Any], prefixes: Sequence[str]) -> StateDict:
    """Drop the first matching prefix (e.g. ``"roberta."``) from every name."""
    out = {}
    for name, value in state_dict.items():
        for prefix in prefixes:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        out[name] = value
    return out


#: The RoBERTa/BERT name tables live beside their model
#: (:mod:`kfac_jax_peft.models.roberta`), as T5's do; these names still resolve here.
_MOVED = ("ENCODER_TABLE", "HEAD_TABLES", "ENCODER_IGNORE", "normalise_encoder_names",
          "load_encoder_params")


def __getattr__(name: str):
    if name in _MOVED:
        from kfac_jax_peft.models import roberta

        return getattr(roberta, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
