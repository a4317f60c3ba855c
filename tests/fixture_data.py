"""A small data directory for the tests where no real one is set: real MNIST, synthetic emoji and CelebA.

fastnca reads a data directory in three layouts (``fastnca/data.py``); this folder has each of them, small:

- ``binarized_mnist.npz``: a copy of the binarized MNIST shipped in the package (real data, same checksums);
- ``noto-emoji-v2.028/128/*.png``: ``EMOJI_COUNT`` 128x128 RGBA PNGs drawn here (discs, rings and squares in
  random colours on a transparent background): Noto Emoji's own files are not copied into the repository;
- ``celeba-subset/images/*.jpg``: ``CELEBA_COUNT`` JPEGs of about 200x200 px drawn here (a skin-toned ellipse
  with dark eyes and hair on a random background): CelebA's terms forbid redistributing its photos.

The files are a fixed function of ``VERSION`` (seeded), made once into a git-ignored folder of the checkout and
reused; ``FIXTURE_MARK`` in the folder tells tests that it is this synthetic set, so the assertions that only hold
for the real releases (3320 emoji, 6000 CelebA photos) are made only on real data.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

VERSION = "1"
FIXTURE_MARK = "FASTNCA_TEST_FIXTURE"  # a file in the folder's root, holding VERSION
EMOJI_COUNT = 60  # 48 train / 12 test under the loader's 80/20 split
CELEBA_COUNT = 60  # 54 train / 6 test (the last 10% of the sorted names)


def is_fixture(data_dir: str | os.PathLike[str] | None) -> bool:
    """Whether ``data_dir`` is this synthetic set (not a real data directory)."""
    return data_dir is not None and (Path(data_dir) / FIXTURE_MARK).is_file()


def _emoji(rng: np.random.Generator) -> np.ndarray:
    """One 128x128 RGBA picture: a few opaque shapes on a transparent background."""
    img = np.zeros((128, 128, 4), np.uint8)
    yy, xx = np.mgrid[0:128, 0:128]
    for _ in range(int(rng.integers(1, 4))):
        cy, cx, r = rng.integers(30, 98), rng.integers(30, 98), rng.integers(12, 40)
        colour = np.append(rng.integers(0, 256, 3), 255)
        d = np.hypot(yy - cy, xx - cx)
        shape = int(rng.integers(3))
        inside = d < r if shape == 0 else (np.abs(d - r) < r / 4) if shape == 1 else (
            (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r))
        img[inside] = colour
    return img


def _face(rng: np.random.Generator) -> np.ndarray:
    """One RGB picture of about 200x200 px: background, hair, a skin-toned ellipse, two dark eyes."""
    h, w = int(rng.integers(190, 215)), int(rng.integers(170, 205))
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    img = np.empty((h, w, 3), np.float64)
    img[:] = rng.uniform(0, 255, 3)
    img += (yy[..., None] - 0.5) * rng.uniform(-80, 80, 3)  # a gradient, as in real photos' backgrounds
    hair = ((yy - 0.42) / 0.42) ** 2 + ((xx - 0.5) / 0.36) ** 2 < 1
    img[hair] = rng.uniform(0, 60, 3)
    face = ((yy - 0.55) / 0.32) ** 2 + ((xx - 0.5) / 0.26) ** 2 < 1
    img[face] = np.array([224, 172, 140]) * rng.uniform(0.6, 1.1)
    for ex in (0.4, 0.6):
        img[((yy - 0.5) / 0.03) ** 2 + ((xx - ex) / 0.04) ** 2 < 1] = 20
    img += rng.normal(0, 6, img.shape)  # sensor noise
    return np.clip(img, 0, 255).astype(np.uint8)


def _build(folder: Path) -> None:
    from PIL import Image

    from fastnca.data import CELEBA_FOLDER, EMBEDDED_MNIST, EMOJI_DIR, MNIST_NPZ

    rng = np.random.default_rng(int(VERSION))
    shutil.copyfile(EMBEDDED_MNIST, folder / MNIST_NPZ)
    emoji = folder / EMOJI_DIR / "128"
    emoji.mkdir(parents=True)
    for i in range(EMOJI_COUNT):
        Image.fromarray(_emoji(rng), "RGBA").save(emoji / f"emoji_u{0x1f600 + i:x}.png")
    faces = folder / CELEBA_FOLDER
    faces.mkdir(parents=True)
    for i in range(CELEBA_COUNT):
        Image.fromarray(_face(rng), "RGB").save(faces / f"{182638 + i:06d}.jpg", quality=90)
    (folder / FIXTURE_MARK).write_text(VERSION + "\n")


def ensure_fixture_data(folder: str | os.PathLike[str]) -> Path:
    """The synthetic data directory at ``folder``, made when missing or of another ``VERSION``.

    Made in a temporary sibling folder and renamed into place, so a run that is interrupted, or two that start
    at once, never leave a half-made folder behind.
    """
    folder = Path(folder)
    mark = folder / FIXTURE_MARK
    if mark.is_file() and mark.read_text().strip() == VERSION:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        _build(tmp)
        if folder.exists():  # another VERSION
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:  # another run put its copy there first: the same files
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
