"""Small reference models for the paper's experiments, with or without batch norm.

* :class:`MLP`: the paper's MNIST network (Sec. 4.1): `784-100-100-100-10`,
  sigmoid hidden units, weights from a small Gaussian, batch norm (optional)
  between each hidden `Dense` and its nonlinearity, `z = g(BN(W u))` (the
  hidden biases are dropped in the BN net: beta does their job).
* :class:`ResNet18`: torchvision's ResNet-18, layer for layer (the PyTorch
  porting test and guide, :mod:`bnjax.interop`).
* :class:`ConvNet`: a small NHWC convnet (conv, BN, activation, max-pool) for
  the learning-rate experiments, BN per feature map as in Sec. 3.2.

Both take `train` explicitly and record, for every hidden layer `i`, the
input of its nonlinearity (`"act_in_i"`) and, with BN, the BN input
(`"bn_in_i"`) in the `"intermediates"` collection when it is mutable, so a
probe such as Figure 1(b, c) costs nothing unless asked for:

```python
model = MLP(use_bn=True)
variables = model.init(key, jnp.zeros((1, 784)), train=False)
logits, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
logits, aux = model.apply(variables, x, train=False, mutable=["intermediates"])
aux["intermediates"]["act_in_2"][0].shape   # (batch, 100)
```
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnjax import activations
from bnjax.linen import BatchNorm, BatchNormAct

__all__ = ["ACTIVATIONS", "MLP", "NORMS", "ConvNet", "ResNet", "ResNet18", "activation"]

Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "sigmoid": nn.sigmoid,
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "gelu": nn.gelu,
    "identity": lambda x: x,
}


def activation(name: str) -> Callable[[Array], Array]:
    """The activation function called `name` (one of :data:`ACTIVATIONS`)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}") from None


