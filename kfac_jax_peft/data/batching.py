"""Tokenisation and padded numpy batches.

:func:`encode` tokenises once, without padding. :func:`train_batches` and
:func:`eval_batches` pad per batch. Padding convention of every batch:

* ``input_ids`` [B, L] (multiple choice: [B, C, L]) int32, padded on the right
  with the tokenizer's pad id;
* ``attention_mask`` same shape, int32, 1 for a token and 0 for padding;
* ``token_type_ids`` same shape, int32, 0 in the padding;
* ``labels`` [B] (int32 class ids / choice index, float32 regression target);
* ``valid`` [B] float32, 1 for a real example and 0 for a filler row;
* ``L`` is the longest sequence of the batch rounded up to a multiple of
  ``pad_to_multiple_of`` (no rounding when it is ``None`` or 1).

Filler rows (only in the last evaluation batch) are all padding with
``attention_mask`` 0, label 0 and ``valid`` 0; weight per-example losses and
metrics by ``valid``.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from kfac_jax_peft.data.loaders import Example
from kfac_jax_peft.data.tasks import TaskSpec, get_task

__all__ = ["Encoded", "collate", "encode", "epoch_batches", "eval_batches", "train_batches"]


@dataclasses.dataclass(frozen=True, eq=False)
class Encoded:
    """Tokenised examples, unpadded.

    ``input_ids[i]`` / ``token_type_ids[i]`` are int32 arrays, or for multiple
    choice a list of ``num_choices`` arrays (one per alternative).
    ``lengths`` is [N] int32, or [N, num_choices] for multiple choice.
    ``labels`` is [N], int32 (classification, multiple choice) or float32
    (regression). ``pad_id`` is the tokenizer's pad token id.
    """

    input_ids: list
    token_type_ids: list
    labels: np.ndarray
    lengths: np.ndarray
    pad_id: int
    num_choices: int | None = None

    def __len__(self) -> int:
        return len(self.labels)


#: Before tokenising, a text is cut to its first ``WORDS_PER_TOKEN *
#: max_length`` whitespace-separated words and ``CHARS_PER_TOKEN *
#: max_length`` characters (:func:`cap_text`).
WORDS_PER_TOKEN = 2
CHARS_PER_TOKEN = 32


def cap_text(text: str, max_length: int) -> str:
    """``text`` cut to what ``max_length`` tokens can come from, generously.

    Why: the tokenizers' pair truncation takes time superlinear in the
    texts' length (a pair of 8,000-word texts took 52 s; 200,000 words did
    not finish), although only ``max_length`` tokens are kept. Every word
    gives at least one token, so the first ``2 * max_length`` words hold
    more tokens than are kept; a token covers on average 4 to 5 characters
    of English, so ``32 * max_length`` characters bound texts without spaces
    without touching ordinary ones. The cut keeps the text's own whitespace
    (byte-level BPE encodes it), so the tokens kept are those of the whole
    text, with two exceptions: a text whose first ``max_length`` tokens
    average more than 32 characters each (runs of whitespace, ``[UNK]``
    words of dozens of letters) keeps fewer tokens; and when both texts of a
    pair are cut, the odd token of an odd split may go to the other text
    (the tokenizer gives it by comparing the two lengths, which the cut may
    reorder)."""
    chars = CHARS_PER_TOKEN * max_length
    text = text[:chars]
    words = WORDS_PER_TOKEN * max_length
    if len(text) <= words:  # fewer characters than the word limit: nothing to cut
        return text
    ends = [m.end() for m in itertools.islice(_WORD.finditer(text), words)]
    return text[:ends[-1]] if len(ends) == words else text


_WORD = re.compile(r"\S+")


def _tokenize(tokenizer: Any, first: Sequence[str], second: Sequence[str | None],
              max_length: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Token ids and type ids per text (pair when ``second[i]`` is not None),
    each text cut first by :func:`cap_text`."""
    first = [cap_text(t, max_length) for t in first]
    second = [None if t is None else cap_text(t, max_length) for t in second]
    ids: list[np.ndarray | None] = [None] * len(first)
    types: list[np.ndarray | None] = [None] * len(first)
    singles = [i for i, b in enumerate(second) if b is None]
    pairs = [i for i, b in enumerate(second) if b is not None]
    for rows, args in ((singles, ([first[i] for i in singles],)),
                       (pairs, ([first[i] for i in pairs], [second[i] for i in pairs]))):
        if not rows:
            continue
        out = tokenizer(*args, truncation="longest_first", max_length=max_length,
                        padding=False, return_attention_mask=False)
        type_ids = out.get("token_type_ids")
        for k, i in enumerate(rows):
            ids[i] = np.asarray(out["input_ids"][k], dtype=np.int32)
            types[i] = (np.asarray(type_ids[k], dtype=np.int32) if type_ids is not None
                        else np.zeros_like(ids[i]))
    return ids, types


