"""MNIST and Fashion-MNIST from the original IDX files, checksum-verified.

The experiments of the paper (Figure 1) train on MNIST; bnjax also supports
Fashion-MNIST, which has the same file layout. This module reads the original
files (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
`t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`), either gzip-compressed
(`<name>.gz`) or raw (`<name>`). Only `numpy` and the standard library are
used; importing this module does not import JAX.

Where the files are looked for
------------------------------
Each requested file is looked up, in this order, in `<root>/<dataset>/` for
the roots

1. the `data_dir` argument (the experiments' `--data-dir`),
2. the environment variable `BNJAX_DATA_DIR`,
3. the user cache :func:`default_cache_dir` (`$XDG_CACHE_HOME/bnjax` or
   `~/.cache/bnjax`),

where `<dataset>` is `mnist` or `fashion-mnist`. A root therefore looks
like:

```python
<root>/mnist/train-images-idx3-ubyte.gz       (or the raw file, no .gz)
<root>/mnist/train-labels-idx1-ubyte.gz
<root>/mnist/t10k-images-idx3-ubyte.gz
<root>/mnist/t10k-labels-idx1-ubyte.gz
<root>/fashion-mnist/...                      (the same four names)
```

4. Only if `download=True`: files found nowhere are downloaded from public
   mirrors into the cache. Each download goes to a temporary file, is checked
   against the published MD5 and only then renamed into place, so a failed or
   corrupt download never leaves a file behind. The mirrors can be replaced
   with the `mirrors` argument or the environment variable
   `BNJAX_DATA_MIRROR` (one or more base URLs separated by commas or
   whitespace; `{dataset}` in a URL is replaced by the dataset name).

Without `download=True` nothing touches the network; missing files raise a
:class:`DataError` that names the files, the folders searched and the two ways
to provide them.

Verification
------------
Every file is verified before use, and a file that fails is never used:
a `.gz` must match the published MD5 of the `.gz` (or, if it was
re-compressed, its decompressed content must match the MD5 of the raw file);
a raw file must have the exact size and MD5 of the original. The IDX header is
validated too (magic 2051/2049, sample count, 28x28, file length). Any failure
raises :class:`DataError` naming the file and the problem.

Decoded arrays are cached in-process, keyed by path, size and mtime, so
repeated loads are free. The returned `uint8` arrays are read-only views of
that cache; copy them (`np.array(images)`) before modifying them in place.

Example:

```python
>>> from bnjax.experiments.data import load_mnist, load_dataset
>>> images, labels = load_mnist("train")          # doctest: +SKIP
>>> images.shape, images.dtype, labels.shape      # doctest: +SKIP
((60000, 28, 28), dtype('uint8'), (60000,))
>>> ds = load_dataset("fashion-mnist", flatten=True)  # doctest: +SKIP
>>> ds.train_images.shape, ds.train_images.dtype  # doctest: +SKIP
((60000, 784), dtype('float32'))
```
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import logging
import os
import re
import struct
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, NamedTuple

import numpy as np

__all__ = [
    "DATASETS",
    "DEFAULT_MIRRORS",
    "DataError",
    "Dataset",
    "default_cache_dir",
    "download",
    "load_dataset",
    "load_mnist",
]

logger = logging.getLogger(__name__)

DatasetName = Literal["mnist", "fashion-mnist"]
Split = Literal["train", "test"]
PathLike = str | os.PathLike[str]

#: Names of the supported datasets (also the sub-folder names under a data root).
DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist")

#: Default download mirrors (base URLs; the file name is appended).
DEFAULT_MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}

ENV_DATA_DIR = "BNJAX_DATA_DIR"
ENV_MIRROR = "BNJAX_DATA_MIRROR"

_ROWS = _COLS = 28
_IMAGE_MAGIC = 2051
_LABEL_MAGIC = 2049
_NUM_CLASSES = 10
_DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK = 1 << 20


class DataError(Exception):
    """A data file is missing, corrupt, truncated or could not be downloaded."""


class Dataset(NamedTuple):
    """Train and test splits, ready for training.

    Attributes:
      train_images: float32 in `[0, 1]`, shape `(60000, 28, 28)` or `(60000, 784)`.
      train_labels: int32 class ids `0..9`, shape `(60000,)`.
      test_images: float32 in `[0, 1]`, shape `(10000, 28, 28)` or `(10000, 784)`.
      test_labels: int32 class ids `0..9`, shape `(10000,)`.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


