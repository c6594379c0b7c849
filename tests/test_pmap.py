"""Data parallel K-FAC equals one device on the global batch."""

import os
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).parent / "scripts" / "pmap_equivalence.py"


def test_pmap_four_devices_matches_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [l.split() for l in out.stdout.splitlines() if l.startswith("MAX_REL_DIFF")]
    assert {l[1] for l in lines} == {"exact", "factored"}, out.stdout
    for _, mode, diff in lines:
        assert float(diff) <= 1e-5, (mode, diff)


SHARD_MAP_SCRIPT = pathlib.Path(__file__).parent / "scripts" / "shard_map_equivalence.py"


def test_shard_map_with_default_check_vma_matches_one_device():
    """Statistics captured inside jax.shard_map (check_vma=True, the default)
    are summed over the batch axis like a replicated parameter's gradient."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, str(SHARD_MAP_SCRIPT)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = [l.split() for l in out.stdout.splitlines() if l.startswith("MAX_REL_DIFF")]
    assert float(line[1]) <= 1e-5, line
