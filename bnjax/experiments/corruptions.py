"""The shift suite: MNIST-C's 15 corruptions, cached, and label-shifted test streams.

Mu & Gilmer (2019, "MNIST-C: A robustness benchmark for computer vision") corrupt
the MNIST test set in 15 ways, one severity each; the parameters here are their
reference implementation's defaults (github.com/google-research/mnist-c), rewritten on
NumPy, SciPy and scikit-image (the `shift` extra). Images are float32 `(N, 28,
28)` in `[0, 1]` (:func:`bnjax.experiments.data.load_dataset`), MNIST's or
Fashion-MNIST's; every corruption keeps the shape and the range and is
deterministic per `seed` (each corruption draws from its own
`numpy.random.default_rng([seed, index])`).

| corruption | what it does (parameters) |
|---|---|
| `shot_noise` | Poisson noise, `poisson(c x) / c` with `c = 3` |
| `impulse_noise` | salt and pepper on a fraction 0.17 of the pixels |
| `glass_blur` | Gaussian blur (sigma 0.7), 2 passes of local pixel swaps (max shift 1), blur again |
| `motion_blur` | ImageMagick's one-sided motion blur: radius 10, sigma 3, angle uniform in [-45, 45] degrees |
| `shear` | affine shear of +-0.4 rad about the centre (sign random) |
| `scale` | zoom out by 0.7 about the centre (inverse map x 1/0.7) |
| `rotate` | rotation by +-0.4 rad about the centre |
| `brightness` | +0.5 on HSV's value channel (for a gray image: `x + 0.5`) |
| `translate` | +-3 pixels along each axis (signs random) |
| `stripe` | columns 0-6 and 21-27 inverted (`1 - x`) |
| `fog` | `x + 3 * plasma fractal` (wibble decay 1.4), rescaled |
| `spatter` | mud spatter (0.65, 0.3, 1, 0.65, 1.5, mud) |
| `dotted_line` | a dotted line across the image |
| `zigzag` | a zigzag line across the image |
| `canny_edges` | the image replaced by its Canny edge map |

Differences from the reference, on purpose: the images stay float (the reference
rounds some corruptions through uint8 PNGs); the motion blur is ImageMagick's
kernel evaluated here (edge pixels repeated), not a call into ImageMagick.

:func:`corrupted` caches a corrupted set as `.npz` with its SHA-256 (verified on
every load); :func:`label_shift_order` orders a test set as a label-shifted
stream (class-sorted, or Dirichlet class proportions per batch).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = [
    "CORRUPTIONS",
    "corrupt",
    "corrupted",
    "label_shift_order",
    "plasma_fractal",
]

Rng = np.random.Generator


def _ndimage():
    try:
        from scipy import ndimage
    except ImportError as e:  # pragma: no cover - exercised without the extra
        raise ImportError("the corruptions need SciPy: pip install -e '.[shift]'") from e
    return ndimage


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """skimage.filters.gaussian's defaults (mode 'nearest', truncate 4) per image."""
    return _ndimage().gaussian_filter(x, sigma=(0, sigma, sigma), mode="nearest", truncate=4.0)


def _warp(x: np.ndarray, transform) -> np.ndarray:
    """`skimage.transform.warp` of every image with the inverse map `transform`
    (bilinear, zeros outside)."""
    from skimage.transform import warp

    if x.shape[0] == 0:
        return x
    out = warp(np.moveaxis(x, 0, -1), inverse_map=transform, order=1, mode="constant", cval=0.0)
    return np.moveaxis(out, -1, 0)


def _centred(**kw):
    """An `AffineTransform(**kw)` that keeps the image centre (13.5, 13.5) fixed."""
    from skimage.transform import AffineTransform

    a = AffineTransform(**kw).params
    t = [13.5 * (1 - a[0, 0] - a[0, 1]), 13.5 * (1 - a[1, 0] - a[1, 1])]
    return AffineTransform(**kw, translation=t)


def _by_sign(x: np.ndarray, rng: Rng, make: Callable[[float], object]) -> np.ndarray:
    """Each image warped by `make(+1)` or `make(-1)` (a fair coin per image)."""
    signs = rng.choice([-1.0, 1.0], size=x.shape[0])
    out = np.empty_like(x)
    for s in (-1.0, 1.0):
        idx = signs == s
        out[idx] = _warp(x[idx], make(s))
    return out


