"""Per-batch cost of test-time adaptation (bnjax.adapt) against a plain eval forward.

On the ``bnjax-shift`` convnet (:class:`bnjax.experiments.models.ConvNet`, stride-2
blocks, BN before every ReLU) and a batch of ``--batch`` 28x28 images, each step is
``jax.jit``-compiled and timed (median of ``--reps`` calls after warm-up, the
variants interleaved round-robin):

* ``eval``: ``model.apply(variables, x, train=False)`` (Algorithm 2, the baseline);
* ``norm(prior=16)``, ``norm(prior=0)``: one :class:`bnjax.adapt.Adapter` step
  (batch statistics computed per layer, mixed, applied);
* ``robust``: the same plus the statistics carried across batches;
* ``tent (1 step)``: forward, backward to the batch-norm affine parameters, an
  Adam update.

Goals (issue 20): ``norm`` <= 1.3x eval, ``tent`` <= 3.5x eval.

Usage::

    python benchmarks/adapt.py               # writes its section of docs/benchmarks.md
    python benchmarks/adapt.py --out -       # prints only
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ops  # noqa: E402  (machine/version info, section writer)

import bnjax  # noqa: E402
from bnjax.experiments.models import ConvNet  # noqa: E402


def steps(batch: int):
    model = ConvNet(downsample="stride", bn=(("momentum", 0.9),))
    x = np.random.default_rng(0).random((batch, 28, 28)).astype(np.float32)
    variables = model.init(jax.random.key(0), x, train=False)
    out = {}
    plain = jax.jit(lambda v, x: model.apply(v, x, train=False))
    out["eval"] = lambda: plain(variables, x)
    for name, adapter in {
        "norm(prior=16)": bnjax.adapt.norm(prior=16.0),
        "norm(prior=0)": bnjax.adapt.norm(prior=0.0),
        "robust": bnjax.adapt.robust(),
        "tent (1 step)": bnjax.adapt.tent(optax.adam(1e-3)),
    }.items():
        state = [adapter.init(model, variables, train=False)]

        def run(adapter=adapter, state=state):
            logits, state[0] = adapter.step(state[0], x)
            return logits

        out[name] = run
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs",
                                                  "benchmarks.md"))
    args = p.parse_args(argv)
    med = ops.interleaved_medians(steps(args.batch), args.reps)
    goals = {"norm(prior=16)": 1.3, "norm(prior=0)": 1.3, "tent (1 step)": 3.5}
    rows = [
        "## Test-time adaptation: cost per batch (`benchmarks/adapt.py`)",
        "",
        f"{datetime.date.today()}, {ops._machine()}, jax {jax.__version__}. The `bnjax-shift` "
        f"convnet, a batch of {args.batch} 28x28 images, each step compiled; median of "
        f"{args.reps} interleaved calls after warm-up; ratios to the plain eval forward.",
        "",
        "| step | us / batch | vs eval | goal |",
        "|---|---|---|---|",
    ]
    for k, v in med.items():
        goal = goals.get(k)
        mark = "" if goal is None else (f"<= {goal}x: " + ("met" if v / med["eval"] <= goal
                                                            else "**not met**"))
        rows.append(f"| {k} | {v * 1e6:.0f} | {v / med['eval']:.2f}x | {mark} |")
    out = "\n".join(rows) + "\n"
    print(out)
    if args.out != "-":
        ops.write_section(args.out, "adapt", out)
        print(f"wrote the adapt section of {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
