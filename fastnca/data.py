"""The paper's datasets, decoded once into uint8 tensors held in memory.

Datasets (see docs/TRAINING.md):

- ``mnist``: statically binarized MNIST (Larochelle & Murray, 2011) from ``binarized_mnist.npz`` (keys
  train/valid/test, ``(N, 784)`` uint8) or the original ``binarized_mnist_{train,valid,test}.amat`` files.
  Training uses train+valid (60,000 images), test 10,000. Zero-padded to 32x32 for the doubling models,
  28x28 for the non-doubling model. Values {0, 1}. A copy ships inside the package
  (``fastnca/datasets/binarized_mnist.npz``, checksummed on every load) and is used when no data directory is
  given (no ``data_dir`` argument, no ``$FASTNCA_DATA``), so MNIST needs no set-up.
- ``emoji``: Noto Emoji v2.028, ``noto-emoji-v2.028/128/*.png`` (128x128 RGBA), composited onto white, resized,
  and split 80/20 over the sorted file names with a seeded permutation (2656 train / 664 test), as the
  authors' code did with ``random_split(..., generator=Generator().manual_seed(0))``.
- ``celeba``: torchvision's CelebA layout (``celeba/img_align_celeba/*.jpg`` + ``celeba/list_eval_partition.txt``,
  official train/test partitions) or a plain folder of face images (``celeba-subset/images/*.jpg``, the last 10% of
  the sorted names are the test split). Resized straight to ``image_size`` x ``image_size`` (no crop), as the
  authors' code did with ``transforms.Resize((h, w))``.

Every loader returns :class:`Splits` of uint8 ``(N, C, H, W)`` tensors; :func:`to_model` maps a batch to the
model's data domain. Decoded image folders are cached as ``.npy`` in a user cache directory (``FASTNCA_CACHE``,
else ``$XDG_CACHE_HOME/fastnca``, else ``~/.cache/fastnca``), keyed by size and a fingerprint of the source files;
nothing is ever written into the data directory.
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastnca.utils import atomic_write

__all__ = [
    "DATASETS",
    "DataError",
    "Splits",
    "resolve_data_dir",
    "EMBEDDED_MNIST",
    "uses_embedded_mnist",
    "embedded_note",
    "cache_dir",
    "load_mnist",
    "load_emoji",
    "load_celeba",
    "load_dataset",
    "load_for_config",
    "to_model",
    "describe",
    "read_image",
    "image_pixel_limit",
    "IMAGE_PIXEL_LIMIT",
]

DATASETS = ("mnist", "emoji", "celeba")
DATA_ENV = "FASTNCA_DATA"
CACHE_ENV = "FASTNCA_CACHE"

MNIST_NPZ = "binarized_mnist.npz"
MNIST_AMAT = "binarized_mnist_{split}.amat"
MNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/binarized_mnist_{split}.amat"
EMOJI_DIR = "noto-emoji-v2.028"
EMOJI_TAG = "v2.028"
EMOJI_URL = f"https://github.com/googlefonts/noto-emoji/archive/refs/tags/{EMOJI_TAG}.tar.gz"
EMOJI_TEST_FRACTION = 0.2
EMOJI_SPLIT_SEED = 0
CELEBA_TV_DIR = "celeba"  # torchvision.datasets.CelebA(root=data_dir) keeps its files in data_dir/celeba
CELEBA_FOLDER = "celeba-subset/images"
CELEBA_FOLDER_TEST_FRACTION = 0.1
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGE_PIXEL_LIMIT = 50_000_000  # read_image refuses larger images (a 50 Mpx RGBA image decodes to 200 MB)
PIXEL_LIMIT_ENV = "FASTNCA_MAX_IMAGE_PIXELS"

# The binarized MNIST shipped as package data, and the sha256 of each array's bytes (fastnca/datasets/README.md).
EMBEDDED_MNIST = Path(__file__).resolve().parent / "datasets" / MNIST_NPZ
EMBEDDED_MNIST_SHA256 = {
    "train": "43490d4d6ac9002727af4426d8748609fdb7e4094fa65ad8d681ea60082a7a5a",
    "valid": "069b4f0beb389b776478c3e872b4df71c95ac4be64d7cbe6d32e24ebac8e6d5e",
    "test": "ca0294c3b8d984c7a1dc891015a8eea6f37bae59a34e35ea0fc8c47110a8dd86",
}

_HOW_TO_GET = "get it with `fastnca data --download --data-dir DIR` (needs internet) or see docs/TRAINING.md"


class DataError(RuntimeError):
    """A dataset file is missing, unreadable or not what was expected. The message names the file."""


@dataclass(frozen=True)
class Splits:
    """A dataset's train and test images.

    Attributes:
        name: 'mnist', 'emoji' or 'celeba'.
        train: ``(N_train, C, H, W)`` uint8: {0, 1} for MNIST, 0..255 for RGB.
        test: ``(N_test, C, H, W)`` uint8.
        source: where the images came from (a path), for logs.
    """

    name: str
    train: Tensor
    test: Tensor
    source: str

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.train.shape[1:]
        return int(c), int(h), int(w)


# ---------------------------------------------------------------------------------------------- locations
def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: ``data_dir`` if given, else ``$FASTNCA_DATA``, else ``./data``.

    Raises:
        DataError: the directory does not exist.
    """
    if data_dir is None:
        data_dir = os.environ.get(DATA_ENV) or "data"
        origin = f"${DATA_ENV}" if os.environ.get(DATA_ENV) else "the default ./data"
    else:
        origin = "--data-dir"
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataError(
            f"data directory {str(path)!r} (from {origin}) does not exist: expected a folder holding "
            f"{MNIST_NPZ}, {EMOJI_DIR}/128/*.png or CelebA images; pass --data-dir DIR or set {DATA_ENV}, "
            f"and {_HOW_TO_GET}"
        )
    return path


