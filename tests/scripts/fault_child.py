"""Train a tiny run and kill this process with SIGKILL at a chosen moment.

Arguments: a pickled ``(TrainConfig, Data)`` file, a compilation cache
folder, a kill point and ``fresh`` or ``resume``. Kill points (``none``:
run to the end):

* ``save:S``: checkpoint ``S`` has been handed to orbax but not waited for
  (its files are being written);
* ``saved:S``: checkpoint ``S`` is complete;
* ``log:S``: half of the training record of step ``S`` is written (a torn
  last line of ``metrics.jsonl``);
* ``eval:S``: the validation record of step ``S`` is written, the best
  weights and the checkpoint of step ``S`` are not;
* ``summary``: the summary record is written, ``results.json`` is not.

The hooks wrap the run folder's writers in this process only; the loop
itself is the library's.
"""

import os
import pickle
import signal
import sys

from kfac_jax_peft.finetune import checkpoint, enable_compilation_cache, logs, train


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(kill: str) -> None:
    where, _, at = kill.partition(":")
    step = int(at) if at else None
    save, write = checkpoint.Checkpoints.save, logs.MetricsLog.write

    def hooked_save(self, s, state, meta):
        if where == "save" and s == step:
            start = self.manager.save  # orbax writes in the background: die once it started

            def start_then_die(*args, **kwargs):
                start(*args, **kwargs)
                die()

            self.manager.save = start_then_die
        save(self, s, state, meta)
        if where == "saved" and s == step:
            die()

    def hooked_write(self, kind, **record):
        if where == "log" and kind == "train" and record.get("step") == step:
            self._file.write('{"kind": "train", "step": ')
            self._file.flush()
            die()
        write(self, kind, **record)
        if (where == "eval" and kind == "eval" and record.get("step") == step
                or where == "summary" and kind == "summary"):
            die()

    checkpoint.Checkpoints.save = hooked_save
    logs.MetricsLog.write = hooked_write


def main(spec_file: str, cache: str, kill: str, mode: str) -> None:
    with open(spec_file, "rb") as f:
        cfg, data = pickle.load(f)
    enable_compilation_cache(cache)
    if kill != "none":
        install(kill)
    train(cfg, data=data, resume=mode == "resume")


if __name__ == "__main__":
    main(*sys.argv[1:5])
