"""The metrics log of a run: one JSON object per line, TensorBoard too if installed.

Records have a ``"kind"``: ``"train"`` (``step``, ``loss``, ``lr``,
``clip_rate``, ``update_norm``, ``wall_clock``: seconds of training so far
as a :class:`Stopwatch` counts them, compilation, evaluation, diagnostics
and checkpointing excluded; with Sophia also ``clip_fraction``, the
fraction of coordinates its per-coordinate clip cut at the log step;
``log_gamma`` adds ``gamma``, ``imbalance``, ``step_curvature`` and
``share_<module>`` (see :func:`kfac_jax_peft.finetune.steps._make_diagnose`);
the zeroth-order arms add ``zo_lr`` (LoHO) and HiZOO's ``sigma_min``,
``sigma_median``, ``sigma_max``, see
:mod:`kfac_jax_peft.finetune.zeroth_order`), ``"eval"`` (``step``, ``split``,
``wall_clock`` and the task's metrics), ``"summary"``, and the loop's
``"start"``, ``"compile"``, ``"resume"`` and ``"error"`` records. Each line
is flushed as written, so an interrupted run keeps everything it logged;
a process killed in the middle of a write leaves a *torn* last line, which
resuming drops (with a warning) together with the records written after
the checkpoint it resumes from.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import jax

LOG_NAME = "metrics.jsonl"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable
    return value


class MetricsLog:
    """Appends records to ``<run_dir>/metrics.jsonl``.

    ``resume_step``: when resuming, the log is first cut back to what the
    run had logged when it reached that step (see :func:`resume_records`),
    so that the log of a resumed run reads like one uninterrupted run.
    """

    def __init__(self, run_dir: str, *, resume_step: int | None = None,
                 tensorboard: bool = True):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, LOG_NAME)
        if resume_step is None:
            open(self.path, "w").close()
        else:
            kept = resume_records(self.path, resume_step)
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(tmp, self.path)  # atomic: a kill now leaves the old or the new log
        self._file = open(self.path, "a")
        self._tb = _tensorboard_writer(run_dir) if tensorboard else None

    def write(self, kind: str, **record: Any) -> None:
        record = {"kind": kind, **{k: _clean(v) for k, v in record.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None and "step" in record:
            prefix = kind if kind != "eval" else f"eval_{record.get('split', '')}"
            for k, v in record.items():
                if isinstance(v, int | float) and k not in ("step",):
                    self._tb.add_scalar(f"{prefix}/{k}", v, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class NullLog:
    """The metrics log of every process but process 0 of a multi-process job:
    the same calls, nothing written (process 0 writes the run's log)."""

    def write(self, kind: str, **record: Any) -> None:
        del kind, record

    def close(self) -> None:
        pass


class Stopwatch:
    """Seconds of training. It runs except inside :meth:`paused`, which first
    waits for the device to finish the work already dispatched, so that
    asynchronous dispatch moves no training time into a pause."""

    def __init__(self, total: float = 0.0):
        self.total = total
        self._since: float | None = None

    def start(self) -> None:
        self._since = time.perf_counter()

    def read(self) -> float:
        return self.total + (0.0 if self._since is None else time.perf_counter() - self._since)

    @contextlib.contextmanager
    def paused(self, pending: Any = None) -> Iterator[None]:
        jax.block_until_ready(pending)
        self.total, self._since = self.read(), None
        try:
            yield
        finally:
            self.start()


def _tensorboard_writer(run_dir: str):
    """A TensorBoard ``SummaryWriter`` when ``tensorboardX`` or
    ``torch.utils.tensorboard`` (with ``tensorboard``) is installed."""
    for module in ("tensorboardX", "torch.utils.tensorboard"):
        try:
            mod = __import__(module, fromlist=["SummaryWriter"])
            return mod.SummaryWriter(os.path.join(run_dir, "tensorboard"))
        except Exception:  # noqa: BLE001 - optional dependency, any import failure
            continue
    return None


def read_log(path: str, *, missing_ok: bool = False) -> list[dict[str, Any]]:
    """The records of a metrics log (a run folder or the file itself).
    A malformed line is an error naming the file and line."""
    return _read(path, missing_ok=missing_ok, torn_ok=False)[0]


def resume_records(path: str, step: int) -> list[dict[str, Any]]:
    """The records a run had logged when it reached ``step``: the log at
    ``path`` without the records of later steps (written after the
    checkpoint being resumed from), without the end-of-run records (the
    test evaluation and the summary: they are written again when the run
    ends), and without a torn last line. Dropping a torn line or records of
    later steps is reported with a warning."""
    records, torn = _read(path, missing_ok=True, torn_ok=True)
    kept = [r for r in records if r.get("step", 0) <= step]
    later = len(records) - len(kept)
    kept = [r for r in kept if r.get("kind") != "summary"
            and not (r.get("kind") == "eval" and r.get("split") == "test")]
    if torn or later:
        what = [f"a torn last line ({torn[:40]!r}...)"] if torn else []
        what += [f"{later} record(s) of steps after {step}"] if later else []
        warnings.warn(f"{path}: resuming from step {step}, dropped {' and '.join(what)}",
                      stacklevel=3)
    return kept


def _read(path: str, *, missing_ok: bool, torn_ok: bool
          ) -> tuple[list[dict[str, Any]], str | None]:
    """``(records, torn last line or None)``; a malformed line is an error
    naming the file and line, except the last one when ``torn_ok``."""
    if os.path.isdir(path):
        path = os.path.join(path, LOG_NAME)
    if not os.path.exists(path):
        if missing_ok:
            return [], None
        raise FileNotFoundError(f"no metrics log at {path!r}")
    with open(path) as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    records = []
    for i, line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if torn_ok and i == lines[-1][0]:  # a write cut short by a kill
                return records, line
            raise ValueError(f"{path}:{i}: malformed log line: {e}") from e
    return records, None


def select(records: Iterable[dict], kind: str, split: str | None = None) -> list[dict]:
    return [r for r in records if r.get("kind") == kind
            and (split is None or r.get("split") == split)]