def uses_embedded_mnist(data_dir: str | os.PathLike[str] | None = None) -> bool:
    """Whether :func:`load_mnist` reads the copy shipped in the package: no ``data_dir``, no ``$FASTNCA_DATA``,
    and this install has the file. A data directory, when given, always wins."""
    return data_dir is None and not os.environ.get(DATA_ENV) and EMBEDDED_MNIST.is_file()


def embedded_note(splits: Splits) -> str | None:
    """The one start-up line saying that ``splits`` came from the embedded MNIST, else None."""
    if splits.source != str(EMBEDDED_MNIST):
        return None
    return (
        f"data: binarized MNIST embedded in the package ({EMBEDDED_MNIST}, checksums verified); "
        f"--data-dir DIR or ${DATA_ENV} selects another data directory"
    )


def cache_dir() -> Path | None:
    """The user-writable cache folder for decoded images, or None when caching is off (``FASTNCA_CACHE=off``)."""
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return None if env.lower() in ("", "0", "off", "none", "false") else Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fastnca"


def _fingerprint(files: list[Path], extra: str) -> str:
    """A short hash of the file names, sizes and modification times (cheap: no file contents are read)."""
    h = hashlib.sha256(extra.encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _cached(key: str, build: Callable[[], np.ndarray], shape: tuple[int, ...], dtype=np.uint8) -> np.ndarray:
    """Load ``key``.npy from the cache, or build it and try to store it (atomically; failures are ignored).

    ``key`` carries the fingerprint of the source files (names, sizes, modification times), so changed sources
    miss the cache. A readable entry whose array is not ``shape`` and ``dtype`` (a stale or foreign file under
    the same name) is not trusted: it is rebuilt, with a warning, and replaced.
    """
    folder = cache_dir()
    path = folder / f"{key}.npy" if folder is not None else None
    if path is not None and path.is_file():
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            pass  # a damaged cache entry is rebuilt below
        else:
            if array.shape == tuple(shape) and array.dtype == np.dtype(dtype):
                return array
            warnings.warn(
                f"{path}: cached decoded images do not match their source: expected shape {tuple(shape)} "
                f"{np.dtype(dtype)}, got {array.shape} {array.dtype}; rebuilding the cache entry",
                stacklevel=3,
            )
    array = build()
    if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
        raise DataError(f"{key}: decoded {array.shape} {array.dtype}, expected {tuple(shape)} {np.dtype(dtype)}")
    if path is not None:
        try:
            atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))
        except OSError:
            pass  # a read-only home or full disk only costs the next run the decoding time
    return array