# --------------------------------------------------------------------------- noise


def _shot_noise(x, rng):
    c = 3.0
    return np.clip(rng.poisson(x * c) / c, 0, 1)


def _impulse_noise(x, rng):
    amount = 0.17
    out = x.copy()
    flip = rng.random(x.shape) < amount
    salt = rng.random(x.shape) < 0.5
    out[flip & salt] = 1.0
    out[flip & ~salt] = 0.0
    return out


# --------------------------------------------------------------------------- blur


def _glass_blur(x, rng):
    sigma, delta, iterations = 0.7, 1, 2
    y = np.floor(_blur(x, sigma) * 255).astype(np.uint8).astype(np.float64) / 255
    n = np.arange(x.shape[0])
    for _ in range(iterations):
        for h in range(28 - delta, delta, -1):
            for w in range(28 - delta, delta, -1):
                swap = rng.random(x.shape[0]) < 0.5
                dx, dy = rng.integers(-delta, delta, size=(2, x.shape[0]))
                i = n[swap]
                h2, w2 = h + dy[swap], w + dx[swap]
                a, b = y[i, h, w].copy(), y[i, h2, w2].copy()
                y[i, h, w], y[i, h2, w2] = b, a
    return np.clip(_blur(y, sigma), 0, 1)


def _motion_kernel(radius: float, sigma: float, angle: float):
    """ImageMagick's MotionBlurImage: `2 ceil(radius) + 1` taps of a one-sided
    Gaussian along `angle` (degrees), normalized; integer pixel offsets."""
    width = 2 * int(np.ceil(radius)) + 1
    i = np.arange(width)
    k = np.exp(-(i**2) / (2 * sigma**2))
    k /= k.sum()
    px, py = width * np.sin(np.deg2rad(angle)), width * np.cos(np.deg2rad(angle))
    hyp = np.hypot(px, py)
    ox = np.ceil(i * py / hyp - 0.5).astype(int)
    oy = np.ceil(i * px / hyp - 0.5).astype(int)
    return k, oy, ox


def _motion_blur(x, rng):
    angles = rng.uniform(-45, 45, size=x.shape[0])
    out = np.empty_like(x)
    rows, cols = np.arange(28)[:, None], np.arange(28)[None, :]
    for j, angle in enumerate(angles):
        k, oy, ox = _motion_kernel(10.0, 3.0, angle)
        acc = np.zeros((28, 28))
        for w, dy, dx in zip(k, oy, ox, strict=True):
            acc += w * x[j][np.clip(rows + dy, 0, 27), np.clip(cols + dx, 0, 27)]
        out[j] = acc
    return np.clip(out, 0, 1)


# --------------------------------------------------------------------------- geometry


def _shear(x, rng):
    return _by_sign(x, rng, lambda s: _centred(shear=0.4 * s))


def _scale(x, rng):
    return _warp(x, _centred(scale=(1 / 0.7, 1 / 0.7)))


def _rotate(x, rng):
    return _by_sign(x, rng, lambda s: _centred(rotation=0.4 * s))


def _translate(x, rng):
    from skimage.transform import AffineTransform

    signs = rng.choice([-1, 1], size=(x.shape[0], 2))
    out = np.empty_like(x)
    for sx in (-1, 1):
        for sy in (-1, 1):
            idx = (signs[:, 0] == sx) & (signs[:, 1] == sy)
            out[idx] = _warp(x[idx], AffineTransform(translation=(3 * sx, 3 * sy)))
    return out


# --------------------------------------------------------------------------- colour, texture


def _brightness(x, rng):
    # gray -> HSV has S = 0 and V = x; V + 0.5 clipped -> RGB -> gray is x + 0.5 clipped
    return np.clip(x + 0.5, 0, 1)


def _stripe(x, rng):
    out = x.copy()
    out[:, :, :7] = 1 - out[:, :, :7]
    out[:, :, 21:] = 1 - out[:, :, 21:]
    return out


