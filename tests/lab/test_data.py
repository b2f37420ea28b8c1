"""Tests for bnjax.experiments.data: the MNIST / Fashion-MNIST IDX loader.

Real-data tests read the folder named by ``BNJAX_DATA_DIR`` (a root holding
``mnist/`` and ``fashion-mnist/``) and are skipped when it is unset. Download
tests use a local ``http.server`` on 127.0.0.1; the network is never touched
(``bnjax.experiments.data._urlopen`` is guarded to refuse any other host).
"""

from __future__ import annotations

import functools
import gzip
import os
import shutil
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from bnjax.experiments import data

# Captured at import: the autouse fixture below removes it from the environment.
REAL_DATA_DIR = os.environ.get("BNJAX_DATA_DIR")

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No env-configured data, a private cache, and no network except 127.0.0.1."""
    monkeypatch.delenv("BNJAX_DATA_DIR", raising=False)
    monkeypatch.delenv("BNJAX_DATA_MIRROR", raising=False)
    cache_home = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))

    real_urlopen = data._urlopen

    def local_only(url: str, timeout: float):
        host = urllib.parse.urlsplit(url).hostname
        if host != "127.0.0.1":
            raise AssertionError(f"test tried to reach the network: {url}")
        return real_urlopen(url, timeout)

    monkeypatch.setattr(data, "_urlopen", local_only)
    return cache_home / "bnjax"


@pytest.fixture
def real_root() -> Path:
    if not REAL_DATA_DIR or not Path(REAL_DATA_DIR).is_dir():
        pytest.skip("BNJAX_DATA_DIR is not set (point it at a folder with mnist/, fashion-mnist/)")
    return Path(REAL_DATA_DIR)


@pytest.fixture
def mnist_test_copy(real_root: Path, tmp_path: Path) -> Path:
    """A data root ``tmp/root`` whose ``mnist/`` holds copies of the two test-split .gz files."""
    root = tmp_path / "root"
    (root / "mnist").mkdir(parents=True)
    for name in TEST_FILES:
        shutil.copyfile(real_root / "mnist" / f"{name}.gz", root / "mnist" / f"{name}.gz")
    return root


@pytest.fixture
def serve() -> Iterator[Callable[[Path], str]]:
    """``serve(folder) -> base_url``: an HTTP server on 127.0.0.1 for ``folder``."""
    servers: list[ThreadingHTTPServer] = []

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    def start(folder: Path) -> str:
        handler = functools.partial(QuietHandler, directory=str(folder))
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _flip_byte(path: Path, offset: int) -> None:
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0xFF
    path.write_bytes(bytes(blob))


def _files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --------------------------------------------------------------------------- real data


@pytest.mark.parametrize(
    ("split", "n", "counts"),
    [("train", 60000, MNIST_TRAIN_COUNTS), ("test", 10000, MNIST_TEST_COUNTS)],
)
def test_mnist_shapes_dtypes_counts(real_root: Path, split: str, n: int, counts: list[int]):
    images, labels = data.load_mnist(split, data_dir=real_root)
    assert images.shape == (n, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == counts
    assert images.max() == 255 and images.min() == 0


@pytest.mark.parametrize(("split", "n"), [("train", 60000), ("test", 10000)])
def test_fashion_mnist_shapes_dtypes_counts(real_root: Path, split: str, n: int):
    images, labels = data.load_mnist(split, dataset="fashion-mnist", data_dir=real_root)
    assert images.shape == (n, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [n // 10] * 10


def test_datasets_differ(real_root: Path):
    mnist, _ = data.load_mnist("test", data_dir=real_root)
    fashion, _ = data.load_mnist("test", dataset="fashion_mnist", data_dir=real_root)
    assert not np.array_equal(mnist, fashion)


def test_in_process_cache_and_speed(real_root: Path):
    data._decode_cached.cache_clear()
    t0 = time.perf_counter()
    images, labels = data.load_mnist("train", data_dir=real_root)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    images2, labels2 = data.load_mnist("train", data_dir=real_root)
    second = time.perf_counter() - t0
    assert images2 is images and labels2 is labels
    assert not images.flags.writeable and not labels.flags.writeable
    # Target is < 1 s (about 0.2 s on a dev box); generous bound for loaded CI machines.
    assert first < 5.0
    assert second < 0.05


def test_load_dataset(real_root: Path):
    ds = data.load_dataset("mnist", data_dir=real_root, flatten=True)
    assert isinstance(ds, data.Dataset)
    assert ds.train_images.shape == (60000, 784) and ds.test_images.shape == (10000, 784)
    assert ds.train_images.dtype == np.float32 and ds.test_images.dtype == np.float32
    assert ds.train_labels.dtype == np.int32 and ds.test_labels.shape == (10000,)
    assert ds.train_images.min() == 0.0 and ds.train_images.max() == 1.0
    raw, labels = data.load_mnist("test", data_dir=real_root)
    np.testing.assert_allclose(ds.test_images, raw.reshape(10000, -1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.test_labels, labels)
    assert ds.test_images.flags.writeable


def test_env_var_resolution(real_root: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("BNJAX_DATA_DIR", str(real_root))
    images, labels = data.load_mnist("test")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)


def test_cache_resolution(real_root: Path, isolated_env: Path):
    (isolated_env / "mnist").mkdir(parents=True)
    for name in TEST_FILES:
        shutil.copyfile(real_root / "mnist" / f"{name}.gz", isolated_env / "mnist" / f"{name}.gz")
    assert data.default_cache_dir() == isolated_env
    images, _ = data.load_mnist("test")
    assert images.shape == (10000, 28, 28)


def test_data_dir_searched_before_env(
    real_root: Path, mnist_test_copy: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("BNJAX_DATA_DIR", str(real_root))
    _flip_byte(mnist_test_copy / "mnist" / "t10k-labels-idx1-ubyte.gz", 100)
    # The explicit (corrupt) copy wins and is rejected, not silently skipped.
    with pytest.raises(data.DataError, match=str(mnist_test_copy)):
        data.load_mnist("test", data_dir=mnist_test_copy)


# --------------------------------------------------------------------------- file variants


def test_raw_uncompressed_files(real_root: Path, tmp_path: Path):
    folder = tmp_path / "raw" / "mnist"
    folder.mkdir(parents=True)
    for name in TEST_FILES:
        raw = gzip.decompress((real_root / "mnist" / f"{name}.gz").read_bytes())
        (folder / name).write_bytes(raw)
    images, labels = data.load_mnist("test", data_dir=tmp_path / "raw")
    ref_images, ref_labels = data.load_mnist("test", data_dir=real_root)
    np.testing.assert_array_equal(images, ref_images)
    np.testing.assert_array_equal(labels, ref_labels)


def test_recompressed_gz_accepted_by_content(real_root: Path, mnist_test_copy: Path):
    path = mnist_test_copy / "mnist" / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()), mtime=0))
    _, labels = data.load_mnist("test", data_dir=mnist_test_copy)
    assert np.bincount(labels).tolist() == MNIST_TEST_COUNTS


# --------------------------------------------------------------------------- corrupt files


def test_gz_checksum_mismatch(mnist_test_copy: Path):
    path = mnist_test_copy / "mnist" / "t10k-images-idx3-ubyte.gz"
    _flip_byte(path, path.stat().st_size // 2)
    with pytest.raises(data.DataError, match="checksum mismatch") as info:
        data.load_mnist("test", data_dir=mnist_test_copy)
    assert str(path) in str(info.value)


def test_gz_valid_stream_wrong_content(mnist_test_copy: Path):
    path = mnist_test_copy / "mnist" / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[8] = (raw[8] + 1) % 10  # a wrong but in-range label, well-formed file
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(data.DataError, match="checksum mismatch"):
        data.load_mnist("test", data_dir=mnist_test_copy)


def test_raw_checksum_mismatch(real_root: Path, tmp_path: Path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    shutil.copyfile(
        real_root / "mnist" / "t10k-images-idx3-ubyte.gz", folder / "t10k-images-idx3-ubyte.gz"
    )
    raw = folder / "t10k-labels-idx1-ubyte"
    raw.write_bytes(gzip.decompress((real_root / "mnist" / f"{raw.name}.gz").read_bytes()))
    _flip_byte(raw, 5000)
    with pytest.raises(data.DataError, match="checksum mismatch") as info:
        data.load_mnist("test", data_dir=tmp_path)
    assert str(raw) in str(info.value)


def test_truncated_gz(mnist_test_copy: Path):
    path = mnist_test_copy / "mnist" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:1_000_000])
    with pytest.raises(data.DataError, match="truncated") as info:
        data.load_mnist("test", data_dir=mnist_test_copy)
    assert str(path) in str(info.value)


def test_truncated_raw(real_root: Path, tmp_path: Path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in TEST_FILES:
        raw = gzip.decompress((real_root / "mnist" / f"{name}.gz").read_bytes())
        (folder / name).write_bytes(raw[:-784] if "images" in name else raw)
    with pytest.raises(data.DataError, match=r"7839232 bytes, expected 7840016 \(truncated\)"):
        data.load_mnist("test", data_dir=tmp_path)


def test_idx_header_validation():
    spec = data._FILES["mnist"]["t10k-labels-idx1-ubyte"]
    good = struct.pack(">II", 2049, 10000) + bytes(10000)
    data._check_header("f", good, spec)
    with pytest.raises(data.DataError, match="magic number is 2051, expected 2049"):
        data._check_header("f", struct.pack(">II", 2051, 10000) + bytes(10000), spec)
    with pytest.raises(data.DataError, match="says 9999 items"):
        data._check_header("f", struct.pack(">II", 2049, 9999) + bytes(10000), spec)
    with pytest.raises(data.DataError, match="header implies"):
        data._check_header("f", good[:-1], spec)
    img = data._FILES["mnist"]["t10k-images-idx3-ubyte"]
    bad = struct.pack(">IIII", 2051, 10000, 32, 32) + bytes(10000 * 784)
    with pytest.raises(data.DataError, match="32x32, expected 28x28"):
        data._check_header("f", bad, img)


# --------------------------------------------------------------------------- missing files


def test_missing_files_message(tmp_path: Path, isolated_env: Path):
    with pytest.raises(data.DataError) as info:
        data.load_mnist("test", data_dir=tmp_path / "empty")
    msg = str(info.value)
    for name in TEST_FILES:
        assert name in msg
    assert "train-images" not in msg  # only the requested split
    assert str(tmp_path / "empty" / "mnist") in msg
    assert str(isolated_env / "mnist") in msg  # the cache was searched too
    # Remedy 1: point at a folder with the files; remedy 2: allow the download.
    assert "--data-dir" in msg and "BNJAX_DATA_DIR" in msg
    assert "download=True" in msg
    assert not isolated_env.exists()  # nothing was created or downloaded


def test_load_dataset_missing_lists_all_files(tmp_path: Path):
    with pytest.raises(data.DataError) as info:
        data.load_dataset("fashion-mnist", data_dir=tmp_path)
    msg = str(info.value)
    assert "fashion-mnist" in msg
    assert all(n in msg for n in data._FILES["fashion-mnist"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        data.load_mnist("valid")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dataset"):
        data.load_mnist("test", dataset="cifar10")  # type: ignore[arg-type]


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert data.default_cache_dir() == tmp_path / "x" / "bnjax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.default_cache_dir() == tmp_path / "home" / ".cache" / "bnjax"


# --------------------------------------------------------------------------- download


def test_download_from_local_mirror(
    real_root: Path, mnist_test_copy: Path, isolated_env: Path, serve: Callable[[Path], str]
):
    url = serve(mnist_test_copy / "mnist")
    with pytest.raises(data.DataError):  # download is opt-in
        data.load_mnist("test", mirrors=[url])
    images, labels = data.load_mnist("test", download=True, mirrors=[url])
    assert _files_in(isolated_env / "mnist") == sorted(f"{n}.gz" for n in TEST_FILES)
    ref_images, ref_labels = data.load_mnist("test", data_dir=real_root)
    np.testing.assert_array_equal(images, ref_images)
    np.testing.assert_array_equal(labels, ref_labels)
    # Now cached: found without download.
    images2, _ = data.load_mnist("test")
    np.testing.assert_array_equal(images2, ref_images)


def test_download_mirror_env_var_with_dataset_placeholder(
    real_root: Path,
    tmp_path: Path,
    isolated_env: Path,
    serve: Callable[[Path], str],
    monkeypatch: pytest.MonkeyPatch,
):
    site = tmp_path / "site"
    (site / "fashion-mnist").mkdir(parents=True)
    for name in TEST_FILES:
        src = real_root / "fashion-mnist" / f"{name}.gz"
        shutil.copyfile(src, site / "fashion-mnist" / f"{name}.gz")
    monkeypatch.setenv("BNJAX_DATA_MIRROR", serve(site) + "{dataset}/")
    _, labels = data.load_mnist("test", dataset="fashion-mnist", download=True)
    assert np.bincount(labels).tolist() == [1000] * 10
    assert _files_in(isolated_env / "fashion-mnist") == sorted(f"{n}.gz" for n in TEST_FILES)


def test_download_corrupt_mirror_leaves_nothing(
    mnist_test_copy: Path, tmp_path: Path, isolated_env: Path, serve: Callable[[Path], str]
):
    bad = tmp_path / "bad"
    shutil.copytree(mnist_test_copy / "mnist", bad)
    _flip_byte(bad / "t10k-images-idx3-ubyte.gz", 12345)
    _flip_byte(bad / "t10k-labels-idx1-ubyte.gz", 1000)
    with pytest.raises(data.DataError, match="could not download a valid") as info:
        data.load_mnist("test", download=True, mirrors=[serve(bad)])
    assert "checksum mismatch" in str(info.value)
    assert not (isolated_env / "mnist").exists()  # no partial or corrupt file (or folder) kept


def test_download_falls_back_to_next_mirror(
    real_root: Path,
    mnist_test_copy: Path,
    tmp_path: Path,
    isolated_env: Path,
    serve: Callable[[Path], str],
):
    bad = tmp_path / "bad"
    shutil.copytree(mnist_test_copy / "mnist", bad)
    (bad / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not a gzip file")
    (bad / "t10k-images-idx3-ubyte.gz").unlink()  # 404
    mirrors = [serve(bad), serve(mnist_test_copy / "mnist")]
    _, labels = data.load_mnist("test", download=True, mirrors=mirrors)
    assert np.bincount(labels).tolist() == MNIST_TEST_COUNTS
    assert _files_in(isolated_env / "mnist") == sorted(f"{n}.gz" for n in TEST_FILES)


def test_download_all_mirrors_fail_reports_each(tmp_path: Path, serve: Callable[[Path], str]):
    (tmp_path / "empty").mkdir()
    url = serve(tmp_path / "empty")
    with pytest.raises(data.DataError, match="404") as info:
        data.load_mnist("test", download=True, mirrors=[url, "ftp://example.invalid/"])
    assert "only http(s) URLs" in str(info.value)


def test_download_function_keeps_valid_files(
    real_root: Path, tmp_path: Path, serve: Callable[[Path], str]
):
    dest = tmp_path / "dest"
    (dest / "mnist").mkdir(parents=True)
    # Train files already present (as symlinks to the real data), test files downloaded.
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (dest / "mnist" / f"{name}.gz").symlink_to(real_root / "mnist" / f"{name}.gz")
    site = tmp_path / "site"
    site.mkdir()
    for name in TEST_FILES:
        shutil.copyfile(real_root / "mnist" / f"{name}.gz", site / f"{name}.gz")
    folder = data.download("mnist", dest_dir=dest, mirrors=[serve(site)])
    assert folder == dest / "mnist"
    assert len(_files_in(folder)) == 4
    ds = data.load_dataset("mnist", data_dir=dest)
    assert ds.train_images.shape == (60000, 28, 28)
