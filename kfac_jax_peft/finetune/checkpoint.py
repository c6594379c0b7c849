"""A run folder's checkpoints and the files that say what the run is.

Guarantees, whatever moment the process is killed at:

* ``config.json`` and ``results.json`` are written whole or not at all
  (a temporary file renamed over the old one); orbax writes a checkpoint
  into a temporary folder and renames it when complete, and deletes the
  previous checkpoint only after that. A folder therefore always holds
  its last complete checkpoint. (The trainer adds: only finite states are
  ever saved.)
* ``results.json`` exists only when the run has finished; it is removed
  before the run is extended (a larger ``steps``), so a folder never
  claims to be finished with a configuration it has not trained.
* A resumed run is the same run: :func:`check_resume` refuses, before
  anything is restored, a configuration that differs from the stored
  ``config.json`` in any key but :data:`IGNORED_ON_RESUME`, and a larger
  ``steps`` (an extension) is the one difference allowed.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from kfac_jax_peft.finetune.config import TrainConfig

CONFIG_NAME = "config.json"
RESULTS_NAME = "results.json"
CHECKPOINT_DIR = "checkpoints"

#: Keys that say where the output goes (the folder may have been moved) or
#: how progress is shown; a resumed run may change them.
IGNORED_ON_RESUME = ("output_dir", "progress")


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (mode 0644 under the usual umask)."""
    from kfac_jax_peft._files import atomic_write

    atomic_write(path, json.dumps(obj, indent=1).encode())


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


class Checkpoints:
    """The orbax checkpoints of a run folder (the latest one kept): items
    ``state`` (a tree of arrays) and ``meta`` (a JSON dict)."""

    def __init__(self, run_dir: str):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.manager = ocp.CheckpointManager(
            os.path.abspath(os.path.join(run_dir, CHECKPOINT_DIR)),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
            item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, meta: dict) -> None:
        ocp = self._ocp
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def restore(self, template: Any = None) -> tuple[int, Any, dict] | None:
        """``(step, state, meta)`` of the latest checkpoint, or None. With a
        ``template`` (a tree of the state's structure, shapes, dtypes and
        shardings) the state has that structure and placement; without, the
        stored structure (nested dicts and lists of arrays) on this process's
        first device, whatever devices it was saved from."""
        ocp = self._ocp
        step = self.manager.latest_step()
        if step is None:
            return None
        if template is None:
            target = self._on_one_device(step)
        else:
            target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
        state = ocp.args.StandardRestore(target)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=state, meta=ocp.args.JsonRestore()))
        return step, out["state"], out["meta"]

    def _on_one_device(self, step: int):
        """The stored state's structure, shapes and dtypes, placed on this
        process's first device: a restore target that does not depend on the
        devices the run was saved from (a run trained on a mesh of 4 is read
        back by a process with one)."""
        ocp = self._ocp
        path = os.path.join(str(self.manager.directory), str(step), "state")
        tree = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)
            if hasattr(m, "shape") and hasattr(m, "dtype") else m, tree)

    def close(self) -> None:
        self.manager.close()


def stored_config(run_dir: str) -> dict[str, Any] | None:
    """The stored ``config.json`` of a run folder, a key missing from it (a
    field added since) counting as its default; None if there is none."""
    path = os.path.join(run_dir, CONFIG_NAME)
    if not os.path.exists(path):
        return None
    defaults = TrainConfig().to_dict()
    return {**defaults, **_read_json(path)}


def config_differences(stored: dict[str, Any], cfg: TrainConfig) -> dict[str, tuple]:
    """``{key: (stored value, value in cfg)}`` for every key that differs,
    the keys of :data:`IGNORED_ON_RESUME` left out."""
    now = cfg.to_dict()
    return {k: (stored.get(k), now.get(k)) for k in sorted(set(stored) | set(now))
            if k not in IGNORED_ON_RESUME and stored.get(k) != now.get(k)}


def check_resume(cfg: TrainConfig) -> dict[str, list]:
    """Refuse to resume the run in ``cfg.output_dir`` with a ``cfg`` that
    differs from the run's: a ``ValueError`` listing each differing key with
    both values. Returns the extension, ``{"steps": [stored, new]}`` when
    ``cfg.steps`` is larger than the stored one (the only difference
    allowed), else ``{}``."""
    stored = stored_config(cfg.output_dir)
    if stored is None:
        raise FileNotFoundError(f"resume: no checkpoint in {cfg.output_dir!r} (no "
                                f"{CONFIG_NAME}: not a run folder)")
    differ = config_differences(stored, cfg)
    extension = {}
    if "steps" in differ and differ["steps"][1] > differ["steps"][0]:
        extension = {"steps": list(differ.pop("steps"))}
    if differ:
        lines = "\n".join(f"  {k}: {a!r} in the run, {b!r} now" for k, (a, b) in differ.items())
        raise ValueError(
            f"resume: the configuration differs from the run in {cfg.output_dir!r} "
            f"({CONFIG_NAME}):\n{lines}\nresume with the run's configuration (a larger "
            "steps is allowed: it extends the run), or train into another output_dir")
    return extension


def finished_result(run_dir: str) -> dict[str, Any] | None:
    """The stored ``results.json`` of a finished run, or None."""
    path = os.path.join(run_dir, RESULTS_NAME)
    return _read_json(path) if os.path.exists(path) else None


def record_extension(cfg: TrainConfig) -> None:
    """Make the folder say that the run now trains for ``cfg.steps``: the
    old results go first (the run is unfinished again), then the config."""
    results = os.path.join(cfg.output_dir, RESULTS_NAME)
    if os.path.exists(results):
        os.unlink(results)
    write_json(os.path.join(cfg.output_dir, CONFIG_NAME), cfg.to_dict())
