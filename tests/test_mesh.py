"""K-FAC under jit over a device mesh: inversions spread over the devices,
factor state split over them (4 simulated devices, in a child process)."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import kfac_jax_peft as kp

SCRIPT = pathlib.Path(__file__).parent / "scripts" / "spread_equivalence.py"
ROOT = str(pathlib.Path(__file__).parent.parent)


def test_spread_inversions_and_split_state_match_replicated_on_four_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
                   [ROOT] + os.environ.get("PYTHONPATH", "").split(os.pathsep)).rstrip(
                       os.pathsep))
    out = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = {tuple(l.split()[:2]): l.split() for l in out.stdout.splitlines()}
    for mode in ("exact", "cholesky_solve", "curvature_only"):
        # each matrix decomposed by the same kernel on some device: equal to round-off
        assert float(lines[("SPREAD", mode)][2]) <= 1e-5, out.stdout
    (sharded,) = [v for k, v in lines.items() if k[0] == "SHARDED"]
    assert float(sharded[1]) <= 1e-5, out.stdout
    (split,) = [v for k, v in lines.items() if k[0] == "SHARDED_ROWS"]
    assert int(split[1]) > 0, out.stdout  # the state really is split
    (resume,) = [v for k, v in lines.items() if k[0] == "RESUME"]
    assert float(resume[1]) == 0.0 and resume[3] == "True", out.stdout


def _tiny():
    params = {"dense": {"kernel": jnp.ones((4, 8)), "bias": jnp.zeros(8)}}
    stats = kp.LayerStats(A=jnp.eye(5), G=jnp.eye(8), num_tokens=jnp.float32(3),
                          num_examples=jnp.float32(2))
    return params, {"dense": {"kernel": stats}}


def test_distribute_inversions_needs_a_mesh_and_says_so():
    params, stats = _tiny()
    tx = kp.kfac_precondition(1e-2, distribute_inversions=True)
    with pytest.raises(ValueError, match="jax.set_mesh"):
        jax.jit(lambda g, s: tx.update(g, s, kfac_stats=stats))(params, tx.init(params))


def test_distribute_inversions_on_a_one_device_mesh_is_the_replicated_update():
    params, stats = _tiny()
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    out = {}
    for spread in (False, True):
        tx = kp.kfac_precondition(1e-2, distribute_inversions=spread)
        with jax.set_mesh(mesh):
            out[spread], _ = jax.jit(lambda g, s, tx=tx: tx.update(g, s, kfac_stats=stats))(
                params, tx.init(params))
    for a, b in zip(jax.tree_util.tree_leaves(out[False]), jax.tree_util.tree_leaves(out[True])):
        np.testing.assert_array_equal(a, b)


def test_distribute_inversions_refuses_what_it_cannot_spread():
    with pytest.raises(ValueError, match="newton_schulz"):
        kp.kfac_precondition(damping_mode="factored", inverse_method="newton_schulz",
                             distribute_inversions=True)
    with pytest.raises(ValueError, match="pmap"):
        kp.kfac_precondition(axis_name="devices", distribute_inversions=True)


def test_state_shardings_split_square_factors_that_divide_and_replicate_the_rest():
    params, _ = _tiny()
    tx = optax.chain(kp.kfac_precondition(1e-2), optax.scale(-0.1))
    state = tx.init(params)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    sh = kp.kfac_state_shardings(state, mesh)
    assert jax.tree_util.tree_structure(sh) == jax.tree_util.tree_structure(state)
    k = kp.kfac_state(sh)
    assert k.factors["dense/kernel/A"].average == NamedSharding(mesh, P("data"))
    assert k.factors["dense/kernel/A"].eigen.vals == NamedSharding(mesh, P())
    assert k.count == NamedSharding(mesh, P())
    with pytest.raises(ValueError, match="not an axis"):
        kp.kfac_state_shardings(state, mesh, "model")


_SAVE_ON_FOUR = """
import sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from kfac_jax_peft.finetune.checkpoint import Checkpoints
mesh = Mesh(np.array(jax.devices()), ("data",))
rows = jax.device_put(np.arange(32.0, dtype=np.float32).reshape(8, 4),
                      NamedSharding(mesh, P("data")))
same = jax.device_put(np.full(3, 2.0, np.float32), NamedSharding(mesh, P()))
c = Checkpoints(sys.argv[1])
c.save(7, {"trainable": {"w": rows}, "opt_state": [same]}, {"step": 7})
c.close()
"""


def test_a_checkpoint_saved_on_four_devices_is_read_back_on_one(tmp_path):
    # what reading a finished run back does (resume of a finished run, compare):
    # no template, so the stored layout must not be required
    from kfac_jax_peft.finetune.checkpoint import Checkpoints

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
                   [ROOT] + os.environ.get("PYTHONPATH", "").split(os.pathsep)).rstrip(
                       os.pathsep))
    out = subprocess.run([sys.executable, "-c", _SAVE_ON_FOUR, str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(jax.devices()) == 1
    checkpoints = Checkpoints(str(tmp_path))
    step, state, meta = checkpoints.restore()
    checkpoints.close()
    assert step == 7 and meta == {"step": 7}
    np.testing.assert_array_equal(np.asarray(state["trainable"]["w"]),
                                  np.arange(32.0, dtype=np.float32).reshape(8, 4))
    np.testing.assert_array_equal(np.asarray(state["opt_state"][0]), np.full(3, 2.0))