# ---------------------------------------------------------------------------------------------- MNIST
def _count_lines(path: Path) -> int:
    """Non-empty lines of a text file (one image per line in the .amat files)."""
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _read_amat(path: Path) -> np.ndarray:
    try:
        rows = np.loadtxt(path, dtype=np.float64)  # read as written: a "0.5" or "-1" is named, not cast
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: expected one image per line of 784 space-separated 0/1 values ({err})") from err
    return rows


def _check_mnist(path: Path, split: str, rows: np.ndarray) -> np.ndarray:
    """The split as uint8, refused unless every value is exactly 0 or 1 (before any cast: a float 0.5 or an int -1
    would otherwise become 0 or 255)."""
    if rows.ndim != 2 or rows.shape[1] != 784:
        raise DataError(f"{path}: split {split!r} expected shape (N, 784), got {rows.shape}; {_HOW_TO_GET}")
    if rows.dtype.kind not in "biuf":
        raise DataError(f"{path}: split {split!r} expected 0/1 numbers, got an array of dtype {rows.dtype}")
    if rows.dtype != np.bool_:
        bad = (rows != 0) & (rows != 1)  # NaN too
        if bad.any():
            value = rows[bad].flat[0]
            raise DataError(
                f"{path}: split {split!r} expected binary 0/1 values (statically binarized MNIST), got {value!r} "
                f"in {int(bad.sum())} pixel(s) ({rows.dtype}); {_HOW_TO_GET}"
            )
    return rows.astype(np.uint8, copy=False)


