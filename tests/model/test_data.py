"""The dataset loaders on the data directory: shapes, ranges, splits, errors, and the MNIST shipped in the package.

The data directory is $FASTNCA_DATA (tests/conftest.py: the real datasets where they are, else the test fixture
of tests/fixture_data.py: the real MNIST, synthetic emoji and CelebA). The split sizes follow from the number of
files; the real releases' own counts are checked where the data directory is a real one.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastnca import data
from fastnca.config import get_preset
from tests.fixture_data import is_fixture

DATA_DIR = Path(os.environ.get("FASTNCA_DATA", "")) if os.environ.get("FASTNCA_DATA") else None


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    """Decoded-image caches go to a temp folder, so each test run decodes the folders for real once."""
    old = os.environ.get(data.CACHE_ENV)
    os.environ[data.CACHE_ENV] = str(tmp_path_factory.mktemp("fastnca-cache"))
    yield
    if old is None:
        os.environ.pop(data.CACHE_ENV, None)
    else:
        os.environ[data.CACHE_ENV] = old


@pytest.fixture(scope="module")
def mnist32():
    return data.load_mnist(image_size=32)


@pytest.mark.data("mnist")
def test_mnist_splits_shapes_values(mnist32):
    assert mnist32.train.shape == (60_000, 1, 32, 32), "train+valid"
    assert mnist32.test.shape == (10_000, 1, 32, 32)
    assert mnist32.train.dtype == torch.uint8
    assert set(mnist32.test.unique().tolist()) == {0, 1}
    # the 2-pixel zero padding of the doubling models
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert mnist32.train[:, :, border].sum() == 0
    # documented pixel mean of the test split (the data README)
    assert abs(mnist32.test[:, :, 2:30, 2:30].float().mean().item() - 0.13251) < 5e-5


@pytest.mark.data("mnist")
def test_mnist_row_order_and_28px(mnist32):
    m28 = data.load_mnist(image_size=28)
    assert m28.train.shape == (60_000, 1, 28, 28) and m28.test.shape == (10_000, 1, 28, 28)
    assert torch.equal(m28.test, mnist32.test[:, :, 2:30, 2:30])
    with np.load(m28.source) as f:
        assert np.array_equal(m28.test[0, 0].numpy().ravel(), f["test"][0])
        assert np.array_equal(m28.train[50_000, 0].numpy().ravel(), f["valid"][0]), "valid follows train"


def test_mnist_from_amat_files(tmp_path):
    rng = np.random.default_rng(0)
    rows = {s: rng.integers(0, 2, (n, 784)) for s, n in (("train", 5), ("valid", 3), ("test", 4))}
    for s, r in rows.items():
        np.savetxt(tmp_path / f"binarized_mnist_{s}.amat", r, fmt="%d")
    m = data.load_mnist(tmp_path, image_size=28)
    assert m.train.shape == (8, 1, 28, 28) and m.test.shape == (4, 1, 28, 28)
    assert np.array_equal(m.train[5, 0].numpy().ravel(), rows["valid"][0])
    assert np.array_equal(m.test[3, 0].numpy().ravel(), rows["test"][3])


def test_mnist_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(data.DataError, match="binarized_mnist.npz") as err:
        data.load_mnist(tmp_path)
    assert "binarized_mnist_train.amat" in str(err.value) and "--download" in str(err.value)
    (tmp_path / "binarized_mnist.npz").write_bytes(b"not a zip archive")
    with pytest.raises(data.DataError, match=r"binarized_mnist\.npz.*expected keys train/valid/test"):
        data.load_mnist(tmp_path)
    np.savez(tmp_path / "binarized_mnist.npz", train=np.zeros((2, 784), np.uint8))
    with pytest.raises(data.DataError, match=r"missing \['valid', 'test'\]"):
        data.load_mnist(tmp_path)


def test_missing_data_dir_is_named(tmp_path):
    with pytest.raises(data.DataError, match="nowhere.*does not exist"):
        data.resolve_data_dir(tmp_path / "nowhere")


@pytest.mark.data("emoji")
def test_emoji_split_and_compositing():
    before = sorted(os.listdir(DATA_DIR))
    n = len(list((DATA_DIR / data.EMOJI_DIR / "128").glob("*.png")))
    if not is_fixture(DATA_DIR):
        assert n == 3320, "expected the 3320 PNGs of Noto Emoji v2.028's png/128"
    e = data.load_emoji(image_size=64)
    n_test = int(n * 0.2)  # the authors' 80/20 split: 2656 / 664 for the real release
    assert e.train.shape == (n - n_test, 3, 64, 64) and e.test.shape == (n_test, 3, 64, 64)
    assert e.train.dtype == torch.uint8
    # transparent corners composite to white for almost every emoji
    corners = torch.cat([e.train[:, :, 0, 0], e.train[:, :, -1, -1]])
    assert (corners == 255).all(1).float().mean() > 0.9
    # the split is a fixed function of the sorted names: a second load (from the cache) is identical
    e2 = data.load_emoji(image_size=64)
    assert torch.equal(e.train, e2.train) and torch.equal(e.test, e2.test)
    assert sorted(os.listdir(DATA_DIR)) == before, "nothing may be written into the data directory"


@pytest.mark.data("celeba")
def test_celeba_folder_split_and_speed():
    n = len(list((DATA_DIR / data.CELEBA_FOLDER).glob("*.jpg")))
    if not is_fixture(DATA_DIR):
        assert n == 6000, "expected the 6000 photos of the CelebA subset (the data README)"
    t0 = time.perf_counter()
    c = data.load_celeba(image_size=64)
    took = time.perf_counter() - t0
    n_test = round(n * 0.1)  # 600 of 6000
    assert c.train.shape == (n - n_test, 3, 64, 64) and c.test.shape == (n_test, 3, 64, 64), "last 10% = test"
    assert c.train.dtype == torch.uint8 and c.train.max() > 200 and c.train.min() < 30
    assert took < 60, f"decoding {n} JPEGs took {took:.1f} s"
    c32 = data.load_celeba(image_size=32)
    assert c32.test.shape == (n_test, 3, 32, 32)


def test_image_folders_missing_or_corrupt(tmp_path):
    with pytest.raises(data.DataError, match=r"noto-emoji-v2\.028/128"):
        data.load_emoji(tmp_path)
    with pytest.raises(data.DataError, match=r"celeba-subset/images"):
        data.load_celeba(tmp_path)
    folder = tmp_path / "noto-emoji-v2.028" / "128"
    folder.mkdir(parents=True)
    (folder / "emoji_u0000.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(data.DataError, match=r"emoji_u0000\.png: expected a readable image"):
        data.load_emoji(tmp_path)


@pytest.mark.data("celeba")
def test_celeba_torchvision_layout(tmp_path):
    src = sorted((DATA_DIR / "celeba-subset" / "images").iterdir())[:6]
    images = tmp_path / "celeba" / "img_align_celeba"
    images.mkdir(parents=True)
    lines = []
    for i, f in enumerate(src):
        shutil.copy(f, images / f.name)
        lines.append(f"{f.name} {[0, 0, 0, 1, 2, 2][i]}")
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    c = data.load_celeba(tmp_path, image_size=32)
    assert c.train.shape == (3, 3, 32, 32) and c.test.shape == (2, 3, 32, 32), "official train (0) and test (2)"


def test_to_model_domains():
    x = torch.tensor([0, 1], dtype=torch.uint8)
    assert torch.equal(data.to_model(x, "bernoulli"), torch.tensor([0.0, 1.0]))
    y = data.to_model(torch.tensor([0, 255], dtype=torch.uint8), "dml")
    assert y.dtype == torch.float32 and torch.equal(y, torch.tensor([-1.0, 1.0]))


@pytest.mark.data("mnist")
def test_load_for_config_nondoubling_mnist():
    s = data.load_for_config(get_preset("mnist-nondoubling"))
    assert s.shape == (1, 28, 28)
    assert "mnist" in "\n".join(data.describe())


# ---------------------------------------------------------------------------------------------- embedded MNIST
@pytest.fixture
def no_data_dir(tmp_path, monkeypatch):
    """No $FASTNCA_DATA and a working directory without ./data: nothing tells fastnca where data lives."""
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.chdir(tmp_path)


def test_embedded_mnist_is_read_when_no_data_directory_is_given(no_data_dir):
    assert data.uses_embedded_mnist(), f"expected the package to ship {data.EMBEDDED_MNIST}"
    m = data.load_mnist(image_size=28)
    assert m.source == str(data.EMBEDDED_MNIST), f"expected the embedded copy, got {m.source}"
    assert m.train.shape == (60_000, 1, 28, 28) and m.test.shape == (10_000, 1, 28, 28)
    # documented pixel mean of the test split: the same data as the data directory's copy
    assert abs(m.test.float().mean().item() - 0.13251) < 5e-5
    note = data.embedded_note(m)
    assert note is not None and "embedded" in note and "--data-dir" in note and "\n" not in note
    lines = "\n".join(data.describe())
    assert "mnist   ok" in lines and "embedded" in lines and "emoji   missing" in lines, lines


def test_data_directory_wins_over_the_embedded_copy(no_data_dir, tmp_path, monkeypatch):
    rows = {s: np.full((n, 784), i % 2, np.uint8) for i, (s, n) in enumerate((("train", 3), ("valid", 2), ("test", 1)))}
    np.savez(tmp_path / "binarized_mnist.npz", **rows)
    explicit = data.load_mnist(tmp_path, image_size=28)
    assert explicit.source == str(tmp_path / "binarized_mnist.npz") and explicit.test.shape[0] == 1
    assert data.embedded_note(explicit) is None, "no embedded-data line for a data directory's copy"
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    assert not data.uses_embedded_mnist()
    assert data.load_mnist(image_size=28).source == str(tmp_path / "binarized_mnist.npz"), "$FASTNCA_DATA wins"


def test_damaged_embedded_copy_is_refused(no_data_dir, tmp_path, monkeypatch):
    with np.load(data.EMBEDDED_MNIST) as f:
        rows = {k: f[k].copy() for k in ("train", "valid", "test")}
    rows["test"][123, 456] ^= 1  # one flipped pixel: still valid binarized MNIST, but not the shipped data
    damaged = tmp_path / "damaged.npz"
    np.savez(damaged, **rows)
    monkeypatch.setattr(data, "EMBEDDED_MNIST", damaged)
    with pytest.raises(data.DataError, match=r"damaged\.npz: split 'test' has sha256 .*expected ca0294c3") as err:
        data.load_mnist()
    assert "--data-dir" in str(err.value)


def test_emoji_and_celeba_still_need_a_data_directory(no_data_dir):
    for load in (data.load_emoji, data.load_celeba):
        with pytest.raises(data.DataError, match=r"'data' \(from the default ./data\) does not exist.*--data-dir"):
            load()


def _tiny_emoji_folder(root: Path, n: int) -> Path:
    from PIL import Image

    folder = root / "noto-emoji-v2.028" / "128"
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGBA", (8, 8), (20 * i, 0, 0, 255)).save(folder / f"emoji_u{i:04x}.png")
    return folder


def test_a_cached_array_of_the_wrong_shape_is_rebuilt_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    _tiny_emoji_folder(tmp_path, 10)
    first = data.load_emoji(tmp_path, image_size=8)
    (entry,) = (tmp_path / "cache").glob("emoji-8-*.npy")
    cached = np.load(entry)
    assert cached.shape == (10, 3, 8, 8)
    np.save(entry, cached[:5])  # readable, but 5 images for a 10-file folder
    with pytest.warns(UserWarning, match=r"expected shape \(10, 3, 8, 8\).*got \(5, 3, 8, 8\).*rebuilding"):
        again = data.load_emoji(tmp_path, image_size=8)
    assert torch.equal(again.train, first.train) and torch.equal(again.test, first.test)
    assert np.load(entry).shape == (10, 3, 8, 8), "expected the rebuilt array to replace the wrong cache entry"
    np.save(entry, cached.astype(np.float32))  # right shape, wrong dtype
    with pytest.warns(UserWarning, match=r"expected .*uint8.*rebuilding"):
        assert torch.equal(data.load_emoji(tmp_path, image_size=8).train, first.train)


def test_a_wrong_mnist_amat_cache_is_rebuilt_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("valid", 2), ("test", 3)):
        np.savetxt(tmp_path / f"binarized_mnist_{split}.amat", rng.integers(0, 2, (n, 784)), fmt="%d")
    first = data.load_mnist(tmp_path, image_size=28)
    (entry,) = (tmp_path / "cache").glob("mnist-amat-*.npy")
    np.save(entry, np.ones((2, 784), np.uint8))
    with pytest.warns(UserWarning, match=r"expected shape \(9, 784\).*rebuilding"):
        again = data.load_mnist(tmp_path, image_size=28)
    assert torch.equal(again.train, first.train) and torch.equal(again.test, first.test)


# ---------------------------------------------------------------------------------------------- bad values, images
@pytest.mark.parametrize(
    "values, dtype, shown",
    [((0, 0.5), np.float32, "0.5"), ((-1, 1), np.int8, "-1"), ((0, 2), np.uint8, "2")],
)
def test_mnist_values_other_than_0_and_1_are_named_with_the_file(tmp_path, values, dtype, shown):
    """A float 0/0.5 array cast to uint8 would make every image blank, an int -1/1 one 255/1: refused, not cast."""
    rows = np.full((4, 784), values[0], dtype)
    rows[:, :392] = values[1]
    np.savez(tmp_path / "binarized_mnist.npz", train=rows, valid=rows, test=rows)
    with pytest.raises(data.DataError, match=rf"binarized_mnist\.npz: split 'train' expected binary 0/1 values.*got "
                                             rf"(np\.\w+\()?{shown}\)? in \d+ pixel"):
        data.load_mnist(tmp_path)


def test_mnist_amat_values_other_than_0_and_1_are_named(tmp_path):
    for s in ("train", "valid", "test"):
        np.savetxt(tmp_path / f"binarized_mnist_{s}.amat", np.full((2, 784), 0.5), fmt="%g")
    with pytest.raises(data.DataError, match=r"binarized_mnist_train\.amat.*expected binary 0/1 values.*0\.5"):
        data.load_mnist(tmp_path)


def test_read_image_scales_16_bit_and_float_images(tmp_path):
    """PIL's convert clips wider pixels to 0..255 (a 16-bit PNG turns white, a float TIFF black): scaled instead."""
    from PIL import Image

    ramp = np.linspace(0, 1, 64).reshape(8, 8)
    Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(tmp_path / "grey16.png")
    Image.fromarray(ramp.astype(np.float32), "F").save(tmp_path / "float.tiff")
    want = (ramp * 255).round()
    for name in ("grey16.png", "float.tiff"):
        got = np.asarray(data.read_image(tmp_path / name))
        assert got.dtype == np.uint8 and got.shape == (8, 8, 4)
        assert np.abs(got[..., 0] - want).max() <= 1, f"{name}: expected the grey ramp, got {got[..., 0]}"
        assert (got[..., 3] == 255).all()


def test_read_image_refuses_more_pixels_than_the_limit_before_decoding(tmp_path, monkeypatch):
    from PIL import Image

    from fastnca.figures import mask_from_file

    Image.new("L", (40, 30)).save(tmp_path / "big.png")
    monkeypatch.setenv(data.PIXEL_LIMIT_ENV, "1000")
    for read in (lambda p: data.read_image(p, "--image"), lambda p: mask_from_file(p, 8)):
        with pytest.raises(ValueError, match=r"big\.png'?: 40x30 = 0\.0 Mpx is more than the limit of 0\.001 Mpx; "
                                             r"resize it first, or raise the limit with \$FASTNCA_MAX_IMAGE_PIXELS"):
            read(tmp_path / "big.png")
    # past PIL's own bomb limit, PIL refuses while opening: the message is still one line naming the file
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ValueError, match=r"big\.png'?: more than the limit"):
        data.read_image(tmp_path / "big.png")
    monkeypatch.setenv(data.PIXEL_LIMIT_ENV, "lots")
    with pytest.raises(ValueError, match=r"FASTNCA_MAX_IMAGE_PIXELS='lots': expected a positive whole number"):
        data.read_image(tmp_path / "big.png")
