"""ResNet-18 (torchvision's architecture) training step: bnjax's BN vs flax's BN vs torch.

One SGD (momentum 0.9) training step of :class:`bnjax.experiments.models.ResNet18`
on ``(batch, size, size, 3)`` float32 inputs, cross-entropy loss, for:

* ``bnjax``: ``bnjax.linen.BatchNorm`` with the torch options of
  :func:`bnjax.interop.batch_norm_kwargs` (unbiased running variance, counters);
* ``bnjax (flax opts)``: ``bnjax.linen.BatchNorm(momentum=0.9)`` (flax's conventions);
* ``flax``: ``flax.linen.BatchNorm(momentum=0.9)`` (its default, inexact
  ``use_fast_variance=True``);
* ``flax exact``: ``flax.linen.BatchNorm(use_fast_variance=False)``;
* ``torch eager``: ``torchvision.models.resnet18`` on CPU, NCHW, eager mode
  (``torch.set_num_threads`` left at its default), if torch is installed.

Time: median of ``--reps`` steps after two warm-up steps (compile excluded),
each variant interleaved round-robin so machine noise hits all alike; ratios to
``flax``.

Usage::

    python benchmarks/resnet18.py                 # writes its section of docs/benchmarks.md
    python benchmarks/resnet18.py --smoke --out - # tiny, prints
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import sys

import flax.linen as nn
import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ops  # noqa: E402  (machine/version info, section writer)

import bnjax  # noqa: E402
from bnjax import training  # noqa: E402
from bnjax.experiments.models import ResNet18  # noqa: E402

TORCH_KW = dict(
    epsilon=1e-5, momentum=0.9, running_variance="unbiased", count_batches=True
)
NORMS = {
    "bnjax": functools.partial(bnjax.linen.BatchNorm, **TORCH_KW),
    "bnjax (flax opts)": functools.partial(bnjax.linen.BatchNorm, momentum=0.9, epsilon=1e-5),
    "flax": functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5),
    "flax exact": functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5,
                                    use_fast_variance=False),
}


def jax_step(norm, batch: int, size: int):
    """A compiled train step and its first arguments."""
    model = ResNet18(norm=norm)
    x = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)
    y = np.arange(batch) % 10
    variables = model.init(jax.random.key(0), x, train=False)
    tx = optax.sgd(0.01, momentum=0.9)
    step = jax.jit(training.make_train_step(model, tx))
    state = [training.state_from_variables(variables, tx, jax.random.key(0))]

    def run():
        state[0], _ = step(state[0], x, y)
        jax.block_until_ready(state[0])

    return run


def torch_step(batch: int, size: int):
    """torchvision's ResNet-18 train step, eager, or None without torch."""
    try:
        import torch

        lib = torch.library.Library("torchvision", "DEF")  # CPU wheel: see tests/test_torch.py
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision
    except Exception:  # noqa: BLE001 - any failure means: no torch row
        return None
    model = torchvision.models.resnet18(num_classes=10).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size)
    y = torch.arange(batch) % 10

    def run():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    run.lib = lib
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="batch 4, 32x32, 2 reps")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs",
                                                  "benchmarks.md"))
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.size, args.reps = 4, 32, 2
    steps = {k: jax_step(norm, args.batch, args.size) for k, norm in NORMS.items()}
    t = torch_step(args.batch, args.size)
    if t is not None:
        steps["torch eager"] = t
    med = ops.interleaved_medians(steps, args.reps)
    ref = med["flax"]
    rows = [
        "## ResNet-18 training step: bnjax vs flax vs torch (`benchmarks/resnet18.py`)",
        "",
        f"{datetime.date.today()}, {ops._machine()}, jax {jax.__version__}. torchvision's "
        f"ResNet-18, batch {args.batch} of {args.size}x{args.size}x3 float32, one SGD "
        f"(momentum 0.9) step; median of {args.reps} interleaved steps after warm-up; "
        "JAX steps compiled, torch eager on CPU.",
        "",
        "| batch norm | ms / step | vs flax |",
        "|---|---|---|",
    ]
    for k, v in med.items():
        rows.append(f"| {k} | {v * 1e3:.1f} | {v / ref:.2f}x |")
    out = "\n".join(rows) + "\n"
    print(out)
    if args.out != "-":
        ops.write_section(args.out, "resnet18", out)
        print(f"wrote the resnet18 section of {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