@dataclass(frozen=True)
class _FileSpec:
    name: str  # raw file name; the compressed file is name + ".gz"
    kind: Literal["images", "labels"]
    count: int
    gz_size: int
    gz_md5: str
    raw_md5: str

    @property
    def header_size(self) -> int:
        return 16 if self.kind == "images" else 8

    @property
    def raw_size(self) -> int:
        per_item = _ROWS * _COLS if self.kind == "images" else 1
        return self.header_size + self.count * per_item

    @property
    def magic(self) -> int:
        return _IMAGE_MAGIC if self.kind == "images" else _LABEL_MAGIC


def _specs(table: dict[str, tuple[int, str, str]]) -> dict[str, _FileSpec]:
    out = {}
    for name, (gz_size, gz_md5, raw_md5) in table.items():
        kind: Literal["images", "labels"] = "images" if "images" in name else "labels"
        count = 60000 if name.startswith("train") else 10000
        out[name] = _FileSpec(name, kind, count, gz_size, gz_md5, raw_md5)
    return out


# name: (.gz bytes, .gz MD5, raw MD5), as published with the datasets (the MNIST site and
# torchvision; Zalando's README) and listed in the shared data README.
_FILES: dict[str, dict[str, _FileSpec]] = {
    "mnist": _specs(
        {
            "train-images-idx3-ubyte": (
                9912422,
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "6bbc9ace898e44ae57da46a324031adb",
            ),
            "train-labels-idx1-ubyte": (
                28881,
                "d53e105ee54ea40749a09fcbcd1e9432",
                "a25bea736e30d166cdddb491f175f624",
            ),
            "t10k-images-idx3-ubyte": (
                1648877,
                "9fb629c4189551a2d022fa330f9573f3",
                "2646ac647ad5339dbf082846283269ea",
            ),
            "t10k-labels-idx1-ubyte": (
                4542,
                "ec29112dd5afa0611ce80d1b7f02629c",
                "27ae3e4e09519cfbb04c329615203637",
            ),
        }
    ),
    "fashion-mnist": _specs(
        {
            "train-images-idx3-ubyte": (
                26421880,
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            ),
            "train-labels-idx1-ubyte": (
                29515,
                "25c81989df183df01b3e8a0aad5dffbe",
                "9018921c3c673c538a1fc5bad174d6f9",
            ),
            "t10k-images-idx3-ubyte": (
                4422102,
                "bef4ecab320f06d8554ea6380940ec79",
                "8181f5470baa50b63fa0f6fddb340f0a",
            ),
            "t10k-labels-idx1-ubyte": (
                5148,
                "bb300cfdad3c16e7a12a480ee83cd310",
                "15d484375f8d13e6eb1aabb0c3f46965",
            ),
        }
    ),
}

_SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# --------------------------------------------------------------------------- public API


def default_cache_dir() -> Path:
    """The user cache root: `$XDG_CACHE_HOME/bnjax`, else `~/.cache/bnjax`.

    Datasets live in `<cache>/mnist/` and `<cache>/fashion-mnist/`. The folder
    is not created here.
    """
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "bnjax"


