"""Population statistics on a real model: EMA vs the paper's average vs PreciseBN, and folding.

The MNIST MLP of the paper (Sec. 4.1): 784-100-100-100-10, BN before each hidden
sigmoid, mini-batch 60, plain SGD. One training run; the population statistics
are tracked three ways at once from the same parameter trajectory (the
statistics do not influence training):

* ``ema``: flax's EMA, momentum 0.99 (the default everywhere);
* ``average (all steps)``: ``population="average"`` never reset: averages over
  weights that kept changing (a stale estimate, shown as a warning);
* ``average (last K)``: ``population="average"`` reset K steps before the end;

then, with the final weights frozen, PreciseBN (:func:`bnjax.recalibrate`)
over ``--calib-batches`` training batches of 60 in its three modes (``single_pass``
once from the stale all-steps average, once from the EMA: it inherits the
upstream statistics it starts from). Reported:
test accuracy in eval mode for each, the train/eval consistency of EMA vs
PreciseBN statistics, the recalibration time, and the folded (BN-free)
network's maximum deviation from the unfolded eval-mode network.

Run::

    BNJAX_DATA_DIR=/work/shared/data python benchmarks/population_check.py --steps 5000
"""

from __future__ import annotations

import argparse
import json
import time

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import traverse_util

import bnjax.linen as bl
from bnjax.diagnostics import consistency, format_table
from bnjax.experiments.data import load_dataset
from bnjax.folding import find_pairs, fold
from bnjax.population import BatchStats, reset_population
from bnjax.recalibration import recalibrate


class MLP(nn.Module):
    """784-100-100-100-10; ``folded=True`` is the BN-free twin (Dense with bias)."""

    population: str = "ema"
    init_std: float = 0.1
    folded: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        init = nn.initializers.normal(self.init_std)
        for _ in range(3):
            x = nn.Dense(100, use_bias=self.folded, kernel_init=init)(x)
            if not self.folded:
                x = bl.BatchNorm(population=self.population)(x, train=train)
            x = nn.sigmoid(x)
        return nn.Dense(10, kernel_init=init)(x)