def _read_mnist_npz(npz: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(npz, allow_pickle=False) as f:
            missing = [k for k in ("train", "valid", "test") if k not in f.files]
            if missing:
                raise DataError(f"{npz}: expected keys train, valid, test; missing {missing}; {_HOW_TO_GET}")
            return {k: _check_mnist(npz, k, f[k]) for k in ("train", "valid", "test")}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(
            f"{npz}: not a readable .npz archive ({err}); expected keys train/valid/test "
            f"with (N, 784) uint8 arrays; {_HOW_TO_GET}"
        ) from err


def _embedded_mnist_rows() -> dict[str, np.ndarray]:
    """The package's own copy, refused unless every array's sha256 matches the one it was shipped with."""
    rows = _read_mnist_npz(EMBEDDED_MNIST)
    for key, expected in EMBEDDED_MNIST_SHA256.items():
        got = hashlib.sha256(memoryview(np.ascontiguousarray(rows[key]))).hexdigest()
        if got != expected:
            raise DataError(
                f"{EMBEDDED_MNIST}: split {key!r} has sha256 {got}, expected {expected}: the installed copy is "
                f"damaged; reinstall fastnca, or pass --data-dir DIR (or set {DATA_ENV}) to a folder holding "
                f"{MNIST_NPZ}"
            )
    return rows


def _mnist_rows(data_dir: Path) -> tuple[dict[str, np.ndarray], Path]:
    npz = data_dir / MNIST_NPZ
    if npz.is_file():
        return _read_mnist_npz(npz), npz
    amats = {s: data_dir / MNIST_AMAT.format(split=s) for s in ("train", "valid", "test")}
    if all(p.is_file() for p in amats.values()):
        key = "mnist-amat-" + _fingerprint(list(amats.values()), "v1")
        n_train, n_valid, n_test = (_count_lines(amats[s]) for s in ("train", "valid", "test"))
        stacked = _cached(key, lambda: np.concatenate([_check_mnist(p, s, _read_amat(p)) for s, p in amats.items()]),
                          (n_train + n_valid + n_test, 784))
        rows = {
            "train": stacked[:n_train],
            "valid": stacked[n_train : n_train + n_valid],
            "test": stacked[n_train + n_valid :],
        }
        return rows, amats["train"].parent
    missing = [str(p) for p in amats.values() if not p.is_file()]
    raise DataError(
        f"binarized MNIST not found: expected {npz} (keys train/valid/test, (N, 784) uint8) or the files "
        f"{', '.join(missing)}; {_HOW_TO_GET}"
    )


def load_mnist(data_dir: str | os.PathLike[str] | None = None, *, image_size: int = 32) -> Splits:
    """Statically binarized MNIST: train+valid (60k) for training, test (10k).

    Args:
        data_dir: the data directory (see :func:`resolve_data_dir`). When neither it nor ``$FASTNCA_DATA`` is
            given, the copy shipped in the package is read (see :func:`uses_embedded_mnist`).
        image_size: 28 (as stored) or 32 (zero-padded by 2 on each side, for the doubling models).

    Returns:
        Splits of ``(N, 1, image_size, image_size)`` uint8 tensors with values {0, 1}.
    """
    if image_size not in (28, 32):
        raise ValueError(f"image_size: expected 28 or 32 for MNIST, got {image_size}")
    if uses_embedded_mnist(data_dir):
        rows, source = _embedded_mnist_rows(), EMBEDDED_MNIST
    else:
        rows, source = _mnist_rows(resolve_data_dir(data_dir))
    pad = (image_size - 28) // 2

    def images(a: np.ndarray) -> Tensor:
        x = torch.from_numpy(np.ascontiguousarray(a)).view(-1, 1, 28, 28)
        return torch.nn.functional.pad(x, (pad, pad, pad, pad)) if pad else x.clone()

    train = images(np.concatenate([rows["train"], rows["valid"]]))
    return Splits("mnist", train, images(rows["test"]), str(source))


# ---------------------------------------------------------------------------------------------- image files
def image_pixel_limit() -> int:
    """The most pixels :func:`read_image` decodes: ``$FASTNCA_MAX_IMAGE_PIXELS``, else :data:`IMAGE_PIXEL_LIMIT`."""
    env = os.environ.get(PIXEL_LIMIT_ENV)
    if env is None:
        return IMAGE_PIXEL_LIMIT
    try:
        limit = int(env)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ValueError(f"${PIXEL_LIMIT_ENV}={env!r}: expected a positive whole number of pixels")
    return limit


def _to_rgba8(im: Any) -> Any:
    """8-bit RGBA of an opened image, scaled from its own bit depth.

    PIL's ``convert`` clips 16- and 32-bit integer and float pixels to 0..255 instead of scaling them (a 16-bit
    PNG would turn white, a float TIFF black): those modes are scaled here. 16-bit ('I;16*', and 'I', PIL's mode
    for 16-bit PNGs, whose values fit 0..65535) by 255 / 65535; wider 'I' by 255 / (2**31 - 1); float ('F') is read
    as [0, 1]. Every other mode (1, L, LA, P, RGB, RGBA, CMYK, ...) has 8 bits per channel and converts as is.
    """
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            scale = 1.0
        elif im.mode.startswith("I;16") or (a.size and a.max() <= 65535):
            scale = 65535.0
        else:
            scale = 2.0**31 - 1
        a = np.nan_to_num(a / scale, nan=0.0)
        im = Image.fromarray(np.round(np.clip(a, 0, 1) * 255).astype(np.uint8), "L")
    return im.convert("RGBA")


def read_image(path: str | os.PathLike[str], what: str = "image") -> Any:
    """Decode one image file as 8-bit RGBA (a PIL image), bounded in size.

    The pixel count is read from the header and refused above :func:`image_pixel_limit` before anything is
    decoded (so a small file that would decode to gigabytes is refused at once); 16-bit and float images are
    scaled to 8 bits (see :func:`_to_rgba8`).

    Raises:
        ValueError: not a readable image, or more pixels than the limit; the message names ``what`` and the file.
    """
    import warnings as _warnings

    from PIL import Image, UnidentifiedImageError

    limit = image_pixel_limit()
    how = (f"resize it first, or raise the limit with ${PIXEL_LIMIT_ENV} (default {IMAGE_PIXEL_LIMIT // 10**6} "
           "Mpx)")
    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below says it clearly
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as err:  # PIL refuses at twice its own limit, above ours
            raise ValueError(f"{what} {str(path)!r}: more than the limit of {limit / 1e6:g} Mpx ({err}); "
                             f"{how}") from None
        except (OSError, UnidentifiedImageError) as err:
            raise ValueError(f"{what} {str(path)!r}: not a readable image file ({err})") from None
        with im:
            w, h = im.size
            if w * h > limit:
                raise ValueError(f"{what} {str(path)!r}: {w}x{h} = {w * h / 1e6:.1f} Mpx is more than the limit of "
                                 f"{limit / 1e6:g} Mpx; {how}")
            try:
                im.load()
                return _to_rgba8(im)
            except (OSError, ValueError, SyntaxError) as err:  # truncated or damaged pixel data
                raise ValueError(f"{what} {str(path)!r}: not a readable image file ({err})") from None


# ---------------------------------------------------------------------------------------------- image folders
def _decode(path: Path, image_size: int, on_white: bool) -> np.ndarray:
    """One image as ``(image_size, image_size, 3)`` uint8: RGBA composited onto white, then resized."""
    from PIL import Image

    try:
        rgba = read_image(path, "dataset image")
    except ValueError as err:
        raise DataError(f"{path}: expected a readable image file ({err}); re-download the dataset") from err
    if on_white:
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, rgba).convert("RGB")
    else:
        rgb = rgba.convert("RGB")
    if rgb.size != (image_size, image_size):
        # PIL's bilinear filter antialiases when shrinking, as torchvision's Resize does on PIL images
        rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def _decode_all(files: list[Path], image_size: int, on_white: bool, desc: str) -> np.ndarray:
    """Decode ``files`` in parallel threads (PIL releases the GIL while decoding) into ``(N, 3, S, S)`` uint8."""
    out = np.empty((len(files), 3, image_size, image_size), dtype=np.uint8)
    workers = min(16, (os.cpu_count() or 1) + 2)

    def work(i: int) -> None:
        out[i] = _decode(files[i], image_size, on_white).transpose(2, 0, 1)

    from tqdm.auto import tqdm

    with ThreadPoolExecutor(workers) as pool:
        for _ in tqdm(
            pool.map(work, range(len(files))),
            total=len(files),
            desc=desc,
            unit="img",
            leave=False,
            disable=len(files) < 2000,
        ):
            pass
    return out


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)


