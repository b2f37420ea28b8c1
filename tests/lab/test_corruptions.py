"""The MNIST-C corruptions: shape, range, determinism, and the property each is named after.

Run on real MNIST test digits (``BNJAX_DATA_DIR``), which keep a 4-pixel empty border
(so shifts and rotations lose no mass to the edges).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("skimage", reason="the corruptions need the shift extra (scikit-image)")

from bnjax.experiments import corruptions as C  # noqa: E402
from bnjax.experiments.data import load_dataset  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    try:
        return load_dataset("mnist").test_images[:64].astype(np.float64)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"MNIST not found ({e}): set BNJAX_DATA_DIR")


RANDOM = {
    "shot_noise",
    "impulse_noise",
    "glass_blur",
    "motion_blur",
    "shear",
    "rotate",
    "translate",
    "fog",
    "spatter",
    "dotted_line",
    "zigzag",
}


@pytest.mark.parametrize("name", list(C.CORRUPTIONS))
def test_shape_range_dtype_and_determinism(name, digits):
    a = C.corrupt(digits, name, seed=0)
    assert a.shape == digits.shape and a.dtype == np.float32
    assert a.min() >= 0 and a.max() <= 1
    np.testing.assert_array_equal(a, C.corrupt(digits, name, seed=0))
    assert not np.array_equal(a, digits)
    if name in RANDOM:
        assert not np.array_equal(a, C.corrupt(digits, name, seed=1))
    else:
        np.testing.assert_array_equal(a, C.corrupt(digits, name, seed=1))


def mass(x):
    return x.sum(axis=(1, 2))


def test_shot_noise_is_poisson_with_c_3(digits):
    from scipy import stats

    a = C.corrupt(digits, "shot_noise").astype(np.float64)
    np.testing.assert_allclose(a * 3, np.round(a * 3), atol=1e-5)  # multiples of 1/3
    k = np.arange(40)[:, None]  # E[min(Poisson(3x) / 3, 1)], pixel by pixel
    expected = (np.minimum(k / 3, 1) * stats.poisson.pmf(k, 3 * digits.reshape(1, -1))).sum(0)
    assert abs(a.mean() - expected.mean()) < 0.003


def test_impulse_noise_flips_17_percent_to_salt_or_pepper(digits):
    a = C.corrupt(digits, "impulse_noise")
    changed = (a != digits.astype(np.float32)) & ((a == 0) | (a == 1))
    expected = 0.17 * np.mean(0.5 * (digits != 1) + 0.5 * (digits != 0))
    assert abs(changed.mean() - expected) < 0.01


@pytest.mark.parametrize("name", ["rotate", "shear", "translate", "glass_blur", "motion_blur"])
def test_mass_preserving_corruptions_keep_the_mass(name, digits):
    """Rotations, shears, shifts and blurs move the ink, they do not add or remove it
    (within interpolation error)."""
    ratio = mass(C.corrupt(digits, name)) / mass(digits)
    assert np.all(np.abs(ratio - 1) < 0.08), (name, ratio.min(), ratio.max())


def test_rotate_and_shear_keep_the_centre_and_move_the_ink(digits):
    rows = np.arange(28)[None, :, None]

    def centroid(x):
        return (x * rows).sum(axis=(1, 2)) / mass(x)

    for name in ("rotate", "shear"):
        a = C.corrupt(digits, name).astype(np.float64)
        assert np.all(np.abs(centroid(a) - centroid(digits)) < 2.0)
        assert np.mean(np.abs(a - digits)) > 0.05


def test_scale_shrinks_by_0_7(digits):
    """Zooming out by 0.7 scales the area (the ink) by 0.49."""
    ratio = mass(C.corrupt(digits, "scale")) / mass(digits)
    np.testing.assert_allclose(ratio, 0.49, atol=0.06)
    assert abs(ratio.mean() - 0.49) < 0.02


def test_translate_is_a_shift_of_3_pixels_per_axis(digits):
    a = C.corrupt(digits, "translate")
    def shifted(x, dy, dx):  # zeros shifted in
        out = np.zeros_like(x)
        rows, cols = slice(max(dy, 0), 28 + min(dy, 0)), slice(max(dx, 0), 28 + min(dx, 0))
        src_r, src_c = slice(max(-dy, 0), 28 + min(-dy, 0)), slice(max(-dx, 0), 28 + min(-dx, 0))
        out[:, rows, cols] = x[:, src_r, src_c]
        return out

    shifts = [shifted(digits, sy, sx) for sy in (-3, 3) for sx in (-3, 3)]
    for i in range(digits.shape[0]):
        assert min(np.max(np.abs(a[i] - s[i])) for s in shifts) < 1e-6


def test_brightness_is_the_hsv_value_shift(digits):
    from skimage import color

    ref = []
    for img in digits[:8]:
        hsv = color.rgb2hsv(color.gray2rgb(img))
        hsv[..., 2] = np.clip(hsv[..., 2] + 0.5, 0, 1)
        ref.append(color.rgb2gray(color.hsv2rgb(hsv)))
    np.testing.assert_allclose(C.corrupt(digits[:8], "brightness"), np.stack(ref), atol=1e-6)


def test_stripe_inverts_its_columns(digits):
    a = C.corrupt(digits, "stripe")
    x = digits.astype(np.float32)
    np.testing.assert_allclose(a[:, :, :7], 1 - x[:, :, :7], atol=1e-6)
    np.testing.assert_allclose(a[:, :, 21:], 1 - x[:, :, 21:], atol=1e-6)
    np.testing.assert_array_equal(a[:, :, 7:21], x[:, :, 7:21])
    np.testing.assert_allclose(C.corrupt(a, "stripe"), x, atol=1e-6)  # an involution


def test_fog_brightens_the_background(digits):
    a = C.corrupt(digits, "fog")
    background = digits == 0
    assert a[background].mean() > 0.2
    peak = digits.max(axis=(1, 2), keepdims=True)
    assert np.all(a >= (digits * peak / (peak + 3) - 1e-6))


def test_spatter_blends_towards_mud(digits):
    a = C.corrupt(digits, "spatter").astype(np.float64)
    mud = 63 / 255
    hit = np.abs(a - digits) > 1e-6
    assert 0.001 < hit.mean() < 0.5
    assert np.all(np.abs(a[hit] - mud) <= 0.2 * np.abs(digits[hit] - mud) + 1e-6)


def test_dotted_line_only_adds_ink_in_its_dot_columns(digits):
    a = C.corrupt(digits, "dotted_line")
    assert np.all(a >= digits.astype(np.float32) - 1e-6)
    gaps = (np.arange(28) // 2) % 2 == 0
    np.testing.assert_array_equal(a[:, :, gaps], digits.astype(np.float32)[:, :, gaps])
    assert np.all(mass(a) > mass(digits))


def test_zigzag_adds_a_line(digits):
    a = C.corrupt(digits, "zigzag")
    assert np.all(a >= digits.astype(np.float32) - 1e-6)
    assert np.all(mass(a) - mass(digits) > 3)


def test_canny_edges_are_binary_and_on_the_digit(digits):
    from scipy import ndimage

    a = C.corrupt(digits, "canny_edges")
    assert set(np.unique(a)) <= {0.0, 1.0}
    near = ndimage.binary_dilation(digits > 0.1, iterations=2)
    assert np.all(near[a == 1])


def test_plasma_fractal_range():
    m = C.plasma_fractal(np.random.default_rng(0), 3, mapsize=32)
    assert m.shape == (3, 32, 32)
    np.testing.assert_allclose(m.min(axis=(1, 2)), 0)
    np.testing.assert_allclose(m.max(axis=(1, 2)), 1)


def test_cache_and_checksum(digits, tmp_path, monkeypatch):
    a = C.corrupted(digits, "stripe", cache_dir=tmp_path, tag="mnist")
    (path,) = tmp_path.glob("mnist-stripe-seed0-*.npz")
    calls = []
    monkeypatch.setattr(C, "corrupt", lambda *a, **k: calls.append(1) or np.zeros(1))
    np.testing.assert_array_equal(C.corrupted(digits, "stripe", cache_dir=tmp_path, tag="mnist"), a)
    assert not calls  # read from the cache
    with np.load(path) as f:
        np.savez(path, images=f["images"] + 1, sha256=f["sha256"])  # tampered
    C.corrupted(digits, "stripe", cache_dir=tmp_path, tag="mnist")
    assert calls  # the checksum did not match: regenerated


def test_label_shift_orders():
    labels = np.repeat(np.arange(10), 50)
    s = C.label_shift_order(labels, 25, kind="sorted")
    assert s.shape == (20, 25) and len(np.unique(s)) == s.size
    assert np.mean([len(np.unique(labels[b])) == 1 for b in s]) == 1.0
    d = C.label_shift_order(labels, 25, kind="dirichlet", alpha=0.1)
    assert len(np.unique(d)) == d.size
    few = np.mean([len(np.unique(labels[b])) for b in d])
    iid = C.label_shift_order(labels, 25, kind="dirichlet", alpha=100.0)
    many = np.mean([len(np.unique(labels[b])) for b in iid])
    assert few < 4 < 8 < many
    with pytest.raises(ValueError, match="kind must be"):
        C.label_shift_order(labels, 25, kind="shuffled")


def test_bad_arguments():
    with pytest.raises(ValueError, match="corruption must be one of"):
        C.corrupt(np.zeros((1, 28, 28)), "blur")
    with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
        C.corrupt(np.zeros((1, 784)), "stripe")