def plasma_fractal(rng: Rng, n: int, mapsize: int = 256, wibbledecay: float = 1.4) -> np.ndarray:
    """`n` diamond-square height maps `(n, mapsize, mapsize)` in `[0, 1]` (the
    reference's `plasma_fractal`, vectorized over maps)."""
    m = np.zeros((n, mapsize, mapsize))
    step, wibble = mapsize, 100.0

    def wibbled(a):
        return a / 4 + wibble * rng.uniform(-wibble, wibble, a.shape)

    while step >= 2:
        h = step // 2
        corners = m[:, 0:mapsize:step, 0:mapsize:step]
        sq = corners + np.roll(corners, -1, axis=1)
        sq = sq + np.roll(sq, -1, axis=2)
        m[:, h:mapsize:step, h:mapsize:step] = wibbled(sq)
        dr = m[:, h:mapsize:step, h:mapsize:step]
        ul = m[:, 0:mapsize:step, 0:mapsize:step]
        lt = dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=2)
        m[:, 0:mapsize:step, h:mapsize:step] = wibbled(lt)
        tt = dr + np.roll(dr, 1, axis=2) + ul + np.roll(ul, -1, axis=1)
        m[:, h:mapsize:step, 0:mapsize:step] = wibbled(tt)
        step //= 2
        wibble /= wibbledecay
    m -= m.min(axis=(1, 2), keepdims=True)
    return m / m.max(axis=(1, 2), keepdims=True)


def _fog(x, rng):
    strength, decay = 3.0, 1.4
    out = np.empty_like(x)
    for s in range(0, x.shape[0], 256):  # 256 maps of 256^2 at a time
        xs = x[s : s + 256]
        fog = plasma_fractal(rng, xs.shape[0], wibbledecay=decay)[:, :28, :28]
        peak = xs.max(axis=(1, 2), keepdims=True)
        out[s : s + 256] = np.clip((xs + strength * fog) * peak / (peak + strength), 0, 1)
    return out


def _spatter(x, rng):
    loc, scale, sigma, threshold, sigma_mask, _mud = 0.65, 0.3, 1.0, 0.65, 1.5, 1
    liquid = _blur(rng.normal(loc, scale, x.shape), sigma)
    liquid[liquid < threshold] = 0
    m = _blur((liquid > threshold).astype(np.float64), sigma_mask)
    m[m < 0.8] = 0
    return np.clip(x * (1 - m) + 63 / 255 * m, 0, 1)


# --------------------------------------------------------------------------- lines, edges


def _line(c0: float, r0: float, c1: float, r1: float) -> np.ndarray:
    """The reference's anti-aliased line from (column c0, row r0) to (c1, r1)."""
    if c1 == c0:
        return np.zeros((28, 28))
    cc, rr = np.meshgrid(np.arange(28.0), np.arange(28.0), sparse=True)
    slope = (r1 - r0) / (c1 - c0)
    dist = np.clip(np.abs(rr - (slope * (cc - c0) + r0)), 0, 2.3 - 1e-10)
    line = np.clip(np.log(1 - dist / 2.3) + 1, 0, 1)
    line[:, : int(np.floor(c0))] = 0
    line[:, int(np.ceil(c1)) :] = 0
    return line


