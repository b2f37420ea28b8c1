"""One process of a deliberately failing multi-process job (run by tests/test_multiprocess.py).

``python tests/_multiprocess_impl.py HEARTBEAT_S [LATE_S]``, started by
:func:`bnjax.training.distributed.launch_local` (which sets ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``): every process joins, all run one
cross-process collective (so the gloo context is up), then process 1 dies
without a word (``os._exit(3)``, like a killed or crashed host) while process 0
keeps running collectives for up to 120 s. JAX's runtime must end process 0
within about ``HEARTBEAT_S`` seconds; it prints the time of each event. With
``LATE_S``, process 1 instead reaches the first collective ``LATE_S`` seconds after
process 0 and both finish (gloo's fixed 30 s rendezvous must not apply).
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from bnjax.training import distributed  # noqa: E402


def main(heartbeat: int, late: float = 0.0) -> None:
    assert distributed.initialize(initialization_timeout=30, heartbeat_timeout=heartbeat)
    print("initialized", flush=True)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    local = np.full((jax.local_device_count(), 4), jax.process_index() + 1.0, np.float32)
    x = jax.make_array_from_process_local_data(sharding, local)
    total = jax.jit(lambda a: jnp.sum(a), out_shardings=NamedSharding(mesh, P()))
    if late:  # process 1 reaches the first collective `late` s after process 0, nobody dies
        if jax.process_index() == 1:
            time.sleep(late)
        print(f"collective {float(total(x).addressable_data(0))}", flush=True)
        sys.exit(0)
    print(f"collective {float(total(x).addressable_data(0))}", flush=True)
    if jax.process_index() == 1:
        print(f"dying at {time.time():.3f}", flush=True)
        os._exit(3)
    end = time.time() + 120
    while time.time() < end:
        total(x + 1.0).block_until_ready()
        time.sleep(0.2)
    print("still running after 120 s: the dead process was not noticed", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
