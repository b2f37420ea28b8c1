"""Training memory of In-Place Activated BN: a ResNet-20 step, four ways, plus remat.

For :class:`bnjax.experiments.models.ResNet` (ResNet-20, 28x28x1 inputs, NHWC,
f32) the compiled training step (``bnjax.training.make_train_step``, SGD) is
measured per variant and batch size:

* temporary memory: ``jax.jit(step).lower(...).compile().memory_analysis()
  .temp_size_in_bytes`` (XLA's buffer assignment; arguments and outputs excluded);
* time: median of ``--reps`` steps after a warm-up (compile excluded);
* the largest batch whose temporary memory fits ``--budget-mib``, from a linear
  fit of the memory at the measured batch sizes (it is linear in the batch).

Variants: ``bnjax_act`` (``BatchNormAct``: leaky ReLU fused, identity before the
residual sums), ``bnjax`` (``BatchNorm`` + ``nn.leaky_relu``), ``flax``
(``flax.linen.BatchNorm`` + ``nn.leaky_relu``), ``none`` (no normalization),
and ``bnjax`` with ``jax.checkpoint`` policies on every block (``remat:<policy>``).

XLA reads its scheduler option once, at start-up, so each scheduler runs in its
own subprocess: ``default`` (XLA:CPU's concurrency-optimized scheduler) and
``memory`` (``--xla_cpu_enable_concurrency_optimized_scheduler=false``, the
memory-minimizing list scheduler; GPU backends schedule for memory by default).

``--train-steps N`` also trains the three batch-norm variants for ``N`` steps on
Fashion-MNIST (needs ``BNJAX_DATA_DIR``) and reports their test accuracy.

Usage::

    python benchmarks/memory.py                        # writes its section of docs/benchmarks.md
    python benchmarks/memory.py --smoke --out -        # tiny, prints
    python benchmarks/memory.py --train-steps 300      # plus the accuracy table
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ops  # noqa: E402  (machine/version info, section writer)

from bnjax import training  # noqa: E402
from bnjax.experiments.models import ResNet  # noqa: E402

SCHEDULERS = {"default": "", "memory": "--xla_cpu_enable_concurrency_optimized_scheduler=false"}
VARIANTS = ["bnjax_act", "bnjax", "flax", "none", "remat:dots_saveable", "remat:nothing_saveable"]


def _model(variant: str) -> ResNet:
    if variant.startswith("remat:"):
        return ResNet(norm="bnjax", remat=variant.split(":", 1)[1])
    return ResNet(norm=variant)


def measure(variant: str, batch: int, reps: int) -> dict:
    """Temporary memory (bytes) and median step time (s) of one compiled training step."""
    model = _model(variant)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, 28, 28)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    tx = optax.sgd(0.05, momentum=0.9)
    v = model.init(jax.random.key(0), x[:2], train=False)
    state = training.state_from_variables(v, tx, jax.random.key(0))
    compiled = jax.jit(training.make_train_step(model, tx)).lower(state, x, y).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    state, _ = compiled(state, x, y)
    jax.block_until_ready(state)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        state, m = compiled(state, x, y)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return {"temp": temp, "time": float(np.median(times))}


def child(args) -> None:
    out = {}
    for variant in args.variants:
        for batch in args.batches:
            out[f"{variant}@{batch}"] = measure(variant, batch, args.reps)
            print(f"  {variant} batch {batch}: {out[f'{variant}@{batch}']}", file=sys.stderr)
    print(json.dumps(out))


def run_child(scheduler: str, args) -> dict:
    env = dict(os.environ, XLA_FLAGS=SCHEDULERS[scheduler], JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--reps", str(args.reps),
           "--batches", ",".join(map(str, args.batches)), "--variants", ",".join(args.variants)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"child ({scheduler}) failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def max_batch(points: dict[int, int], budget: int) -> int:
    """Largest batch with ``temp(b) = c0 + c1 b <= budget`` (least-squares line)."""
    b = np.array(sorted(points), float)
    t = np.array([points[k] for k in sorted(points)], float)
    c1, c0 = np.polyfit(b, t, 1)
    return int((budget - c0) // c1) if c1 > 0 else -1


def table(results: dict, args) -> str:
    mib = 2**20
    lines = []
    for sched, res in results.items():
        ref = {b: res[f"bnjax@{b}"] for b in args.batches}
        lines += [
            f"**Scheduler: {sched}** ({SCHEDULERS[sched] or 'XLA:CPU default'})",
            "",
            "| variant | " + " | ".join(f"batch {b}: temp MiB (x bnjax), ms (x)" for b in
                                         args.batches) + f" | max batch in {args.budget_mib} MiB |",
            "|---|" + "---|" * (len(args.batches) + 1),
        ]
        for v in args.variants:
            cells = []
            for b in args.batches:
                r = res[f"{v}@{b}"]
                cells.append(
                    f"{r['temp'] / mib:.1f} ({r['temp'] / ref[b]['temp']:.2f}), "
                    f"{r['time'] * 1e3:.0f} ({r['time'] / ref[b]['time']:.2f})"
                )
            fit = max_batch({b: res[f"{v}@{b}"]["temp"] for b in args.batches},
                            args.budget_mib * mib)
            lines.append(f"| {v} | " + " | ".join(cells) + f" | {fit} |")
        lines.append("")
    return "\n".join(lines)


def train_accuracy(steps: int) -> str:
    from bnjax.experiments.data import load_dataset

    ds = load_dataset("fashion-mnist")
    tx = optax.sgd(0.05, momentum=0.9)
    rows = [
        f"| variant | test accuracy after {steps} steps (batch 128, SGD 0.05 m 0.9) | wall s |",
        "|---|---|---|",
    ]
    for norm in ("bnjax_act", "bnjax", "flax"):
        model = ResNet(norm=norm)
        state = training.create_train_states(model, tx, [0], ds.train_images[:1])
        loop = training.make_train_loop(model, tx, batch_size=128, steps_per_call=10)
        evaluate = training.make_eval_step(model, batch_size=1000)
        t0 = time.perf_counter()
        state, _ = loop(state, ds.train_images, ds.train_labels, num_steps=steps)
        acc = float(evaluate(state, ds.test_images, ds.test_labels)["accuracy"][0])
        rows.append(f"| {norm} | {acc:.4f} | {time.perf_counter() - t0:.0f} |")
        print(rows[-1], file=sys.stderr)
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="32,128,512")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--budget-mib", type=int, default=1024)
    p.add_argument("--train-steps", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="batch 8 and 16, 1 rep")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs",
                                                  "benchmarks.md"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.variants = args.variants.split(",")
    if args.smoke:
        args.batches, args.reps = [8, 16], 1
    if args.child:
        return child(args)
    results = {s: run_child(s, args) for s in SCHEDULERS}
    text = [
        "## Training memory: In-Place Activated BN (`benchmarks/memory.py`)",
        "",
        f"{datetime.date.today()}, {ops._machine()}, jax {jax.__version__}. ResNet-20 "
        "(28x28x1, f32), one compiled SGD step; temp = XLA's temporary buffers "
        "(arguments and outputs excluded); time = median of "
        f"{args.reps} steps; ratios to `bnjax` (BatchNorm + nn.leaky_relu) at the same batch.",
        "",
        table(results, args),
    ]
    if args.train_steps:
        text += ["", train_accuracy(args.train_steps)]
    out = "\n".join(text)
    if args.out == "-":
        print(out)
    else:
        ops.write_section(args.out, "memory", out)
        print(out)
        print(f"wrote the memory section of {args.out}")


if __name__ == "__main__":
    main()
