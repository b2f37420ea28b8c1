"""PyTorch parity: bnjax's torch options against torch itself, and bnjax.interop.

References are torch's own layers (``torch==2.13.0``, the ``torch`` extra): every
test compares bnjax with what torch computes on the same numbers. Skipped, with
the reason, where torch is not installed.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bnjax
from bnjax import training
from bnjax.experiments.models import ResNet18

torch = pytest.importorskip(
    "torch", reason="PyTorch parity needs the torch extra: pip install -e '.[torch]'"
)


def _torchvision():
    """torchvision's model code (pure Python). The CPU torch wheel lacks the C++ ops
    torchvision registers against; defining their schemas first makes
    ``torchvision.models`` importable (a test-only shim, never in the library)."""
    if not hasattr(_torchvision, "lib"):
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _torchvision.lib = lib
    return pytest.importorskip("torchvision", reason="ResNet-18 parity needs torchvision==0.28.0")


def _np(t):
    return t.detach().cpu().numpy()


def _channels_last(a):
    return np.moveaxis(a, 1, -1) if a.ndim >= 3 else a


# --------------------------------------------------------------------------- one layer

# torch layer, input shape (channels first: torch's layout) for each batch size
LAYERS = {
    "1d": (torch.nn.BatchNorm1d, lambda n: (n, 6)),
    "1d_seq": (torch.nn.BatchNorm1d, lambda n: (n, 6, 5)),
    "2d": (torch.nn.BatchNorm2d, lambda n: (n, 6, 4, 3)),
    "3d": (torch.nn.BatchNorm3d, lambda n: (n, 6, 3, 2, 2)),
}
BATCHES = (5, 8, 3)  # unequal batch sizes across steps


def _run_parity(kind, momentum, affine, track, dtype):
    """Trains one torch layer and its bnjax twin for len(BATCHES) steps on the same
    batches; returns the largest absolute deviation of each compared quantity."""
    torch_cls, shape = LAYERS[kind]
    tdt = torch.float64 if dtype == "float64" else torch.float32
    torch.manual_seed(0)
    tb = torch_cls(6, momentum=momentum, affine=affine, track_running_stats=track).to(tdt)
    if affine:
        with torch.no_grad():
            tb.weight.uniform_(0.5, 1.5)
            tb.bias.normal_(0, 0.5)
    kw = bnjax.interop.batch_norm_kwargs(tb)
    rng = np.random.default_rng(1)
    dev: dict[str, float] = {}

    def note(name, a, b):
        dev[name] = max(dev.get(name, 0.0), float(np.max(np.abs(np.asarray(a) - np.asarray(b)))))

    with jax.enable_x64(dtype == "float64"):
        jdt = jnp.dtype(dtype)
        bn = bnjax.linen.BatchNorm(**kw, param_dtype=jdt)
        x0 = _channels_last(np.zeros(shape(2), dtype))
        variables = bn.init(jax.random.key(0), x0, train=False)
        # (flax and bnjax create batch_stats in float32 whatever param_dtype, as flax)
        variables = jax.tree.map(
            lambda a: a.astype(jdt) if jnp.issubdtype(a.dtype, jnp.floating) else a, variables
        )
        if affine:
            variables = {
                **variables,
                "params": {"scale": jnp.asarray(_np(tb.weight)), "bias": jnp.asarray(_np(tb.bias))},
            }

        def loss(params, stats, x, w):
            y, upd = bn.apply({"params": params, **stats}, x, train=True, mutable=["batch_stats"])
            return jnp.sum(y * w), (y, upd)

        params = variables.get("params", {})
        stats = {k: v for k, v in variables.items() if k != "params"}
        for n in BATCHES:
            x = (rng.standard_normal(shape(n)) * 3 + 2).astype(dtype)
            w = rng.standard_normal(shape(n)).astype(dtype)
            xt = torch.tensor(x, requires_grad=True)
            tb.train()
            yt = tb(xt)
            (yt * torch.tensor(w)).sum().backward()
            xj, wj = _channels_last(x), _channels_last(w)
            (gp, gx), (y, upd) = jax.grad(loss, argnums=(0, 2), has_aux=True)(params, stats, xj, wj)
            stats = {k: v for k, v in upd.items()} if track else stats
            note("y", y, _channels_last(_np(yt)))
            note("dx", gx, _channels_last(_np(xt.grad)))
            if affine:
                note("dscale", gp["scale"], _np(tb.weight.grad))
                note("dbias", gp["bias"], _np(tb.bias.grad))
                tb.weight.grad = tb.bias.grad = None
            if track:
                bs = stats["batch_stats"]
                note("running_mean", bs["mean"], _np(tb.running_mean))
                note("running_var", bs["var"], _np(tb.running_var))
                note("num_batches_tracked", bs["batches"], tb.num_batches_tracked.item())
        # inference (torch's eval uses batch statistics when it tracks none)
        x = (rng.standard_normal(shape(4)) * 3 + 2).astype(dtype)
        tb.eval()
        with torch.no_grad():
            yt = tb(torch.tensor(x))
        y = bn.apply({"params": params, **stats}, _channels_last(x), train=False)
        note("y_eval", y, _channels_last(_np(yt)))
    assert track or not stats
    return dev


# every layer x momentum with torch's defaults; affine / track_running_stats off on
# BatchNorm2d; each in float32 and float64
CASES = [(k, m, True, True) for k in LAYERS for m in (0.1, 0.5, None)] + [
    ("2d", m, affine, track)
    for m in (0.1, None)
    for affine, track in ((False, True), (True, False), (False, False))
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind, momentum, affine, track", CASES)
def test_batch_norm_matches_torch(kind, momentum, affine, track, dtype):
    dev = _run_parity(kind, momentum, affine, track, dtype)
    print(f"\nmax |bnjax - torch| {kind} {momentum} {affine} {track} {dtype}: {dev}")
    tol = 1e-12 if dtype == "float64" else 2e-5
    expected = {"y", "dx", "y_eval"} | ({"dscale", "dbias"} if affine else set())
    expected |= {"running_mean", "running_var", "num_batches_tracked"} if track else set()
    assert set(dev) == expected
    for name, d in dev.items():
        assert d <= tol * (100 if name.startswith("d") else 10), (name, d, dev)


def test_torch_semantics_differ_from_flax_defaults():
    """The options matter: flax's defaults (biased running variance, momentum 0.99)
    do not reproduce torch's running_var; momentum=None is not the paper's average
    for unequal batches."""
    tb = torch.nn.BatchNorm1d(3, momentum=None)
    kw = bnjax.interop.batch_norm_kwargs(tb)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((n, 3)).astype(np.float32) for n in (2, 9, 4)]
    out = {}
    for name, extra in [
        ("torch_kw", {}),
        ("biased", {"running_variance": "biased"}),
        ("average", {"population": "average"}),
    ]:
        bn = bnjax.linen.BatchNorm(**{**kw, **extra})
        v = bn.init(jax.random.key(0), xs[0], train=False)
        for x in xs:
            _, upd = bn.apply(v, x, train=True, mutable=["batch_stats"])
            v = {**v, **upd}
        out[name] = v["batch_stats"]
    tb.train()
    for x in xs:
        tb(torch.tensor(x))
    np.testing.assert_allclose(out["torch_kw"]["var"], _np(tb.running_var), rtol=1e-6)
    np.testing.assert_allclose(out["torch_kw"]["mean"], _np(tb.running_mean), rtol=1e-6, atol=1e-7)
    assert np.max(np.abs(out["biased"]["var"] - _np(tb.running_var))) > 1e-2
    assert np.max(np.abs(out["average"]["mean"] - _np(tb.running_mean))) > 1e-3


def test_batch_norm_kwargs_contents_and_errors():
    kw = bnjax.interop.batch_norm_kwargs(torch.nn.BatchNorm2d(4, eps=1e-3, momentum=0.3))
    assert kw["momentum"] == pytest.approx(0.7) and kw["epsilon"] == pytest.approx(1e-3)
    assert kw["running_variance"] == "unbiased" and "population" not in kw
    assert kw["track_running_stats"] and kw["count_batches"]
    kw = bnjax.interop.batch_norm_kwargs(torch.nn.BatchNorm1d(4, momentum=None, affine=False))
    assert kw["population"] == "cumulative" and not kw["use_scale"] and not kw["use_bias"]
    with pytest.raises(TypeError, match="torch_bn must be a torch.nn.BatchNorm"):
        bnjax.interop.batch_norm_kwargs(torch.nn.InstanceNorm2d(4))
    with pytest.raises(TypeError, match="torch_bn"):
        bnjax.interop.batch_norm_kwargs(torch.nn.Linear(2, 2))


def test_nnx_batch_norm_matches_linen_under_torch_options():
    tb = torch.nn.BatchNorm1d(4, momentum=None)
    kw = bnjax.interop.batch_norm_kwargs(tb)
    kw.pop("axis")
    lin = bnjax.linen.BatchNorm(**kw)
    mod = bnjax.nnx.BatchNorm(4, **kw)
    rng = np.random.default_rng(0)
    v = lin.init(jax.random.key(0), np.zeros((2, 4), np.float32), train=False)
    for n in (3, 7):
        x = rng.standard_normal((n, 4)).astype(np.float32)
        y1, upd = lin.apply(v, x, train=True, mutable=["batch_stats"])
        v = {**v, **upd}
        y2 = mod(x)
        np.testing.assert_array_equal(y1, y2)
    for k in ("mean", "var", "batches"):
        np.testing.assert_array_equal(v["batch_stats"][k], getattr(mod, k)[...])
    free = bnjax.nnx.BatchNorm(4, track_running_stats=False)
    assert not hasattr(free, "mean")
    free.eval()
    x = rng.standard_normal((5, 4)).astype(np.float32)
    tf = torch.nn.BatchNorm1d(4, track_running_stats=False).eval()
    np.testing.assert_allclose(free(x), _np(tf(torch.tensor(x))), atol=2e-6)


# --------------------------------------------------------------------------- SyncBatchNorm


def test_sync_batch_norm_over_simulated_devices_with_unequal_batches():
    """torch.nn.SyncBatchNorm normalizes with the statistics of the global batch (the
    concatenation of every device's batch; its running_var unbiased with the global
    count). bnjax: axis_name pooled over 3 simulated devices (vmap) holding 2, 5 and 3
    examples, padded to 5 and masked."""
    sizes = (2, 5, 3)
    rng = np.random.default_rng(0)
    parts = [(rng.standard_normal((n, 4, 3, 3)) * 2 + 1).astype(np.float32) for n in sizes]
    ws = [rng.standard_normal(p.shape).astype(np.float32) for p in parts]
    tb = torch.nn.SyncBatchNorm(4, momentum=0.1)
    with torch.no_grad():
        tb.weight.uniform_(0.5, 1.5)
        tb.bias.normal_()
    xt = torch.tensor(np.concatenate(parts), requires_grad=True)
    tb.train()
    yt = tb(xt)
    (yt * torch.tensor(np.concatenate(ws))).sum().backward()

    kw = bnjax.interop.batch_norm_kwargs(tb)
    bn = bnjax.linen.BatchNorm(**kw, axis_name="devices")
    pad = lambda a: np.pad(a, [(0, 5 - a.shape[0])] + [(0, 0)] * 3)
    x = np.stack([_channels_last(pad(p)) for p in parts])
    w = np.stack([_channels_last(pad(p)) for p in ws])
    mask = np.stack([(np.arange(5) < n)[:, None, None, None] for n in sizes])
    params = {"scale": jnp.asarray(_np(tb.weight)), "bias": jnp.asarray(_np(tb.bias))}
    stats = bn.init(jax.random.key(0), x[0], train=False)["batch_stats"]

    def loss(params, x, w, m):
        y, upd = bn.apply(
            {"params": params, "batch_stats": stats}, x, train=True, mask=m, mutable=["batch_stats"]
        )
        return jnp.sum(y * w * m), (y, upd)

    grad = jax.vmap(
        jax.grad(loss, argnums=(0, 1), has_aux=True), in_axes=(None, 0, 0, 0), axis_name="devices"
    )
    (gp, gx), (y, upd) = grad(params, x, w, mask)
    y_valid = np.concatenate([y[i, :n] for i, n in enumerate(sizes)])
    gx_valid = np.concatenate([gx[i, :n] for i, n in enumerate(sizes)])
    np.testing.assert_allclose(y_valid, _channels_last(_np(yt)), atol=1e-5)
    np.testing.assert_allclose(gx_valid, _channels_last(_np(xt.grad)), atol=1e-5)
    # per-device parameter gradients, summed (the psum of data parallel training)
    np.testing.assert_allclose(gp["scale"].sum(0), _np(tb.weight.grad), rtol=1e-4)
    np.testing.assert_allclose(gp["bias"].sum(0), _np(tb.bias.grad), rtol=1e-5)
    for i in range(3):  # every device holds the same (global) running statistics
        np.testing.assert_allclose(upd["batch_stats"]["mean"][i], _np(tb.running_mean), atol=1e-6)
        np.testing.assert_allclose(upd["batch_stats"]["var"][i], _np(tb.running_var), rtol=1e-5)
    assert np.all(upd["batch_stats"]["batches"] == tb.num_batches_tracked.item())


# --------------------------------------------------------------------------- interop


class _TorchNet(torch.nn.Module):
    def __init__(self, extra=None):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.bn = torch.nn.BatchNorm2d(8)
        self.extra = extra
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        if self.extra is not None:
            x = self.extra(x)
        return self.fc(x.mean(dim=(2, 3)))


class _LinenNet(nn.Module):
    features: int = 5

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.Conv(8, (3, 3), padding=1)(x)
        x = nn.relu(bnjax.linen.BatchNorm(momentum=0.9, count_batches=True)(x, train=train))
        return nn.Dense(self.features)(x.mean(axis=(1, 2)))


class _NNXNet(nnx.Module):
    def __init__(self):
        rngs = nnx.Rngs(0)
        self.conv = nnx.Conv(3, 8, (3, 3), padding=1, rngs=rngs)
        self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
        self.fc = nnx.Linear(8, 5, rngs=rngs)

    def __call__(self, x):
        return self.fc(nnx.relu(self.bn(self.conv(x))).mean(axis=(1, 2)))


def _randomize(torch_module):
    torch.manual_seed(3)
    with torch.no_grad():
        for m in torch_module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.num_batches_tracked.fill_(11)
    return torch_module


X = np.random.default_rng(0).standard_normal((2, 6, 6, 3)).astype(np.float32)


def _torch_eval(tm, x):
    tm.eval()
    with torch.no_grad():
        return _np(tm(bnjax.interop.torch_input(x)))


def test_from_torch_linen_small_net_and_round_trip():
    tm = _randomize(_TorchNet())
    model = _LinenNet()
    variables = bnjax.interop.from_torch(tm, model, X, train=False)
    assert tm.training  # the torch model's mode is restored
    np.testing.assert_allclose(
        model.apply(variables, X, train=False), _torch_eval(tm, X), atol=2e-6
    )
    np.testing.assert_array_equal(variables["batch_stats"]["BatchNorm_0"]["batches"], 11)
    back = bnjax.interop.to_torch(variables, model, _TorchNet(), X, train=False)
    for k, v in tm.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_from_torch_nnx_and_round_trip():
    tm = _randomize(_TorchNet())
    model = _NNXNet()
    before = jax.tree.map(np.asarray, nnx.state(model))
    state = bnjax.interop.from_torch(tm, model, X)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(model)), before)
    nnx.update(model, state)
    model.eval()
    np.testing.assert_allclose(model(X), _torch_eval(tm, X), atol=2e-6)
    back = bnjax.interop.to_torch(state, model, _TorchNet(), X)
    for k, v in tm.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue  # flax's nnx.BatchNorm keeps no counter
        assert torch.equal(v, back.state_dict()[k]), k


def test_from_torch_name_map():
    tm = _randomize(_TorchNet())
    model = _LinenNet()
    name_map = {"conv": "Conv_0", "bn": "BatchNorm_0", "fc": "Dense_0"}
    a = bnjax.interop.from_torch(tm, model, X, name_map=name_map, train=False)
    b = bnjax.interop.from_torch(tm, model, X, train=False)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    with pytest.raises(ValueError, match="'bn'.*not in name_map"):
        bnjax.interop.from_torch(tm, model, X, name_map={"conv": "Conv_0"}, train=False)


def test_from_torch_errors_name_the_layer():
    with pytest.raises(ValueError, match=r"'extra' \(GroupNorm\).*cannot convert"):
        bnjax.interop.from_torch(_TorchNet(torch.nn.GroupNorm(2, 8)), _LinenNet(), X, train=False)
    with pytest.raises(ValueError, match=r"'fc'.*\(8, 5\).*Dense_0.*\(8, 7\)"):
        bnjax.interop.from_torch(_TorchNet(), _LinenNet(features=7), X, train=False)
    extra = torch.nn.Conv2d(8, 8, 1)
    with pytest.raises(ValueError, match="call #2: torch layer 'extra' is a conv but flax layer"):
        bnjax.interop.from_torch(_TorchNet(extra), _LinenNet(), X, train=False)
    with pytest.raises(TypeError, match="flax_module"):
        bnjax.interop.from_torch(_TorchNet(), object(), X)


# --------------------------------------------------------------------------- ResNet-18


@pytest.fixture(scope="module")
def resnet():
    tv = _torchvision()
    torch.manual_seed(0)
    tm = _randomize(tv.models.resnet18(num_classes=10))
    kw = bnjax.interop.batch_norm_kwargs(tm.bn1)
    model = ResNet18(norm=functools.partial(bnjax.linen.BatchNorm, **kw))
    x = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype(np.float32)
    return tv, tm, model, x


def test_resnet18_eval_logits_match_torchvision(resnet):
    _, tm, model, x = resnet
    variables = bnjax.interop.from_torch(tm, model, x, train=False)
    ref = _torch_eval(tm, x)
    got = model.apply(variables, x, train=False)
    rel = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
    print(f"\nResNet-18 eval logits: max relative deviation {rel:.2e}")
    assert rel <= 1e-5, rel


def test_resnet18_round_trips_bit_for_bit(resnet):
    tv, tm, model, x = resnet
    variables = bnjax.interop.from_torch(tm, model, x, train=False)
    back = bnjax.interop.to_torch(
        variables, model, tv.models.resnet18(num_classes=10), x, train=False
    )
    sd, sd_back = tm.state_dict(), back.state_dict()
    assert set(sd) == set(sd_back)
    for k, v in sd.items():
        assert torch.equal(v, sd_back[k]), k


def _resnet_float64(tv, tm0):
    """torchvision's model and its bnjax twin in float64 (batch_stats cast too)."""
    tm = tv.models.resnet18(num_classes=10).double()
    tm.load_state_dict(tm0.state_dict())
    kw = bnjax.interop.batch_norm_kwargs(tm.bn1)
    model = ResNet18(norm=functools.partial(bnjax.linen.BatchNorm, **kw, param_dtype=jnp.float64))
    return tm, model


