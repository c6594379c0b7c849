"""One process of a 2-process ``kfac-peft train`` job on localhost.

Run with ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` and
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` set
(the test does); the remaining arguments are ``kfac-peft train`` flags. The
process joins the job from those environment variables (after importing
the package, which must not have started JAX's backend), checks that the
CPU collectives work (a sum over the 4 devices of both processes; exit
status 3 with ``NO_CPU_COLLECTIVES <reason>`` if they cannot start), then
runs the command line as a user would (``--devices 2``: both local devices).
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kfac_jax_peft.__main__ import main
from kfac_jax_peft.finetune.devices import initialize_distributed

assert initialize_distributed()  # an error here is a bug, not the platform
try:
    mesh = Mesh(np.array(jax.devices()), ("data",))
    ones = jax.make_array_from_callback((4,), NamedSharding(mesh, P("data")),
                                        lambda index: np.ones(4, np.float32)[index])
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(ones)
    assert float(total.addressable_data(0)) == 4.0, total
except Exception as e:  # noqa: BLE001 - reported to the test, which skips
    print("NO_CPU_COLLECTIVES", f"{type(e).__name__}: {e}".replace("\n", " "), flush=True)
    sys.exit(3)

assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
sys.exit(main(["train", *sys.argv[1:]]))