def _load_folder(name: str, files: list[Path], image_size: int, on_white: bool) -> np.ndarray:
    key = f"{name}-{image_size}-" + _fingerprint(files, f"v1 on_white={on_white}")
    return _cached(key, lambda: _decode_all(files, image_size, on_white, f"decoding {name}"),
                   (len(files), 3, image_size, image_size))


def load_emoji(data_dir: str | os.PathLike[str] | None = None, *, image_size: int = 64) -> Splits:
    """Noto Emoji v2.028: 128x128 RGBA PNGs on white, resized, 80/20 seeded split of the sorted names.

    Returns:
        Splits of ``(N, 3, image_size, image_size)`` uint8 tensors (2656 train / 664 test for the full release).
    """
    root = resolve_data_dir(data_dir)
    folder = root / EMOJI_DIR / "128"
    if not folder.is_dir():
        raise DataError(
            f"Noto Emoji not found: expected the folder {folder} with 128x128 RGBA PNGs "
            f"(png/128 of googlefonts/noto-emoji at tag {EMOJI_TAG}); {_HOW_TO_GET}"
        )
    files = _image_files(folder)
    if not files:
        raise DataError(f"{folder}: expected *.png emoji images, found none; {_HOW_TO_GET}")
    images = torch.from_numpy(_load_folder("emoji", files, image_size, on_white=True))
    n_test = int(len(files) * EMOJI_TEST_FRACTION)
    perm = torch.randperm(len(files), generator=torch.Generator().manual_seed(EMOJI_SPLIT_SEED))
    train_idx, test_idx = perm[: len(files) - n_test], perm[len(files) - n_test :]
    return Splits("emoji", images[train_idx], images[test_idx], str(folder))