def encode(examples: Sequence[Example], tokenizer: Any, spec: TaskSpec | str,
           max_length: int = 128) -> Encoded:
    """Tokenise ``examples`` with a Hugging Face (fast) tokenizer, without padding.

    Pairs (``text_b`` set) are encoded as sentence pairs, truncated
    ``"longest_first"`` to ``max_length`` tokens including special tokens.
    Multiple choice encodes each alternative as the pair
    ``(text_a, choice)``. Tokenizers that return no ``token_type_ids``
    (RoBERTa) get zeros. Each text is first cut to what ``max_length``
    tokens can come from (:func:`cap_text`), which keeps very long texts
    from stalling the tokenizer.
    """
    spec = get_task(spec)
    if not isinstance(max_length, int) or max_length < 4:
        raise ValueError(f"max_length must be an integer >= 4, got {max_length!r}")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token")
    mc = spec.kind == "multiple_choice"
    if mc:
        for i, ex in enumerate(examples):
            if ex.choices is None or len(ex.choices) != spec.num_choices:
                raise ValueError(f"example {i} of {spec.name} needs {spec.num_choices} choices, "
                                 f"got {ex.choices!r}")
        first = [ex.text_a for ex in examples for _ in ex.choices]
        second = [c for ex in examples for c in ex.choices]
    else:
        first = [ex.text_a for ex in examples]
        second = [ex.text_b for ex in examples]
    ids, types = _tokenize(tokenizer, first, second, max_length)
    if mc:
        c = spec.num_choices
        ids = [ids[i * c:(i + 1) * c] for i in range(len(examples))]
        types = [types[i * c:(i + 1) * c] for i in range(len(examples))]
        lengths = np.array([[len(x) for x in row] for row in ids], np.int32).reshape(-1, c)
    else:
        lengths = np.array([len(x) for x in ids], np.int32)
    dtype = np.float32 if spec.kind == "regression" else np.int32
    labels = np.array([ex.label for ex in examples], dtype=dtype)
    return Encoded(ids, types, labels, lengths, int(tokenizer.pad_token_id),
                   spec.num_choices if mc else None)


def _round_up(n: int, multiple: int | None) -> int:
    if not multiple or multiple <= 1:
        return n
    return -(-n // multiple) * multiple


def collate(encoded: Encoded, indices: Sequence[int] | np.ndarray, *,
            pad_to_multiple_of: int | None = 8, num_rows: int | None = None) -> dict:
    """Pad the examples ``indices`` into one batch (module docstring).

    ``num_rows`` (>= ``len(indices)``) adds filler rows with ``valid`` 0.
    """
    indices = [int(i) for i in indices]
    rows = len(indices) if num_rows is None else num_rows
    if rows < len(indices):
        raise ValueError(f"num_rows {rows} < {len(indices)} examples")
    lengths = encoded.lengths[indices] if indices else np.zeros((0,), np.int32)
    length = _round_up(max(int(lengths.max(initial=1)), 1), pad_to_multiple_of)
    mc = encoded.num_choices
    shape = (rows, length) if mc is None else (rows, mc, length)
    input_ids = np.full(shape, encoded.pad_id, np.int32)
    token_type_ids = np.zeros(shape, np.int32)
    attention_mask = np.zeros(shape, np.int32)
    for r, i in enumerate(indices):
        seqs = [(r, encoded.input_ids[i], encoded.token_type_ids[i])] if mc is None else [
            ((r, c), encoded.input_ids[i][c], encoded.token_type_ids[i][c]) for c in range(mc)]
        for at, ids, types in seqs:
            input_ids[at][:len(ids)] = ids
            token_type_ids[at][:len(ids)] = types
            attention_mask[at][:len(ids)] = 1
    labels = np.zeros((rows,), encoded.labels.dtype)
    labels[:len(indices)] = encoded.labels[indices]
    valid = np.zeros((rows,), np.float32)
    valid[:len(indices)] = 1.0
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "token_type_ids": token_type_ids, "labels": labels, "valid": valid}


