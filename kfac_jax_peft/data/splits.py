"""The paper's train/validation/test protocol.

GLUE and SuperGLUE test labels are not public, so the paper makes its own
test set from labelled data (its appendix B, "Datasets"):

* small tasks (training set of at most ``large_threshold`` = 10K examples):
  the original validation set is randomly split into two halves, one the
  new validation set and the other the test set; the training set is kept;
* large tasks (more than 10K training examples): ``num_heldout`` = 1K random
  training examples become the validation set, the rest the training set,
  and the original validation set becomes the test set.

The "original validation set" is ``raw["validation"]``. A layout without one
but with a labelled ``raw["test"]`` (the SentEval SST-2 files) uses that test
set in its place: it is the held-out data the model never trains on. A
``raw["test"]`` next to a ``raw["validation"]`` is not used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from kfac_jax_peft.data.loaders import DataError, Example

__all__ = ["paper_splits"]


def _take(examples: Sequence[Example], indices: np.ndarray) -> list[Example]:
    return [examples[i] for i in np.sort(indices)]


def paper_splits(raw: Mapping[str, Sequence[Example]], seed: int, *,
                 large_threshold: int = 10_000,
                 num_heldout: int = 1000) -> dict[str, list[Example]]:
    """Apply the paper's split protocol (module docstring) to ``load_raw``'s output.

    Returns ``{"train", "validation", "test"}``; each split keeps the
    examples' original relative order. The random choice depends only on
    ``seed`` (``numpy.random.default_rng(seed)``). With an odd number of
    original validation examples the test half gets the extra one. A training
    set of exactly ``large_threshold`` examples counts as small. Raises
    :class:`DataError` if a split would be empty.
    """
    if "train" not in raw:
        raise DataError(f"raw splits {sorted(raw)} have no 'train'")
    heldout_key = "validation" if "validation" in raw else "test"
    if heldout_key not in raw:
        raise DataError(f"raw splits {sorted(raw)} have neither 'validation' nor a "
                        "labelled 'test' to build the validation and test sets from")
    train, heldout = raw["train"], raw[heldout_key]
    rng = np.random.default_rng(seed)

    if len(train) > large_threshold:
        perm = rng.permutation(len(train))
        out = {"train": _take(train, perm[num_heldout:]),
               "validation": _take(train, perm[:num_heldout]),
               "test": list(heldout)}
    else:
        perm = rng.permutation(len(heldout))
        half = len(heldout) // 2
        out = {"train": list(train),
               "validation": _take(heldout, perm[:half]),
               "test": _take(heldout, perm[half:])}

    empty = [name for name, split in out.items() if not split]
    if empty:
        raise DataError(f"paper_splits would leave {empty} empty (train {len(train)}, "
                        f"{heldout_key} {len(heldout)}, num_heldout {num_heldout})")
    return out