def _celeba_torchvision(root: Path) -> tuple[list[Path], list[Path]] | None:
    base = root / CELEBA_TV_DIR
    images, partition = base / "img_align_celeba", base / "list_eval_partition.txt"
    if not images.is_dir():
        return None
    if not partition.is_file():
        raise DataError(
            f"{partition}: expected CelebA's official partition file (lines 'NNNNNN.jpg 0|1|2') beside "
            f"{images}; {_HOW_TO_GET}"
        )
    train: list[Path] = []
    test: list[Path] = []
    for line in partition.read_text().splitlines():
        parts = line.split()
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            continue
        # the authors' code trains on the official 'train' partition and tests on 'test'
        if parts[1] == "0":
            train.append(images / parts[0])
        elif parts[1] == "2":
            test.append(images / parts[0])
    if not train or not test:
        raise DataError(f"{partition}: expected train (0) and test (2) entries, found {len(train)} and {len(test)}")
    missing = next((p for p in (train[0], test[-1]) if not p.is_file()), None)
    if missing is not None:
        raise DataError(f"{missing}: listed in {partition} but missing; {_HOW_TO_GET}")
    return train, test


def load_celeba(data_dir: str | os.PathLike[str] | None = None, *, image_size: int = 64) -> Splits:
    """CelebA: torchvision's layout with official splits, else the plain folder ``celeba-subset/images``.

    The plain folder's split is deterministic: the last 10% of the sorted file names are the test set.

    Returns:
        Splits of ``(N, 3, image_size, image_size)`` uint8 tensors.
    """
    root = resolve_data_dir(data_dir)
    official = _celeba_torchvision(root)
    if official is not None:
        train_files, test_files = official
        images = torch.from_numpy(_load_folder("celeba", train_files + test_files, image_size, on_white=False))
        return Splits("celeba", images[: len(train_files)], images[len(train_files) :], str(root / CELEBA_TV_DIR))
    folder = root / CELEBA_FOLDER
    if not folder.is_dir():
        raise DataError(
            f"CelebA not found: expected torchvision's layout {root / CELEBA_TV_DIR}/img_align_celeba/*.jpg with "
            f"list_eval_partition.txt, or a folder of face images {folder}/*.jpg; {_HOW_TO_GET}"
        )
    files = _image_files(folder)
    if len(files) < 2:
        raise DataError(f"{folder}: expected at least 2 face images (*.jpg, *.png), found {len(files)}")
    images = torch.from_numpy(_load_folder("celeba-folder", files, image_size, on_white=False))
    n_test = max(1, int(round(len(files) * CELEBA_FOLDER_TEST_FRACTION)))
    return Splits("celeba", images[:-n_test], images[-n_test:], str(folder))