class MLP(nn.Module):
    """The paper's MNIST network: `Dense -> [BN] -> sigmoid` per hidden layer.

    Attributes:
      hidden: hidden layer widths, default `(100, 100, 100)`.
      num_classes: output units (logits), default 10.
      use_bn: insert :class:`bnjax.linen.BatchNorm` before each hidden nonlinearity
        and drop the hidden biases.
      init_std: standard deviation of the Gaussian initial weights
        `N(0, init_std^2)` of every `Dense` kernel (biases start at 0).
        The paper says only "small random Gaussian values".
      act: hidden activation name (see :data:`ACTIVATIONS`), default `"sigmoid"`.
      bn: extra keyword arguments for every BatchNorm (`momentum`,
        `population`, `grad`, ...), as a tuple of `(name, value)` pairs or
        a dict.
      norm: the normalization layer's class where `use_bn` (default `None`:
        :class:`bnjax.linen.BatchNorm`); any linen module called as
        `norm(name=..., **bn)(x, train=...)`, e.g. `bnjax.linen.BatchRenorm`
        (then `bn` holds its arguments, such as `r_max`). The layers keep
        the names `bn_<i>` whatever the class.

    Input `(batch, ...)` is flattened to `(batch, features)`; output is
    `(batch, num_classes)` logits.
    """

    hidden: Sequence[int] = (100, 100, 100)
    num_classes: int = 10
    use_bn: bool = True
    init_std: float = 1.0
    act: str = "sigmoid"
    bn: Any = ()
    norm: Any = None

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        g = activation(self.act)
        init = nn.initializers.normal(stddev=self.init_std)
        x = jnp.reshape(x, (x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            x = nn.Dense(width, use_bias=not self.use_bn, kernel_init=init, name=f"dense_{i}")(x)
            if self.use_bn:
                self.sow("intermediates", f"bn_in_{i}", x)
                norm = BatchNorm if self.norm is None else self.norm
                x = norm(name=f"bn_{i}", **dict(self.bn))(x, train=train)
            self.sow("intermediates", f"act_in_{i}", x)
            x = g(x)
        return nn.Dense(self.num_classes, kernel_init=init, name="head")(x)


class ConvNet(nn.Module):
    """A small NHWC convnet: per block `Conv3x3 -> [BN] -> act -> MaxPool2`, then a head.

    Attributes:
      features: output channels of each conv block, default `(32, 64)`.
      dense: width of the hidden dense layer before the head (0: none), default 128.
      num_classes: logits, default 10.
      use_bn: batch norm (per feature map, Sec. 3.2) before each activation,
        conv and dense biases dropped.
      act: activation name (see :data:`ACTIVATIONS`), default `"relu"`.
      bn: extra BatchNorm keyword arguments (as for :class:`MLP`).
      downsample: `"max_pool"` (default: a 3x3 conv then a 2x2 max-pool) or
        `"stride"` (a 3x3 conv of stride 2, no pooling: the same output sizes
        at about a quarter of the FLOPs, and much faster on a CPU).
      norm: the normalization layer's class (default `None`:
        :class:`bnjax.linen.BatchNorm`), e.g. `flax.linen.BatchNorm`; called as
        `norm(name="bn_<i>", **bn)(x, use_running_average=not train)`, so both
        libraries' layers fit and keep the same variable names.

    Input `(batch, H, W)` or `(batch, H, W, C)` (MNIST: `(batch, 28, 28)`);
    output `(batch, num_classes)` logits. Kernels use flax's default
    LeCun-normal initializer.
    """

    features: Sequence[int] = (32, 64)
    dense: int = 128
    num_classes: int = 10
    use_bn: bool = True
    act: str = "relu"
    bn: Any = ()
    downsample: str = "max_pool"
    norm: Any = None

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        g = activation(self.act)
        if self.downsample not in ("max_pool", "stride"):
            raise ValueError(f"downsample must be 'max_pool' or 'stride', got {self.downsample!r}")
        strides = (2, 2) if self.downsample == "stride" else (1, 1)
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4:
            raise ValueError(
                f"ConvNet expects images (batch, H, W) or (batch, H, W, C), got shape {x.shape}"
            )
        layers = [(f"conv_{i}", c) for i, c in enumerate(self.features)]
        if self.dense:
            layers.append(("dense", self.dense))
        for i, (name, width) in enumerate(layers):
            if name == "dense":
                x = jnp.reshape(x, (x.shape[0], -1))
                x = nn.Dense(width, use_bias=not self.use_bn, name=name)(x)
            else:
                x = nn.Conv(width, (3, 3), strides, use_bias=not self.use_bn, name=name)(x)
            if self.use_bn:
                self.sow("intermediates", f"bn_in_{i}", x)
                norm = BatchNorm if self.norm is None else self.norm
                x = norm(name=f"bn_{i}", **dict(self.bn))(x, use_running_average=not train)
            self.sow("intermediates", f"act_in_{i}", x)
            x = g(x)
            if name != "dense" and self.downsample == "max_pool":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = jnp.reshape(x, (x.shape[0], -1))
        return nn.Dense(self.num_classes, name="head")(x)


class _BasicBlock(nn.Module):
    """`conv3x3 -> norm+act -> conv3x3 -> norm`, plus the (projected) shortcut, then act."""

    width: int
    strides: int
    norm_act: Callable[..., nn.Module]  # normalization followed by the activation
    norm: Callable[..., nn.Module]  # normalization alone (before the residual sum)
    act: Callable[[Array], Array]

    @nn.compact
    def __call__(self, x: Array) -> Array:
        s = (self.strides, self.strides)
        y = nn.Conv(self.width, (3, 3), s, use_bias=False)(x)
        y = self.norm_act()(y)
        y = nn.Conv(self.width, (3, 3), use_bias=False)(y)
        y = self.norm()(y)
        if x.shape != y.shape:
            x = nn.Conv(self.width, (1, 1), s, use_bias=False)(x)
            x = self.norm()(x)
        return self.act(y + x)


NORMS = ("bnjax_act", "bnjax", "flax", "none")


class ResNet(nn.Module):
    """A CIFAR-style ResNet (He et al. 2016, Sec. 4.2: ResNet-`6n+2`), NHWC.

    A 3x3 stem of `widths[0]` channels, then three stages of `blocks` basic
    blocks (`widths` channels, stride 2 at each stage's start), global average
    pooling and a dense head; `blocks=3` is ResNet-20. The normalization is
    chosen by `norm`, written the way flax's examples write it (a
    `functools.partial` of the layer):

    * `"bnjax_act"`: `bnjax.linen.BatchNormAct(activation=LeakyReLU(slope))`
      where batch norm is followed by the activation, and `BatchNormAct` with
      `"identity"` before the residual sum (every normalization keeps only
      its output for the backward pass: In-Place Activated BN);
    * `"bnjax"`: `bnjax.linen.BatchNorm` + `nn.leaky_relu`;
    * `"flax"`: `flax.linen.BatchNorm` + `nn.leaky_relu`;
    * `"none"`: no normalization (convolutions get biases).

    `remat`: `None`, or a `jax.checkpoint_policies` name (e.g.
    `"nothing_saveable"`, `"dots_saveable"`) applied to every block, to
    compare In-Place ABN with recomputation.

    Input `(batch, H, W)` or `(batch, H, W, C)`; output logits.
    """

    norm: str = "bnjax_act"
    blocks: int = 3
    widths: Sequence[int] = (16, 32, 64)
    num_classes: int = 10
    slope: float = 0.01
    momentum: float = 0.9
    remat: str | None = None

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if x.ndim == 3:
            x = x[..., None]
        act = functools.partial(nn.leaky_relu, negative_slope=self.slope)
        kw = dict(use_running_average=not train, momentum=self.momentum)
        if self.norm == "bnjax_act":
            leaky = activations.LeakyReLU(self.slope)
            norm_act = functools.partial(BatchNormAct, activation=leaky, **kw)
            norm = functools.partial(BatchNormAct, activation="identity", **kw)
        elif self.norm == "none":
            norm_act = lambda: act  # noqa: E731
            norm = lambda: (lambda y: y)  # noqa: E731
        else:
            layer = BatchNorm if self.norm == "bnjax" else nn.BatchNorm
            extra = {"use_fast_variance": False} if self.norm == "flax" else {}
            norm = functools.partial(layer, **kw, **extra)
            norm_act = lambda: (lambda y: act(norm()(y)))  # noqa: E731
        block = _BasicBlock
        if self.remat is not None:
            block = nn.remat(_BasicBlock, policy=getattr(jax.checkpoint_policies, self.remat))
        use_bias = self.norm == "none"
        x = nn.Conv(self.widths[0], (3, 3), use_bias=use_bias)(x)
        x = norm_act()(x)
        for stage, width in enumerate(self.widths):
            for b in range(self.blocks):
                strides = 2 if (stage > 0 and b == 0) else 1
                x = block(width, strides, norm_act, norm, act)(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


class _TorchBasicBlock(nn.Module):
    """torchvision's `BasicBlock`: `conv1 bn1 relu conv2 bn2 (+ downsample) relu`,
    its layers called (and named) in torchvision's order."""

    width: int
    strides: int
    norm: Callable[..., Any]
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(nn.Conv, self.width, use_bias=self.use_bias)
        pad1 = ((1, 1), (1, 1))
        s = (self.strides, self.strides)
        y = conv((3, 3), s, padding=pad1, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = conv((3, 3), padding=pad1, name="conv2")(y)
        y = self.norm(name="bn2")(y)
        if x.shape != y.shape:
            x = conv((1, 1), s, padding="VALID", name="downsample_0")(x)
            x = self.norm(name="downsample_1")(x)
        return nn.relu(y + x)


class ResNet18(nn.Module):
    """torchvision's `resnet18` in flax.linen, NHWC: same layers, order and names.

    `conv1` (7x7, stride 2, padding 3) `bn1` ReLU, 3x3 max-pool (stride 2,
    padding 1), `layer1` ... `layer4` of two basic blocks (64, 128, 256, 512
    channels; stride 2 and a 1x1 `downsample` projection at the start of layers
    2-4), global average pooling, `fc`. Layer names follow torchvision's
    (`layer2_0/downsample_1` is torch's `layer2.0.downsample.1`), and layers
    are called in torchvision's order, so :func:`bnjax.interop.from_torch` pairs
    them by call order.

    The normalization is a `functools.partial` of the layer, as in flax's
    examples; the model adds `use_running_average=not train`:

    ```python
    ResNet18(norm=functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5))
    ResNet18(norm=functools.partial(bnjax.linen.BatchNorm, **bnjax.interop.
                                    batch_norm_kwargs(torch_model.bn1)))
    ```

    Attributes:
      num_classes: outputs of `fc` (default 10).
      norm: the batch-norm layer (default flax's, with torch's momentum 0.1 =
        flax's 0.9, and torch's epsilon); `None`: no normalization and
        convolutions with biases, the model that :func:`bnjax.fold`'s variables
        (every batch norm folded into its convolution) belong to.
    """

    num_classes: int = 10
    norm: Callable[..., nn.Module] | None = functools.partial(
        nn.BatchNorm, momentum=0.9, epsilon=1e-5
    )

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        if self.norm is None:
            norm = lambda name: (lambda y: y)  # noqa: E731
        else:
            norm = functools.partial(self.norm, use_running_average=not train)
        use_bias = self.norm is None
        x = nn.Conv(64, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=use_bias,
                    name="conv1")(x)
        x = nn.relu(norm(name="bn1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, width in enumerate((64, 128, 256, 512)):
            for b in range(2):
                strides = 2 if (i > 0 and b == 0) else 1
                x = _TorchBasicBlock(width, strides, norm, use_bias, name=f"layer{i + 1}_{b}")(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(x)
