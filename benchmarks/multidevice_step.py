"""Time one training step of the paper's MNIST MLP on 1 vs N (simulated) devices.

The network of Sec. 4.1: 784-100-100-100-10, sigmoid, BN (``bnjax.linen.BatchNorm``)
before each hidden sigmoid, plain SGD, softmax cross-entropy. Three variants of
the same step, timed side by side in one process (interleaved rounds, medians):

* ``jit``: the ordinary single-device step (``axis_name=None``);
* ``mesh1``: :func:`bnjax.training.parallel.data_parallel` on a 1-device mesh;
* ``meshN``: the same on an N-device mesh (batch split N ways).

On a CPU, ``--devices N`` simulates N devices with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (set here, before JAX is
imported); they share the machine's cores, so expect no speed-up, only the
overhead of the collectives and of splitting a small batch. Run::

    python benchmarks/multidevice_step.py --devices 8 --batch 64

Also prints the deviation of the N-device parameters from the single-device ones
after the timed steps (all variants start from the same state and see the same data).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=8, help="simulated devices (CPU)")
    ap.add_argument("--batch", type=int, default=64, help="global batch (divisible by devices)")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    ap.add_argument("--steps", type=int, default=20, help="steps per round")
    ap.add_argument("--lr", type=float, default=0.5)
    args = ap.parse_args(argv)
    if args.batch % args.devices:
        ap.error(f"--batch {args.batch} is not divisible by --devices {args.devices}")
    if "jax" in sys.modules:
        raise RuntimeError("import this script before jax (it sets XLA_FLAGS)")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={args.devices}"
    )

    import functools
    import time

    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:  # also when imported by path rather than run as a script
        sys.path.insert(0, here)
    import _mesh  # benchmarks/_mesh.py: the shared MLP and mesh helper
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from bnjax import training
    from bnjax.training import parallel

    # 784-100-100-100-10: three hidden layers, BN momentum 0.99, N(0, 1) head weights.
    MLP = functools.partial(_mesh.MLP, layers=3, head_init=nn.initializers.normal(1.0))

    rng = np.random.default_rng(0)
    n_batches = 8
    xs = jnp.asarray(rng.uniform(0, 1, (n_batches, args.batch, 784)).astype(np.float32))
    ys = jnp.asarray(rng.integers(0, 10, (n_batches, args.batch)).astype(np.int32))
    tx = optax.sgd(args.lr)
    key = jax.random.key(0)
    s0 = training.state_from_variables(MLP(None).init(key, xs[0, :2], train=False), tx, key)

    steps = {
        "jit": jax.jit(training.make_train_step(MLP(None), tx)),
        "mesh1": parallel.data_parallel(
            training.make_train_step(MLP(), tx, axis_name="data"),
            _mesh.mesh1d(1, "data"),
        ),
        f"mesh{args.devices}": parallel.data_parallel(
            training.make_train_step(MLP(), tx, axis_name="data"),
            _mesh.mesh1d(args.devices, "data"),
        ),
    }
    states = {}
    for name, step in steps.items():  # compile, warm up
        s = s0
        for i in range(n_batches):
            s, m = step(s, xs[i], ys[i])
        jax.block_until_ready(s)
        states[name] = s

    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            s = states[name]
            t0 = time.perf_counter()
            for i in range(args.steps):
                s, m = step(s, xs[i % n_batches], ys[i % n_batches])
            jax.block_until_ready(s)
            times[name].append((time.perf_counter() - t0) / args.steps)
            states[name] = s

    base = float(np.median(times["jit"]))
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices, "
          f"{os.cpu_count()} cores; batch {args.batch}; median of {args.rounds} rounds "
          f"x {args.steps} steps")
    print(f"{'variant':>8} {'ms/step':>9} {'vs jit':>7}")
    for name, t in times.items():
        med = float(np.median(t))
        print(f"{name:>8} {1e3 * med:9.3f} {med / base:7.2f}x")
    ref = jax.tree.leaves(states["jit"].params)
    for name in steps:
        if name == "jit":
            continue
        d = max(
            float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
            for a, b in zip(jax.tree.leaves(states[name].params), ref, strict=True)
        )
        print(f"max relative deviation of {name} params from jit after "
              f"{n_batches + args.rounds * args.steps} steps: {d:.2e}")


if __name__ == "__main__":
    main()