def load_mnist(
    split: Split = "train",
    *,
    dataset: DatasetName = "mnist",
    data_dir: PathLike | None = None,
    download: bool = False,
    mirrors: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of MNIST or Fashion-MNIST as verified `uint8` arrays.

    Args:
      split: `"train"` (60000 samples) or `"test"` (10000 samples).
      dataset: `"mnist"` or `"fashion-mnist"`.
      data_dir: a root folder holding `<dataset>/` with the IDX files (gzip or
        raw). Searched first, then `$BNJAX_DATA_DIR`, then the user cache.
      download: if the files are found nowhere, download them into the user
        cache (MD5-verified). If False (the default) the network is never used.
      mirrors: base URLs to download from instead of `$BNJAX_DATA_MIRROR` or
        :data:`DEFAULT_MIRRORS`; `{dataset}` is replaced by the dataset name.

    Returns:
      `(images, labels)`: `images` is `uint8` of shape `(N, 28, 28)` with
      pixel values `0..255`, `labels` is `uint8` of shape `(N,)` with
      class ids `0..9`; `N` is 60000 for train and 10000 for test. Both are
      read-only (they are shared with the in-process cache).

    Raises:
      DataError: a file is missing (and `download` is False), fails its
        checksum or IDX header check, or could not be downloaded.
      ValueError: unknown `split` or `dataset`.

    Example:

    ```python
    >>> images, labels = load_mnist("test", data_dir="/data")  # doctest: +SKIP
    >>> images.shape, labels.shape                             # doctest: +SKIP
    ((10000, 28, 28), (10000,))
    ```
    """
    dataset_key = _check_dataset(dataset)
    if split not in _SPLIT_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    names = _SPLIT_FILES[split]
    paths = _locate(dataset_key, names, data_dir=data_dir, download=download, mirrors=mirrors)
    specs = _FILES[dataset_key]
    images = _load_file(paths[names[0]], specs[names[0]])
    labels = _load_file(paths[names[1]], specs[names[1]])
    return images, labels


def load_dataset(
    name: DatasetName = "mnist",
    *,
    data_dir: PathLike | None = None,
    download: bool = False,
    mirrors: Sequence[str] | None = None,
    flatten: bool = False,
) -> Dataset:
    """Load both splits of a dataset, with images scaled to float32 in `[0, 1]`.

    Args:
      name: `"mnist"` or `"fashion-mnist"`.
      data_dir: as for :func:`load_mnist`.
      download: as for :func:`load_mnist`.
      mirrors: as for :func:`load_mnist`.
      flatten: if True, images have shape `(N, 784)` instead of `(N, 28, 28)`.

    Returns:
      A :class:`Dataset` with float32 images (`pixel / 255`) and int32 labels.
      The arrays are fresh (writable) copies.

    Example:

    ```python
    >>> ds = load_dataset("mnist", flatten=True)     # doctest: +SKIP
    >>> ds.train_images.shape, ds.test_labels.dtype  # doctest: +SKIP
    ((60000, 784), dtype('int32'))
    ```
    """
    dataset_key = _check_dataset(name)
    # Locate all four files first, so a missing-files error lists all of them at once.
    _locate(
        dataset_key,
        _SPLIT_FILES["train"] + _SPLIT_FILES["test"],
        data_dir=data_dir,
        download=download,
        mirrors=mirrors,
    )
    arrays: list[np.ndarray] = []
    for split in ("train", "test"):
        images, labels = load_mnist(
            split, dataset=dataset_key, data_dir=data_dir, download=False, mirrors=mirrors
        )
        x = images.astype(np.float32)
        x *= np.float32(1.0 / 255.0)
        if flatten:
            x = x.reshape(x.shape[0], -1)
        arrays += [x, labels.astype(np.int32)]
    return Dataset(*arrays)


def download(
    dataset: DatasetName = "mnist",
    *,
    dest_dir: PathLike | None = None,
    mirrors: Sequence[str] | None = None,
    force: bool = False,
) -> Path:
    """Download the four files of `dataset` into `<dest_dir>/<dataset>/`.

    Files already present and valid are kept unless `force` is True. Each
    download is written to a temporary file in the destination folder, verified
    against the published MD5 and IDX header, and only then renamed into place;
    mirrors are tried in order until one delivers a valid file.

    Args:
      dataset: `"mnist"` or `"fashion-mnist"`.
      dest_dir: the data root; default :func:`default_cache_dir`.
      mirrors: base URLs (default `$BNJAX_DATA_MIRROR` or :data:`DEFAULT_MIRRORS`).
      force: download even if a valid file is already there.

    Returns:
      The dataset folder `<dest_dir>/<dataset>`.

    Raises:
      DataError: no mirror delivered a valid copy of some file.
    """
    dataset_key = _check_dataset(dataset)
    root = Path(dest_dir) if dest_dir is not None else default_cache_dir()
    folder = root / dataset_key
    for name, spec in _FILES[dataset_key].items():
        existing = _find_file(folder, name)
        if existing is not None and not force:
            _load_file(existing, spec)  # raises DataError if invalid
            continue
        _download_file(folder, spec, dataset_key, mirrors)
    return folder


# --------------------------------------------------------------------------- locating


def _check_dataset(dataset: str) -> str:
    key = dataset.lower().replace("_", "-")
    if key not in _FILES:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    return key


def _search_roots(data_dir: PathLike | None) -> list[tuple[Path, str]]:
    roots: list[tuple[Path, str]] = []
    if data_dir is not None:
        roots.append((Path(data_dir).expanduser(), "data_dir argument / --data-dir"))
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        roots.append((Path(env).expanduser(), f"${ENV_DATA_DIR}"))
    roots.append((default_cache_dir(), "user cache"))
    seen: set[Path] = set()
    unique = []
    for root, origin in roots:
        if root not in seen:
            seen.add(root)
            unique.append((root, origin))
    return unique


def _find_file(folder: Path, name: str) -> Path | None:
    """`folder/name.gz` if it exists, else `folder/name`, else None."""
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _mirror_list(dataset: str, mirrors: Sequence[str] | None) -> list[str]:
    if mirrors is None:
        env = os.environ.get(ENV_MIRROR, "").strip()
        mirrors = re.split(r"[,\s]+", env) if env else DEFAULT_MIRRORS[dataset]
    return [m.replace("{dataset}", dataset) for m in mirrors if m]


def _locate(
    dataset: str,
    names: Sequence[str],
    *,
    data_dir: PathLike | None,
    download: bool,
    mirrors: Sequence[str] | None,
) -> dict[str, Path]:
    roots = _search_roots(data_dir)
    found: dict[str, Path] = {}
    for name in names:
        for root, _ in roots:
            path = _find_file(root / dataset, name)
            if path is not None:
                found[name] = path
                break
    missing = [n for n in names if n not in found]
    if not missing:
        return found
    if download:
        cache = default_cache_dir() / dataset
        for name in missing:
            found[name] = _download_file(cache, _FILES[dataset][name], dataset, mirrors)
        return found
    raise DataError(_missing_message(dataset, missing, roots, mirrors))


def _missing_message(
    dataset: str,
    missing: Sequence[str],
    roots: Sequence[tuple[Path, str]],
    mirrors: Sequence[str] | None,
) -> str:
    files = ", ".join(f"{n}.gz" for n in missing)
    lines = [
        f"{dataset}: missing file(s) {files} (the gzip '.gz' or the raw uncompressed file).",
        "Looked in:",
    ]
    for root, origin in roots:
        folder = root / dataset
        state = "" if folder.is_dir() else " (folder does not exist)"
        lines.append(f"  {folder}  [{origin}]{state}")
    lines += [
        "Provide them in one of two ways:",
        f"  1. Put the IDX files in <root>/{dataset}/ and pass --data-dir <root> "
        f"(data_dir=<root>) or set the environment variable {ENV_DATA_DIR}=<root>.",
        f"  2. Allow a download (download=True, or the experiments' --download) into "
        f"{default_cache_dir() / dataset} from {', '.join(_mirror_list(dataset, mirrors))} "
        "(MD5-verified).",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- verify/decode


def _read_verified(
    path: Path, spec: _FileSpec, *, compressed: bool | None = None, label: str | None = None
) -> bytes:
    """Return the raw (decompressed) IDX bytes of `path` after verifying them.

    `compressed` defaults to whether the name ends in `.gz`; `label` is how
    the file is named in error messages (default: its path).
    """
    if compressed is None:
        compressed = path.name.endswith(".gz")
    name = label or str(path)
    if compressed:
        data = path.read_bytes()
        digest = hashlib.md5(data, usedforsecurity=False).hexdigest()
        try:
            raw = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(
                f"{name}: checksum mismatch (MD5 {digest}, expected {spec.gz_md5}; "
                f"{len(data)} bytes, expected {spec.gz_size}) and the gzip stream is broken "
                f"({e}): the file is corrupt or truncated. Delete it and provide the "
                "original file."
            ) from e
        if digest != spec.gz_md5:
            # A re-compressed copy (other gzip header or level) is fine if its content
            # is the original file.
            raw_digest = hashlib.md5(raw, usedforsecurity=False).hexdigest()
            if raw_digest != spec.raw_md5:
                raise DataError(
                    f"{name}: checksum mismatch: MD5 {digest}, expected {spec.gz_md5} "
                    f"(decompressed: {len(raw)} bytes with MD5 {raw_digest}, expected "
                    f"{spec.raw_size} bytes with MD5 {spec.raw_md5}). The file is corrupt "
                    "or not the original; delete it and provide the original file."
                )
            logger.debug("%s: re-compressed copy, content matches the raw MD5", name)
    else:
        raw = path.read_bytes()
        if len(raw) != spec.raw_size:
            raise DataError(
                f"{name}: has {len(raw)} bytes, expected {spec.raw_size} "
                f"({'truncated' if len(raw) < spec.raw_size else 'trailing data'}). "
                "Delete it and provide the original file."
            )
        digest = hashlib.md5(raw, usedforsecurity=False).hexdigest()
        if digest != spec.raw_md5:
            raise DataError(
                f"{name}: checksum mismatch: MD5 is {digest}, expected {spec.raw_md5}. "
                "The file is corrupt or not the original; delete it and provide the "
                "original file."
            )
    _check_header(name, raw, spec)
    return raw


def _check_header(name: str, raw: bytes, spec: _FileSpec) -> None:
    if len(raw) < spec.header_size:
        raise DataError(f"{name}: only {len(raw)} bytes, too short for an IDX header")
    magic, count = struct.unpack(">II", raw[:8])
    if magic != spec.magic:
        raise DataError(f"{name}: IDX magic number is {magic}, expected {spec.magic}")
    if count != spec.count:
        raise DataError(f"{name}: IDX header says {count} items, expected {spec.count}")
    if spec.kind == "images":
        rows, cols = struct.unpack(">II", raw[8:16])
        if (rows, cols) != (_ROWS, _COLS):
            raise DataError(f"{name}: IDX images are {rows}x{cols}, expected {_ROWS}x{_COLS}")
    if len(raw) != spec.raw_size:
        raise DataError(f"{name}: IDX data has {len(raw)} bytes, header implies {spec.raw_size}")


@functools.lru_cache(maxsize=16)
def _decode_cached(path: str, mtime_ns: int, size: int, spec: _FileSpec) -> np.ndarray:
    del mtime_ns, size  # part of the cache key only
    p = Path(path)
    raw = _read_verified(p, spec)
    # np.frombuffer over bytes is a zero-copy, read-only view.
    data = np.frombuffer(raw, dtype=np.uint8, offset=spec.header_size)
    if spec.kind == "images":
        return data.reshape(spec.count, _ROWS, _COLS)
    if data.size and int(data.max()) >= _NUM_CLASSES:
        raise DataError(f"{p}: label {int(data.max())} out of range 0..{_NUM_CLASSES - 1}")
    return data


def _load_file(path: Path, spec: _FileSpec) -> np.ndarray:
    st = path.stat()
    return _decode_cached(str(path.resolve()), st.st_mtime_ns, st.st_size, spec)


# --------------------------------------------------------------------------- download


def _urlopen(url: str, timeout: float) -> IO[bytes]:  # indirection point for tests
    request = urllib.request.Request(url, headers={"User-Agent": "bnjax-data/1"})
    return urllib.request.urlopen(request, timeout=timeout)


def _download_file(
    folder: Path, spec: _FileSpec, dataset: str, mirrors: Sequence[str] | None
) -> Path:
    """Fetch `spec.name + '.gz'` into `folder` via a verified temporary file."""
    urls = [m.rstrip("/") + f"/{spec.name}.gz" for m in _mirror_list(dataset, mirrors)]
    if not urls:
        raise DataError(f"{dataset}: no download mirrors configured")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{spec.name}.gz"
    limit = spec.raw_size + (1 << 20)  # no valid .gz is larger than the raw file
    errors: list[str] = []
    for url in urls:
        if not url.startswith(("http://", "https://")):
            errors.append(f"{url}: only http(s) URLs are supported")
            continue
        fd, tmp_name = tempfile.mkstemp(prefix=f".{spec.name}.", suffix=".part", dir=folder)
        tmp = Path(tmp_name)
        try:
            logger.info("downloading %s", url)
            with os.fdopen(fd, "wb") as out, _urlopen(url, _DOWNLOAD_TIMEOUT_S) as resp:
                total = 0
                while chunk := resp.read(_CHUNK):
                    total += len(chunk)
                    if total > limit:
                        raise DataError(f"more than {limit} bytes, larger than any valid file")
                    out.write(chunk)
            _read_verified(tmp, spec, compressed=True, label="downloaded file")
            os.replace(tmp, target)
            logger.info("saved %s", target)
            return target
        except (urllib.error.URLError, OSError, DataError) as e:
            errors.append(f"{url}: {e}")
        finally:
            tmp.unlink(missing_ok=True)
    if created:
        with contextlib.suppress(OSError):
            folder.rmdir()  # leave no empty folder behind
    raise DataError(
        f"{dataset}: could not download a valid {spec.name}.gz; tried:\n  " + "\n  ".join(errors)
    )