def load_dataset(name: str, *, image_size: int, data_dir: str | os.PathLike[str] | None = None) -> Splits:
    """Load dataset ``name`` ('mnist', 'emoji' or 'celeba') at ``image_size``."""
    if name == "mnist":
        return load_mnist(data_dir, image_size=image_size)
    if name == "emoji":
        return load_emoji(data_dir, image_size=image_size)
    if name == "celeba":
        return load_celeba(data_dir, image_size=image_size)
    raise ValueError(f"dataset: expected one of {DATASETS}, got {name!r}")


def load_for_config(cfg, data_dir: str | os.PathLike[str] | None = None) -> Splits:  # noqa: ANN001
    """The dataset of a :class:`fastnca.config.Config`, checked against its image channels."""
    splits = load_dataset(cfg.dataset, image_size=cfg.image_size, data_dir=data_dir)
    if splits.shape[0] != cfg.image_channels:
        raise ValueError(
            f"image_channels: the {cfg.dataset} images have {splits.shape[0]} channels, "
            f"the config says {cfg.image_channels}"
        )
    return splits


def to_model(x: Tensor, likelihood: str, *, device: torch.device | str | None = None) -> Tensor:
    """Map a uint8 batch to the model's data domain (float32).

    Bernoulli: {0, 1} stays {0, 1}. Discretized logistic: ``2 * (x / 255) - 1`` in [-1, 1].
    """
    if device is not None:
        x = x.to(device, non_blocking=True)
    if likelihood == "bernoulli":
        return x.float()
    if likelihood == "dml":
        return 2 * (x.float() / 255) - 1
    raise ValueError(f"likelihood: expected 'bernoulli' or 'dml', got {likelihood!r}")


# ---------------------------------------------------------------------------------------------- listing, download
def describe(data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Human-readable lines saying which datasets the data directory holds (nothing is decoded)."""
    embedded = uses_embedded_mnist(data_dir)
    try:
        root = resolve_data_dir(data_dir)
    except DataError:
        if not embedded:
            raise
        return [
            f"data directory: none (no --data-dir, no ${DATA_ENV}, no ./data)",
            f"  mnist   ok       {EMBEDDED_MNIST} (embedded in the package)",
            "  emoji   missing  needs a data directory: --data-dir DIR or " + DATA_ENV,
            "  celeba  missing  needs a data directory: --data-dir DIR or " + DATA_ENV,
        ]
    lines = [f"data directory: {root}"]
    npz = root / MNIST_NPZ
    amats = [root / MNIST_AMAT.format(split=s) for s in ("train", "valid", "test")]
    if embedded:
        lines.append(f"  mnist   ok       {EMBEDDED_MNIST} (embedded in the package; no data directory was given)")
    elif npz.is_file():
        lines.append(f"  mnist   ok       {npz} ({npz.stat().st_size / 2**20:.1f} MiB)")
    elif all(p.is_file() for p in amats):
        lines.append(f"  mnist   ok       {root}/binarized_mnist_{{train,valid,test}}.amat")
    else:
        lines.append(f"  mnist   missing  expected {npz} or binarized_mnist_{{train,valid,test}}.amat")
    folder = root / EMOJI_DIR / "128"
    if folder.is_dir():
        n = len(_image_files(folder))
        lines.append(f"  emoji   ok       {folder} ({n} images)")
    else:
        lines.append(f"  emoji   missing  expected {folder}/*.png")
    tv = root / CELEBA_TV_DIR / "img_align_celeba"
    sub = root / CELEBA_FOLDER
    if tv.is_dir():
        lines.append(f"  celeba  ok       {tv} (torchvision layout, official splits)")
    elif sub.is_dir():
        lines.append(f"  celeba  ok       {sub} ({len(_image_files(sub))} images, plain folder: last 10% = test)")
    else:
        lines.append(f"  celeba  missing  expected {tv} (torchvision layout) or {sub}/*.jpg")
    return lines
