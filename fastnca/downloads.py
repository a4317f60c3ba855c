"""Downloads that verify themselves: known checksums, a progress bar, resume and retry, atomic final names.

Every file is fetched into ``NAME.part`` beside its final name, resumed from there with an HTTP ``Range``
request after a dropped connection, checked against its recorded size and SHA-256, and only then renamed to
its final name (``os.replace``). A file that fails its check is deleted and reported with both checksums; the
final name never holds a partial or unverified file.

What each recorded checksum covers:

- Binarized MNIST (Larochelle's ``binarized_mnist_{train,valid,test}.amat``): SHA-256 and byte size of each
  file as served. These are the values TensorFlow Datasets records for the same URLs, and we checked them
  independently: writing this project's ``binarized_mnist.npz`` arrays back out in the ``.amat`` format (784
  space-separated 0/1 values and a newline per image) reproduces all three digests and sizes exactly
  (``tests/model/test_downloads.py`` repeats the check for the test split).
- Noto Emoji v2.028: GitHub generates its release tarballs on request and does not promise byte-identical
  archives, so no archive checksum is recorded. What is verified is what the project uses: the extracted
  ``png/128`` folder (3,320 files), by :func:`folder_digest`, the SHA-256 of its ``sha256sum``-style listing
  (``HASH  NAME`` per file, names sorted). The value was computed from a copy of that folder at tag v2.028;
  it has not been compared against a fresh download from GitHub.
- CelebA: fetched by ``torchvision.datasets.CelebA(download=True)``, which checks torchvision's own MD5s.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastnca.data import CELEBA_TV_DIR, EMOJI_DIR, EMOJI_TAG, EMOJI_URL, MNIST_AMAT, MNIST_NPZ, MNIST_URL

__all__ = [
    "RemoteFile",
    "DownloadError",
    "ChecksumError",
    "MNIST_FILES",
    "EMOJI_ARCHIVE_URL",
    "EMOJI_FOLDER_SHA256",
    "EMOJI_FILE_COUNT",
    "sha256_file",
    "folder_digest",
    "fetch_verified",
    "download",
]

_CHUNK = 1 << 16


@dataclass(frozen=True)
class RemoteFile:
    """A file to fetch: where from, its final name in the data directory, its SHA-256 and byte size."""

    url: str
    name: str
    sha256: str
    size: int | None = None


# SHA-256 and size of each .amat file as served (see the module docstring for how they were checked).
MNIST_FILES = {
    "train": RemoteFile(
        MNIST_URL.format(split="train"),
        MNIST_AMAT.format(split="train"),
        "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",
        78_400_000,
    ),
    "valid": RemoteFile(
        MNIST_URL.format(split="valid"),
        MNIST_AMAT.format(split="valid"),
        "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2",
        15_680_000,
    ),
    "test": RemoteFile(
        MNIST_URL.format(split="test"),
        MNIST_AMAT.format(split="test"),
        "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c",
        15_680_000,
    ),
}

EMOJI_ARCHIVE_URL = EMOJI_URL
# folder_digest() of png/128 at tag v2.028 (3,320 PNGs); see the module docstring.
EMOJI_FOLDER_SHA256 = "a13c9438e1d093c1e8b7197015e679098dea902f357bebe680dbc24e2951b3ae"
EMOJI_FILE_COUNT = 3320


class DownloadError(OSError):
    """A download failed (network, server, disk) after its retries; the message names the URL and the file."""


class ChecksumError(DownloadError):
    """A downloaded file is not the expected one; the message names the file and both checksums."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The SHA-256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_digest(folder: str | os.PathLike[str], suffix: str = ".png") -> tuple[str, int]:
    """``(digest, n_files)``: SHA-256 of the ``sha256sum`` listing (``HASH  NAME\\n``, names sorted) of a folder."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(suffix))
    listing = "".join(f"{sha256_file(p)}  {p.name}\n" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest(), len(files)


def _open(url: str, start: int, timeout: float) -> http.client.HTTPResponse:
    request = urllib.request.Request(url, headers={"User-Agent": "fastnca"})
    if start > 0:
        request.add_header("Range", f"bytes={start}-")
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - fixed http(s) URLs or a test server


def _fetch_once(url: str, part: Path, size: int | None, timeout: float, progress: bool, desc: str) -> None:
    """Append the rest of ``url`` to ``part`` (resuming when the server honours Range). Raises on a short read."""
    from tqdm.auto import tqdm

    start = part.stat().st_size if part.is_file() else 0
    if size is not None and start > size:  # not a prefix of the expected file: start over
        part.unlink()
        start = 0
    if size is not None and start == size:
        return
    with _open(url, start, timeout) as response:
        if start > 0 and response.status != 206:  # the server ignored Range and sends the whole file
            start = 0
        length = response.headers.get("Content-Length")
        expected_total = start + int(length) if length is not None else size
        with (
            open(part, "ab" if start > 0 else "wb") as f,
            tqdm(
                total=expected_total,
                initial=start,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=desc,
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            received = start
            while True:
                block = response.read(_CHUNK)
                if not block:
                    break
                f.write(block)
                received += len(block)
                bar.update(len(block))
            f.flush()
            os.fsync(f.fileno())
    if expected_total is not None and received < expected_total:
        raise http.client.IncompleteRead(b"", expected_total - received)


def fetch_verified(
    url: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str | None,
    size: int | None = None,
    retries: int = 3,
    backoff_s: float = 2.0,
    timeout: float = 60.0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``; verify size and SHA-256 before the final rename.

    An existing ``dest`` that matches ``sha256`` is kept without a download. A dropped connection or a short
    read is retried up to ``retries`` times, resuming from the bytes already in ``dest.part``.

    Args:
        sha256: the expected hex digest; None only where the caller verifies the content itself (then the file
            is only checked to be complete against the server's Content-Length).
        size: the expected byte count, when known.

    Raises:
        ChecksumError: the complete file has the wrong size or digest (``dest.part`` is deleted).
        DownloadError: the download failed after its retries (``dest.part`` is kept for the next attempt).
    """
    dest = Path(dest)
    if dest.is_file() and sha256 is not None:
        if sha256_file(dest) == sha256:
            log(f"{dest} is there and its SHA-256 matches, skipping")
            return dest
        log(f"{dest} is there but its SHA-256 does not match the recorded one: downloading it again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, size, timeout, progress, dest.name)
            break
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as err:
            if isinstance(err, urllib.error.HTTPError) and err.code == 416 and part.is_file():
                part.unlink()  # our partial file is not a prefix the server can continue: start over
            elif isinstance(err, urllib.error.HTTPError) and 400 <= err.code < 500 and err.code not in (408, 429):
                raise DownloadError(f"{dest.name}: {url} answered HTTP {err.code} ({err.reason})") from err
            if attempt == retries:
                raise DownloadError(
                    f"{dest.name}: download from {url} failed after {retries + 1} attempts ({err!r}); "
                    f"{part.stat().st_size if part.is_file() else 0} bytes kept in {part}, re-run to resume"
                ) from err
            wait = backoff_s * 2**attempt
            log(f"{dest.name}: {err!r}; retrying in {wait:g} s (attempt {attempt + 2} of {retries + 1})")
            time.sleep(wait)
    got_size = part.stat().st_size
    got = sha256_file(part)
    if (sha256 is not None and got != sha256) or (size is not None and got_size != size):
        part.unlink()
        raise ChecksumError(
            f"{dest.name}: downloaded from {url}, SHA-256 {got} ({got_size} bytes) but expected "
            f"{sha256}" + (f" ({size} bytes)" if size is not None else "") + "; the file was deleted. "
            "Re-run to try again; if it fails again the server's copy differs from the recorded one"
        )
    os.replace(part, dest)
    return dest


# ---------------------------------------------------------------------------------------------- datasets
def _download_mnist(root: Path, log: Callable[[str], None], progress: bool, files: dict[str, RemoteFile]) -> None:
    if (root / MNIST_NPZ).is_file():
        log(f"mnist: {root / MNIST_NPZ} is there, skipping")
        return
    for remote in files.values():
        log(f"mnist: {remote.url}")
        fetch_verified(
            remote.url, root / remote.name, sha256=remote.sha256, size=remote.size, progress=progress, log=log
        )


def _download_emoji(
    root: Path, log: Callable[[str], None], progress: bool, url: str, expected: tuple[str, int]
) -> None:
    folder = root / EMOJI_DIR / "128"
    if folder.is_dir() and any(folder.iterdir()):
        digest, n = folder_digest(folder)
        if (digest, n) == expected:
            log(f"emoji: {folder} is there and its digest matches, skipping")
            return
        raise ChecksumError(
            f"emoji: {folder} holds {n} PNGs with folder digest {digest}, expected {expected[1]} with "
            f"{expected[0]}; move it away and re-run to download a fresh copy"
        )
    # the archive's .part file sits in the data directory, so an interrupted download resumes on the next run
    archive = root / f".noto-emoji-{EMOJI_TAG}.tar.gz"
    log(f"emoji: {url}")
    fetch_verified(url, archive, sha256=None, progress=progress, log=log)
    try:
        _extract_emoji(archive, root, folder, url, expected)
    finally:
        archive.unlink(missing_ok=True)  # verified and extracted, or not usable: either way not kept
    log(f"emoji: {expected[1]} verified images in {folder}")


def _extract_emoji(archive: Path, root: Path, folder: Path, url: str, expected: tuple[str, int]) -> None:
    """Extract png/128 (and LICENSE) of the archive into a staging folder, verify it, move it into place."""
    with tempfile.TemporaryDirectory(dir=root, prefix=".emoji-download-") as tmp:
        staging = Path(tmp) / "128"
        staging.mkdir()
        license_text = None
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar:
                    parts = Path(member.name).parts  # ('noto-emoji-2.028', 'png', '128', 'emoji_u1f600.png')
                    if (
                        len(parts) == 4
                        and parts[1:3] == ("png", "128")
                        and member.isfile()
                        and parts[3].endswith(".png")
                    ):
                        src = tar.extractfile(member)
                        if src is not None:
                            (staging / parts[3]).write_bytes(src.read())
                    elif len(parts) == 2 and parts[1] == "LICENSE" and member.isfile():
                        src = tar.extractfile(member)
                        license_text = src.read() if src is not None else None
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ChecksumError(f"emoji: the archive from {url} is not a readable .tar.gz ({err})") from err
        digest, n = folder_digest(staging)
        if (digest, n) != expected:
            raise ChecksumError(
                f"emoji: png/128 of {url} holds {n} PNGs with folder digest {digest}, expected {expected[1]} "
                f"with {expected[0]}; nothing was written to {folder}"
            )
        (root / EMOJI_DIR).mkdir(parents=True, exist_ok=True)
        if license_text is not None:
            (root / EMOJI_DIR / "LICENSE").write_bytes(license_text)
        shutil.move(str(staging), folder)


def _download_celeba(root: Path, log: Callable[[str], None]) -> None:
    if (root / CELEBA_TV_DIR / "img_align_celeba").is_dir():
        log(f"celeba: {root / CELEBA_TV_DIR} is there, skipping")
        return
    log("celeba: downloading through torchvision.datasets.CelebA (Google Drive; needs gdown; MD5s checked by it)")
    from torchvision.datasets import CelebA

    CelebA(str(root), split="all", target_type=[], download=True)


def download(
    data_dir: str | os.PathLike[str],
    names: tuple[str, ...] = ("mnist", "emoji", "celeba"),
    log: Callable[[str], None] = print,
    *,
    progress: bool = True,
    mnist_files: dict[str, RemoteFile] | None = None,
    emoji_url: str = EMOJI_ARCHIVE_URL,
    emoji_expected: tuple[str, int] = (EMOJI_FOLDER_SHA256, EMOJI_FILE_COUNT),
) -> None:
    """Download and verify the public datasets into ``data_dir`` (created if needed). Needs internet.

    ``mnist_files``, ``emoji_url`` and ``emoji_expected`` default to the real sources; tests point them at a
    local server.
    """
    root = Path(data_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name == "mnist":
            _download_mnist(root, log, progress, mnist_files or MNIST_FILES)
        elif name == "emoji":
            _download_emoji(root, log, progress, emoji_url, emoji_expected)
        elif name == "celeba":
            _download_celeba(root, log)
        else:
            raise ValueError(f"dataset: expected one of ('mnist', 'emoji', 'celeba'), got {name!r}")