def _reset(stats):
    """:func:`bnjax.reset_population` applied to every BN layer's statistics."""
    if "count" in stats:  # one layer: {"mean", "var", "count", "batches"}
        return reset_population(BatchStats(**stats))._asdict()
    return {name: _reset(sub) for name, sub in stats.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--init-std", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=60)
    ap.add_argument("--last-k", type=int, default=500, help="steps in 'average (last K)'")
    ap.add_argument("--calib-batches", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--json", default=None, help="write the numbers here")
    args = ap.parse_args(argv)

    ds = load_dataset("mnist", data_dir=args.data_dir, flatten=True)
    xtr, ytr, xte, yte = ds.train_images, ds.train_labels, ds.test_images, ds.test_labels
    rng = np.random.default_rng(args.seed)
    ema_model = MLP("ema", args.init_std)
    avg_model = MLP("average", args.init_std)
    v_avg = avg_model.init(jax.random.key(args.seed), xtr[:2])
    params = v_avg["params"]
    st_ema = ema_model.init(jax.random.key(args.seed), xtr[:2])["batch_stats"]
    st_all, st_last = v_avg["batch_stats"], v_avg["batch_stats"]
    tx = optax.sgd(args.lr)
    opt = tx.init(params)

    def loss_fn(p, stats, x, y):
        logits, upd = avg_model.apply(
            {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

    @jax.jit
    def step(params, opt, st_ema, st_all, st_last, x, y):
        (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params, st_all, x, y)
        fwd = lambda m, s: m.apply(  # noqa: E731
            {"params": params, "batch_stats": s}, x, train=True, mutable=["batch_stats"]
        )[1]["batch_stats"]
        st_ema, st_last = fwd(ema_model, st_ema), fwd(avg_model, st_last)
        u, opt = tx.update(g, opt)
        return optax.apply_updates(params, u), opt, st_ema, upd["batch_stats"], st_last, loss

    t0 = time.perf_counter()
    perm = rng.permutation(len(xtr))
    pos = 0
    for i in range(args.steps):
        if pos + args.batch > len(xtr):
            perm, pos = rng.permutation(len(xtr)), 0
        idx = perm[pos : pos + args.batch]
        pos += args.batch
        if i == args.steps - args.last_k:
            st_last = _reset(st_last)
        params, opt, st_ema, st_all, st_last, loss = step(
            params, opt, st_ema, st_all, st_last, xtr[idx], ytr[idx]
        )
    jax.block_until_ready(params)
    train_s = time.perf_counter() - t0

    @jax.jit
    def logits_of(variables, x):
        return avg_model.apply(variables, x, train=False)

    def accuracy(stats):
        v = {"params": params, "batch_stats": stats}
        return float(np.mean(np.argmax(logits_of(v, xte), -1) == yte))

    calib_idx = rng.permutation(len(xtr))[: args.calib_batches * args.batch]
    calib = [xtr[calib_idx[i : i + args.batch]] for i in range(0, len(calib_idx), args.batch)]
    v0 = {"params": params, "batch_stats": st_all}
    results = {
        "steps": args.steps, "lr": args.lr, "init_std": args.init_std,
        "train_seconds": round(train_s, 1), "final_loss": float(loss), "accuracy": {},
        "recalibration_seconds": {},
    }
    acc = results["accuracy"]
    acc["ema (momentum 0.99)"] = accuracy(_with_counts(st_ema, st_all))
    acc["average (all steps)"] = accuracy(st_all)
    acc[f"average (last {args.last_k} steps)"] = accuracy(st_last)
    precise = {}
    for mode in ("train", "layerwise", "single_pass"):
        recalibrate(avg_model, v0, calib[:2], mode=mode)  # compile
        t = time.perf_counter()
        new = recalibrate(avg_model, v0, calib, mode=mode)
        jax.block_until_ready(new)
        results["recalibration_seconds"][mode] = round(time.perf_counter() - t, 3)
        precise[mode] = new
        label = f"PreciseBN {mode} ({len(calib)}x{args.batch})"
        if mode == "single_pass":
            label += ", upstream: average (all steps)"
        acc[label] = accuracy(new["batch_stats"])
    v_ema = {"params": params, "batch_stats": _with_counts(st_ema, st_all)}
    from_ema = recalibrate(avg_model, v_ema, calib, mode="single_pass")
    acc[f"PreciseBN single_pass ({len(calib)}x{args.batch}), upstream: ema"] = accuracy(
        from_ema["batch_stats"]
    )

    # Train/eval consistency on training batches: EMA vs PreciseBN statistics.
    results["consistency_ema"] = format_table(consistency(avg_model, v_ema, calib[:20]))
    results["consistency_precise"] = format_table(
        consistency(avg_model, precise["train"], calib[:20])
    )

    # Folding: the BN-free network vs the eval-mode network.
    ref = precise["train"]
    pairs = find_pairs(avg_model, ref, xte[:2])
    folded = fold(ref, pairs)
    y_ref = np.asarray(logits_of(ref, xte), np.float64)
    y_fold = np.asarray(jax.jit(MLP(folded=True).apply)(folded, xte), np.float64)
    results["fold"] = {
        "pairs": [f"{p.linear} <- {p.bn}" for p in pairs],
        "max_abs_dev": float(np.max(np.abs(y_fold - y_ref))),
        "max_rel_dev": float(np.max(np.abs(y_fold - y_ref)) / np.max(np.abs(y_ref))),
        "same_predictions": float(np.mean(y_fold.argmax(-1) == y_ref.argmax(-1))),
    }

    print(f"MNIST MLP, {args.steps} steps, batch {args.batch}, SGD lr {args.lr}, "
          f"init N(0, {args.init_std}^2); training {train_s:.1f}s, final loss {float(loss):.4f}")
    print("\n| population statistics | test accuracy (eval mode) |\n|---|---|")
    for k, a in acc.items():
        print(f"| {k} | {a:.4f} |")
    print("\nrecalibration time (s, jitted, excl. compile):", results["recalibration_seconds"])
    print("\ntrain/eval consistency on 20 training batches, EMA statistics:")
    print(results["consistency_ema"])
    print("\nsame, PreciseBN (train mode) statistics:")
    print(results["consistency_precise"])
    print("\nfolded network vs eval-mode network on the test set:", results["fold"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


def _with_counts(stats, like):
    """EMA statistics in the layout of the "average" model (count/batches from ``like``)."""
    flat, flat_like = traverse_util.flatten_dict(stats), traverse_util.flatten_dict(like)
    out = {k: flat.get(k, v) for k, v in flat_like.items()}
    return traverse_util.unflatten_dict(out)


if __name__ == "__main__":
    main()