def _f64(tree):
    return jax.tree.map(
        lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def test_resnet18_gradients_match_torchvision_float32(resnet):
    """One train-mode step's loss and parameter gradients, float32 (per-leaf error
    relative to the leaf's largest gradient)."""
    tv, tm0, model, x = resnet
    tm = tv.models.resnet18(num_classes=10)
    tm.load_state_dict(tm0.state_dict())
    variables = bnjax.interop.from_torch(tm, model, x, train=False)
    rng = np.random.default_rng(1)
    xb, yb = rng.standard_normal((8, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, 8)
    tm.train()
    torch.nn.functional.cross_entropy(
        tm(bnjax.interop.torch_input(xb)), torch.tensor(yb)
    ).backward()

    def loss(p):
        logits, upd = model.apply(
            {"params": p, "batch_stats": variables["batch_stats"]},
            xb,
            train=True,
            mutable=["batch_stats"],
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), upd

    g, upd = jax.grad(loss, has_aux=True)(variables["params"])
    grads = bnjax.interop.to_torch(
        {"params": g, "batch_stats": upd["batch_stats"]},
        model,
        tv.models.resnet18(num_classes=10),
        x,
        train=False,
    )
    mine = dict(grads.named_parameters())
    worst = max(
        float((mine[n].detach() - p.grad).abs().max() / p.grad.abs().max())
        for n, p in tm.named_parameters()
    )
    print(f"\nResNet-18 float32 gradients: max relative deviation {worst:.2e}")
    assert worst <= 1e-4, worst
    for n, b in tm.named_buffers():  # the updated running statistics and counters
        np.testing.assert_allclose(
            _np(dict(grads.named_buffers())[n]), _np(b), rtol=1e-5, atol=1e-6
        )


def test_resnet18_three_sgd_steps_match_torchvision(resnet):
    """Three SGD (momentum 0.9) steps in train mode on the same batches (8, 6, 8
    examples): parameters, running statistics and counters as torch's. In float64:
    in float32 the two libraries' rounding (1e-5 relative in the gradients, the
    test above) is amplified by the training dynamics of a tiny-batch ResNet
    (a batch of 6 normalizes layer4 over 6 values per channel) to ~1e-3 after
    two steps; in float64 the runs agree to ~1e-12."""
    tv, tm0, _, _ = resnet
    with jax.enable_x64(True):
        tm, model = _resnet_float64(tv, tm0)
        x = np.zeros((2, 32, 32, 3))
        variables = _f64(bnjax.interop.from_torch(tm, model, x, train=False))
        rng = np.random.default_rng(1)
        batches = [(rng.standard_normal((n, 32, 32, 3)), rng.integers(0, 10, n)) for n in (8, 6, 8)]
        opt_t = torch.optim.SGD(tm.parameters(), lr=0.05, momentum=0.9)
        tm.train()
        for xb, yb in batches:
            opt_t.zero_grad()
            logits = tm(bnjax.interop.torch_input(xb))
            torch.nn.functional.cross_entropy(logits, torch.tensor(yb)).backward()
            opt_t.step()

        tx = optax.sgd(0.05, momentum=0.9)  # torch.optim.SGD(lr=0.05, momentum=0.9)
        step = jax.jit(training.make_train_step(model, tx))  # mean cross-entropy, as torch's
        state = training.state_from_variables(variables, tx, jax.random.key(0))
        for xb, yb in batches:
            state, _ = step(state, xb, yb)
        stats = state.batch_stats
        mine = bnjax.interop.to_torch(
            {"params": state.params, "batch_stats": stats},
            model,
            tv.models.resnet18(num_classes=10).double(),
            x,
            train=False,
        )
        got, want = mine.state_dict(), tm.state_dict()
        worst = max(
            float((got[k].double() - v.double()).abs().max() / max(1.0, float(v.abs().max())))
            for k, v in want.items()
        )
        print(f"\nResNet-18 3 SGD steps (float64): max relative deviation {worst:.2e}")
        assert worst <= 1e-4, worst
        assert all(
            got[k].item() == v.item() == 11 + 3 for k, v in want.items() if "num_batches" in k
        )
