"""The metrics log of a run: one JSON object per line, TensorBoard too if installed.

Records have a ``"kind"``: ``"train"`` (``step``, ``loss``, ``lr``,
``clip_rate``, ``update_norm``, ``wall_clock``: seconds of training so far,
evaluation and checkpointing excluded), ``"eval"`` (``step``, ``split``,
``wall_clock`` and the task's metrics) and ``"summary"``. Each line is
flushed as written, so an interrupted run keeps everything it logged.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from typing import Any

LOG_NAME = "metrics.jsonl"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable
    return value


class MetricsLog:
    """Appends records to ``<run_dir>/metrics.jsonl``.

    ``resume_step``: when resuming, records after that step (written by the
    interrupted run after its last checkpoint) are dropped first, so that
    the log of a resumed run reads like one uninterrupted run.
    """

    def __init__(self, run_dir: str, *, resume_step: int | None = None,
                 tensorboard: bool = True):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, LOG_NAME)
        if resume_step is None:
            open(self.path, "w").close()
        else:
            kept = [r for r in read_log(self.path, missing_ok=True)
                    if r.get("kind") != "summary" and r.get("step", 0) <= resume_step]
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(tmp, self.path)
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
    if os.path.isdir(path):
        path = os.path.join(path, LOG_NAME)
    if not os.path.exists(path):
        if missing_ok:
            return []
        raise FileNotFoundError(f"no metrics log at {path!r}")
    records = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: malformed log line: {e}") from e
    return records


def select(records: Iterable[dict], kind: str, split: str | None = None) -> list[dict]:
    return [r for r in records if r.get("kind") == kind
            and (split is None or r.get("split") == split)]
