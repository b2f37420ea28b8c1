"""Temporary memory of a compiled training step (XLA:CPU), printed as JSON.

Run in a subprocess by tests/test_activations.py, with the scheduler given in
``XLA_FLAGS`` (it is read once, when the backend starts). A conv stack of six
conv -> norm -> leaky_relu blocks, three ways: BatchNormAct (fused), BatchNorm +
nn.leaky_relu (plain), no normalization (none).
"""

from __future__ import annotations

import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import bnjax
from bnjax import training


class Stack(nn.Module):
    kind: str
    width: int = 8

    @nn.compact
    def __call__(self, x, train: bool):
        for _ in range(6):
            x = nn.Conv(self.width, (3, 3), use_bias=False)(x)
            if self.kind == "fused":
                x = bnjax.linen.BatchNormAct(activation="leaky_relu")(x, train=train)
            elif self.kind == "plain":
                x = nn.leaky_relu(bnjax.linen.BatchNorm()(x, train=train))
            else:
                x = nn.leaky_relu(x)
        return jnp.mean(x, (1, 2))


def temp_bytes(kind: str, batch: int) -> int:
    x = jnp.ones((batch, 16, 16, 3))
    model = Stack(kind)
    v = model.init(jax.random.key(0), x, train=False)
    tx = optax.sgd(0.1)
    state = training.state_from_variables(v, tx, jax.random.key(0))
    step = training.make_train_step(model, tx)
    y = jnp.zeros((batch,), jnp.int32)
    return jax.jit(step).lower(state, x, y).compile().memory_analysis().temp_size_in_bytes


if __name__ == "__main__":
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    print(json.dumps({k: temp_bytes(k, batch) for k in ("fused", "plain", "none")}))