def _check_seed(seed: int) -> None:
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def epoch_batches(lengths: np.ndarray, batch_size: int, *, seed: int, epoch: int,
                  bucket: bool = True, chunk_batches: int = 50) -> np.ndarray:
    """Example indices of one training epoch, [steps_per_epoch, batch_size].

    ``steps_per_epoch = N // batch_size``. The order is drawn from
    ``numpy.random.default_rng([seed, epoch])``: a random permutation whose
    last ``N % batch_size`` examples are dropped for this epoch. Without
    bucketing the batches are consecutive slices of it. With bucketing the
    permutation is cut into chunks of ``chunk_batches * batch_size`` examples,
    each chunk is sorted by length (stable) and sliced into batches, and the
    order of all batches is then shuffled with the same generator, so that a
    batch holds examples of similar length while the epoch stays random.
    ``lengths`` [N] is each example's token count (for multiple choice, the
    longest alternative).
    """
    _check_seed(seed)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    lengths = np.asarray(lengths)
    n = len(lengths)
    steps = n // batch_size
    if steps == 0:
        raise ValueError(f"{n} examples do not fill one batch of {batch_size}")
    rng = np.random.default_rng([seed, epoch])
    kept = rng.permutation(n)[:steps * batch_size]
    if not bucket:
        return kept.reshape(steps, batch_size)
    chunk = chunk_batches * batch_size
    kept = np.concatenate([
        kept[s:s + chunk][np.argsort(lengths[kept[s:s + chunk]], kind="stable")]
        for s in range(0, len(kept), chunk)])
    return kept.reshape(steps, batch_size)[rng.permutation(steps)]


def _example_lengths(encoded: Encoded) -> np.ndarray:
    lengths = np.asarray(encoded.lengths)
    return lengths.max(axis=1) if lengths.ndim == 2 else lengths


def train_batches(encoded: Encoded, batch_size: int, *, seed: int, start_step: int = 0,
                  pad_to_multiple_of: int | None = 8, bucket: bool = True,
                  chunk_batches: int = 50) -> Iterator[dict]:
    """Infinite stream of training batches, starting at global step ``start_step``.

    The batch of global step ``s`` is batch ``s % steps_per_epoch`` of
    :func:`epoch_batches` for epoch ``s // steps_per_epoch``: it depends only
    on ``(seed, s)``, so a run resumed at ``start_step = s`` sees the same
    batches as an uninterrupted one. Every batch has ``batch_size`` real
    examples (``valid`` all ones); each epoch drops ``N % batch_size`` random
    examples.
    """
    _check_seed(seed)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    lengths = _example_lengths(encoded)
    steps = len(lengths) // batch_size
    if steps == 0:
        raise ValueError(f"{len(lengths)} examples do not fill one batch of {batch_size}")

    def stream() -> Iterator[dict]:
        step, epoch, order = start_step, None, None
        while True:
            e, j = divmod(step, steps)
            if e != epoch:
                epoch = e
                order = epoch_batches(lengths, batch_size, seed=seed, epoch=e, bucket=bucket,
                                      chunk_batches=chunk_batches)
            yield collate(encoded, order[j], pad_to_multiple_of=pad_to_multiple_of)
            step += 1

    return stream()


def eval_batches(encoded: Encoded, batch_size: int, *,
                 pad_to_multiple_of: int | None = 8) -> Iterator[dict]:
    """All examples in their original order, in batches of exactly ``batch_size`` rows.

    The last batch is completed with filler rows (``valid`` 0), so predictions
    ``p`` concatenated over the batches give the examples' predictions as
    ``p[valid == 1]``, in order.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")

    def stream() -> Iterator[dict]:
        for start in range(0, len(encoded), batch_size):
            indices = range(start, min(start + batch_size, len(encoded)))
            yield collate(encoded, indices, pad_to_multiple_of=pad_to_multiple_of,
                          num_rows=batch_size)

    return stream()
