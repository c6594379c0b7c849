"""One ``kfac-peft train`` job over 2 processes x 2 CPU devices on localhost
equals one process on the global batch; process 0 alone writes the log and
the run's files, the checkpoint is written once by both."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from kfac_jax_peft.finetune import TrainConfig, read_log, train  # noqa: E402
from kfac_jax_peft.peft import load_peft  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from tiny_checkpoint import make_rte_folder, make_tiny_bert  # noqa: E402

CHILD = pathlib.Path(__file__).parent / "scripts" / "multihost_child.py"
ROOT = str(pathlib.Path(__file__).parent.parent)

# K-FAC with statistics (and inversion) steps and plain steps, dropout on;
# evaluation and checkpoints at step 2 and 4; one padded length (one compilation per kind)
SETTINGS = dict(task="rte", max_length=32, pad_to_multiple_of=32, batch_size=8, steps=4,
                eval_every=2, log_every=2,
                invert_every=2, learning_rate=0.05, damping=1e-2, dropout=0.1,
                optimizer="kfac", clip="post", progress=False)


def _flags(settings: dict) -> list[str]:
    out = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        out += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [
            flag, str(value)]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_of_two_devices_match_one_process(tmp_path):
    model = make_tiny_bert(str(tmp_path / "tiny-bert"), num_layers=1)
    data = make_rte_folder(str(tmp_path / "glue"))
    out = tmp_path / "job"
    flags = _flags(dict(SETTINGS, model=model, data_dir=data, output_dir=out, devices=2))
    address = f"127.0.0.1:{_free_port()}"
    procs = []
    for pid in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(pid), PYTHONPATH=os.pathsep.join(
                       [ROOT] + os.environ.get("PYTHONPATH", "").split(os.pathsep)).rstrip(
                           os.pathsep))
        procs.append(subprocess.Popen([sys.executable, str(CHILD), *flags, "--json"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    try:
        outs = [p.communicate(timeout=1500) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (stdout, _) in zip(procs, outs):
        if p.returncode == 3 and "NO_CPU_COLLECTIVES" in stdout:
            pytest.skip("this platform cannot start JAX's CPU collectives across processes: "
                        + stdout.split("NO_CPU_COLLECTIVES", 1)[1].strip()[:300])
    for pid, (p, (_, stderr)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {pid}:\n{stderr[-3000:]}"
    # process 0 alone printed the result (--json) and wrote the log and the run's files
    # (gloo prints its connections to stdout first)
    lines = outs[0][0].splitlines()
    assert json.loads("\n".join(lines[lines.index("{"):]))["steps"] == 4, outs[0][0]
    assert '"steps"' not in outs[1][0], outs[1][0]
    records = read_log(str(out))
    assert [r["kind"] for r in records].count("start") == 1
    assert records[0]["devices"] == 4 and records[0]["processes"] == 2
    assert sum(r["kind"] == "train" for r in records) == 2
    for name in ("config.json", "results.json", "best.safetensors"):
        assert (out / name).is_file(), name

    train(TrainConfig(**SETTINGS, model=model, data_dir=data, output_dir=str(tmp_path / "one")))
    # the best validation weights (written by process 0 from the placed
    # parameters; the same evaluations pick the same step in both runs)
    job, job_meta = load_peft(str(out / "best.safetensors"))
    ref, ref_meta = load_peft(str(tmp_path / "one" / "best.safetensors"))
    assert job_meta["step"] == ref_meta["step"]
    keystr = jax.tree_util.keystr
    a = [(keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(ref)]
    b = {keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(job)}
    assert len(a) == len(b)
    for path, x in a:
        y = np.asarray(b[path])
        # float32 sums in another order over 4 devices and 2 processes
        assert np.max(np.abs(x - y)) <= 1e-5 * max(np.max(np.abs(x)), 1e-12), path
    assert json.loads((out / "results.json").read_text())["test"] == pytest.approx(
        json.loads((tmp_path / "one" / "results.json").read_text())["test"], abs=1e-6)


def test_importing_the_package_leaves_jax_uninitialised():
    """jax.distributed.initialize must come before JAX's backend starts; the
    package and its command line may be imported first."""
    code = ("import kfac_jax_peft, kfac_jax_peft.finetune, kfac_jax_peft.__main__\n"
            "from jax._src import xla_bridge\n"
            "assert not xla_bridge.backends_are_initialized()\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + os.environ.get("PYTHONPATH", "").split(os.pathsep)).rstrip(os.pathsep))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