def _dotted_line(x, rng):
    out = np.empty_like(x)
    dots = (np.arange(28) // 2) % 2 == 1  # columns 2-3, 6-7, ... are drawn
    for j in range(x.shape[0]):
        r0, r1 = rng.integers(0, 27, size=2)
        out[j] = np.clip(x[j] + _line(0, r0, 27, r1) * dots, 0, 1)
    return out


def _zigzag_points(r0: float, r1: float) -> np.ndarray:
    a = b = 2.0
    c0, c1 = 2, 25
    theta = np.arctan((r1 - r0) / (c1 - c0))
    d = (c1 - c0) / np.cos(theta)
    pts = [(0.0, 0.0)]
    r_i = 0.0
    for i in range(int((d - a) // (2 * a)) + 1):
        r_i = (-1) ** i * b
        pts.append(((2 * i + 1) * a, r_i))
    max_c = 2 * a * (d // (2 * a))
    if d != max_c:
        pts.append((d, r_i / (2 * (d - max_c))))
    p = np.array(pts).T
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    cs, rs = rot @ p
    return np.stack([cs + c0, rs + r0])


def _zigzag(x, rng):
    out = np.empty_like(x)
    for j in range(x.shape[0]):
        r0 = int(rng.integers(0, 27))
        r1 = r0 + int(rng.integers(-5, 5))
        cs, rs = _zigzag_points(r0, r1)
        y = x[j].astype(np.float64)
        for i in range(1, cs.size):
            y = np.clip(y + _line(cs[i - 1], rs[i - 1], cs[i], rs[i]), 0, 1)
        out[j] = y
    return out


def _canny_edges(x, rng):
    from skimage.feature import canny

    return np.stack([canny(img).astype(np.float64) for img in x]) if x.size else x


CORRUPTIONS: dict[str, Callable[[np.ndarray, Rng], np.ndarray]] = {
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "glass_blur": _glass_blur,
    "motion_blur": _motion_blur,
    "shear": _shear,
    "scale": _scale,
    "rotate": _rotate,
    "brightness": _brightness,
    "translate": _translate,
    "stripe": _stripe,
    "fog": _fog,
    "spatter": _spatter,
    "dotted_line": _dotted_line,
    "zigzag": _zigzag,
    "canny_edges": _canny_edges,
}


def corrupt(images: np.ndarray, name: str, seed: int = 0) -> np.ndarray:
    """`images` (`(N, 28, 28)` in `[0, 1]`) corrupted by `name`: float32, same
    shape, values in `[0, 1]`, the same for the same `seed`.

    Raises:
      ValueError: an unknown corruption or images that are not `(N, 28, 28)`.
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"corruption must be one of {sorted(CORRUPTIONS)}, got {name!r}")
    x = np.asarray(images, np.float64)
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise ValueError(f"images must have shape (N, 28, 28), got {x.shape}")
    rng = np.random.default_rng([seed, list(CORRUPTIONS).index(name)])
    return np.clip(CORRUPTIONS[name](x, rng), 0, 1).astype(np.float32)


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def corrupted(
    images: np.ndarray,
    name: str,
    *,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    tag: str = "",
) -> np.ndarray:
    """:func:`corrupt`, cached in `cache_dir` (`None`: not cached).

    The file `<tag>-<name>-seed<seed>-<input hash>.npz` holds the corrupted set
    and its SHA-256; a file whose content does not match its checksum is
    regenerated (and rewritten).
    """
    if cache_dir is None:
        return corrupt(images, name, seed)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    key = _digest(np.asarray(images, np.float32))[:16]
    path = cache / f"{tag or 'images'}-{name}-seed{seed}-{key}.npz"
    if path.exists():
        with np.load(path) as f:
            x, digest = f["images"], str(f["sha256"])
        if _digest(x) == digest:
            return x
    x = corrupt(images, name, seed)
    np.savez(path, images=x, sha256=np.array(_digest(x)))
    manifest = cache / "manifest.json"
    entries = json.loads(manifest.read_text()) if manifest.exists() else {}
    entries[path.name] = _digest(x)
    manifest.write_text(json.dumps(entries, indent=1, sort_keys=True))
    return x


def label_shift_order(
    labels: np.ndarray,
    batch_size: int,
    *,
    kind: str = "sorted",
    alpha: float = 0.1,
    seed: int = 0,
) -> np.ndarray:
    """Indices of `labels` as a label-shifted stream, `(batches, batch_size)`.

    `kind="sorted"`: class by class (classes in random order, examples shuffled
    within a class), so most batches hold one class. `kind="dirichlet"`: each
    batch draws class proportions `p ~ Dirichlet(alpha)` (over the classes with
    examples left) and its examples from them without replacement; small
    `alpha` gives batches of one or two classes, large `alpha` an i.i.d.
    stream. The remainder that does not fill a batch is dropped.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
    if kind == "sorted":
        order = np.concatenate([pools[c] for c in rng.permutation(classes)])
    elif kind == "dirichlet":
        order = []
        while sum(len(p) for p in pools.values()) >= batch_size:
            live = [c for c in classes if pools[c]]
            p = rng.dirichlet(np.full(len(live), alpha))
            for c in rng.choice(live, size=batch_size, p=p):
                if not pools[c]:  # exhausted within this batch: take from the largest pool
                    c = max(live, key=lambda k: len(pools[k]))
                order.append(pools[c].pop())
        order = np.asarray(order)
    else:
        raise ValueError(f"kind must be 'sorted' or 'dirichlet', got {kind!r}")
    n = order.size // batch_size
    return np.asarray(order[: n * batch_size]).reshape(n, batch_size)
