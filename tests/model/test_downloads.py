"""Verified downloads against a local HTTP server on 127.0.0.1: good, truncated, corrupted, dropped mid-way."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import socket
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from fastnca import downloads
from fastnca.cli import main
from fastnca.downloads import (
    EMOJI_FILE_COUNT,
    EMOJI_FOLDER_SHA256,
    MNIST_FILES,
    ChecksumError,
    DownloadError,
    RemoteFile,
    download,
    fetch_verified,
    folder_digest,
)
from tests.fixture_data import is_fixture

GOOD = bytes(range(256)) * 400  # 102,400 bytes
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files[path]``; ``/drop/...`` cuts the first response short, then honours Range."""

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):  # noqa: N802 - the http.server API
        files, hits = self.server.files, self.server.hits
        hits.append((self.path, self.headers.get("Range")))
        body = files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and self.server.ranges:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        first_drop = self.path.startswith("/drop/") and sum(p == self.path for p, _ in hits) == 1
        if first_drop:  # promise the whole file, send a third of it, close the connection
            self.wfile.write(body[start : start + len(body) // 3])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])


@pytest.fixture
def server():
    """A local HTTP server on 127.0.0.1 (an ephemeral port), stopped when the test ends."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.timeout = 5
    srv.files, srv.hits, srv.ranges = {}, [], True
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def _fetch(server, path, dest, **kw):
    kw.setdefault("sha256", GOOD_SHA)
    kw.setdefault("size", len(GOOD))
    return fetch_verified(server.url + path, dest, progress=False, backoff_s=0.0, log=lambda m: None, **kw)


def test_good_file_is_accepted_under_its_final_name(server, tmp_path):
    server.files["/good.bin"] = GOOD
    dest = _fetch(server, "/good.bin", tmp_path / "good.bin")
    assert dest.read_bytes() == GOOD, "expected the served bytes under the final name"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.bin"], "expected no .part file left behind"


def test_existing_verified_file_is_not_downloaded_again(server, tmp_path):
    (tmp_path / "good.bin").write_bytes(GOOD)
    _fetch(server, "/good.bin", tmp_path / "good.bin")
    assert server.hits == [], f"expected no request for a file that already verifies, got {server.hits}"


@pytest.mark.parametrize("kind", ["truncated", "corrupted"])
def test_bad_file_is_rejected_naming_file_and_both_checksums(server, tmp_path, kind):
    body = GOOD[: len(GOOD) // 2] if kind == "truncated" else GOOD[:-1] + b"\x00"
    server.files["/data.bin"] = body
    with pytest.raises(ChecksumError) as err:
        _fetch(server, "/data.bin", tmp_path / "data.bin")
    msg = str(err.value)
    got = hashlib.sha256(body).hexdigest()
    assert "data.bin" in msg and GOOD_SHA in msg and got in msg, f"expected file name and both digests in: {msg}"
    assert list(tmp_path.iterdir()) == [], f"expected nothing left in the folder, found {list(tmp_path.iterdir())}"


def test_dropped_connection_is_resumed_with_a_range_request(server, tmp_path):
    server.files["/drop/data.bin"] = GOOD
    dest = _fetch(server, "/drop/data.bin", tmp_path / "data.bin")
    assert dest.read_bytes() == GOOD
    ranges = [r for _, r in server.hits]
    assert ranges == [None, f"bytes={len(GOOD) // 3}-"], f"expected one full request, then a resume: {ranges}"


def test_server_without_range_support_restarts_cleanly(server, tmp_path):
    server.ranges = False
    server.files["/drop/data.bin"] = GOOD
    dest = _fetch(server, "/drop/data.bin", tmp_path / "data.bin")
    assert dest.read_bytes() == GOOD, "expected the whole file after a restart from byte 0"


def test_missing_file_fails_at_once_naming_it(server, tmp_path):
    """A 404 is not retried: the message names the file and the HTTP status."""
    with pytest.raises(DownloadError) as err:
        _fetch(server, "/missing.bin", tmp_path / "data.bin", retries=3)
    assert "data.bin" in str(err.value) and "404" in str(err.value), str(err.value)
    assert len(server.hits) == 1, f"expected one request, got {server.hits}"
    assert not (tmp_path / "data.bin").exists(), "expected no file under the final name"


def test_connection_that_keeps_failing_gives_up_after_the_retries(tmp_path):
    """Nothing listens on the port: every attempt fails, the error says how many were made."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: connections are refused
    with pytest.raises(DownloadError) as err:
        fetch_verified(f"http://127.0.0.1:{port}/x.bin", tmp_path / "x.bin", sha256=GOOD_SHA, retries=2,
                       backoff_s=0.0, progress=False, log=lambda m: None)  # fmt: skip
    assert "x.bin" in str(err.value) and "3 attempts" in str(err.value), str(err.value)
    assert not (tmp_path / "x.bin").exists()


def test_mnist_download_verifies_each_file(server, tmp_path):
    files = {}
    for split, body in (("train", b"0 1\n" * 3), ("valid", b"1 0\n"), ("test", b"1 1\n")):
        server.files[f"/{split}.amat"] = body
        files[split] = RemoteFile(f"{server.url}/{split}.amat", f"binarized_mnist_{split}.amat", "", len(body))
    good = {
        k: RemoteFile(f.url, f.name, hashlib.sha256(server.files[f"/{k}.amat"]).hexdigest(), f.size)
        for k, f in files.items()
    }
    bad = dict(good, test=RemoteFile(good["test"].url, good["test"].name, "0" * 64, good["test"].size))
    with pytest.raises(ChecksumError, match="binarized_mnist_test.amat"):
        download(tmp_path, ("mnist",), log=lambda m: None, progress=False, mnist_files=bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "binarized_mnist_train.amat",
        "binarized_mnist_valid.amat",
    ], "expected the verified files kept and no test file under its final name"
    download(tmp_path, ("mnist",), log=lambda m: None, progress=False, mnist_files=good)
    assert (tmp_path / "binarized_mnist_test.amat").read_bytes() == b"1 1\n"


def _emoji_archive(pngs: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, body in {**{f"png/128/{k}": v for k, v in pngs.items()}, "LICENSE": b"Apache"}.items():
            info = tarfile.TarInfo(f"noto-emoji-2.028/{name}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def test_emoji_download_checks_the_extracted_folder(server, tmp_path):
    pngs = {"emoji_u0030.png": b"zero", "emoji_u0031.png": b"one"}
    listing = "".join(f"{hashlib.sha256(v).hexdigest()}  {k}\n" for k, v in sorted(pngs.items()))
    expected = (hashlib.sha256(listing.encode()).hexdigest(), 2)
    server.files["/good.tar.gz"] = _emoji_archive(pngs)
    server.files["/bad.tar.gz"] = _emoji_archive({**pngs, "emoji_u0031.png": b"One"})
    quiet = dict(log=lambda m: None, progress=False, emoji_expected=expected)
    with pytest.raises(ChecksumError) as err:
        download(tmp_path, ("emoji",), emoji_url=server.url + "/bad.tar.gz", **quiet)
    assert expected[0] in str(err.value), f"expected the recorded digest in: {err.value}"
    assert not (tmp_path / "noto-emoji-v2.028").exists(), "expected nothing written for a bad archive"
    download(tmp_path, ("emoji",), emoji_url=server.url + "/good.tar.gz", **quiet)
    assert sorted(os.listdir(tmp_path / "noto-emoji-v2.028" / "128")) == sorted(pngs)
    assert [p.name for p in tmp_path.iterdir()] == ["noto-emoji-v2.028"], "expected no temp folder left behind"


# ---------------------------------------------------------------------------------------------- the recorded values
def _data_dir() -> Path:
    return Path(os.environ["FASTNCA_DATA"])  # set by tests/conftest.py: a real data directory or the fixture


def test_recorded_mnist_checksum_matches_the_data_written_as_amat():
    """The .amat digest recorded in the code is reproduced by this project's binarized_mnist.npz test split."""
    with np.load(_data_dir() / "binarized_mnist.npz") as f:
        rows = f["test"]
    text = "\n".join(" ".join(r) for r in np.where(rows > 0, "1", "0")) + "\n"
    assert len(text) == MNIST_FILES["test"].size, "expected the recorded byte size"
    assert hashlib.sha256(text.encode()).hexdigest() == MNIST_FILES["test"].sha256


def test_recorded_emoji_digest_matches_the_data_folder():
    """folder_digest is the documented sha256 of the ``sha256sum`` listing (checked here on its own terms), and on
    the real release it gives the recorded digest and count."""
    d = _data_dir()
    folder = d / "noto-emoji-v2.028" / "128"
    files = sorted(folder.glob("*.png"))
    listing = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in files)
    assert folder_digest(folder) == (hashlib.sha256(listing.encode()).hexdigest(), len(files))
    if not is_fixture(d):
        assert folder_digest(folder) == (EMOJI_FOLDER_SHA256, EMOJI_FILE_COUNT)


def test_cli_download_reports_a_bad_checksum(server, tmp_path, monkeypatch, capsys):
    server.files["/test.amat"] = b"1 0\n"
    bad = {"test": RemoteFile(f"{server.url}/test.amat", "binarized_mnist_test.amat", "f" * 64, 4)}
    monkeypatch.setattr(downloads, "MNIST_FILES", bad)
    assert main(["data", "--download", "--data-dir", str(tmp_path), "--datasets", "mnist"]) == 2
    err = capsys.readouterr().err
    got = hashlib.sha256(b"1 0\n").hexdigest()
    assert "binarized_mnist_test.amat" in err and "f" * 64 in err and got in err, err
    assert not (tmp_path / "binarized_mnist_test.amat").exists()


def test_emoji_archive_download_resumes_from_an_earlier_run(server, tmp_path):
    pngs = {"emoji_u0030.png": b"zero"}
    listing = "".join(f"{hashlib.sha256(v).hexdigest()}  {k}\n" for k, v in pngs.items())
    archive = _emoji_archive(pngs)
    server.files["/e.tar.gz"] = archive
    (tmp_path / ".noto-emoji-v2.028.tar.gz.part").write_bytes(archive[:100])  # left by an interrupted run
    download(tmp_path, ("emoji",), log=lambda m: None, progress=False, emoji_url=server.url + "/e.tar.gz",
             emoji_expected=(hashlib.sha256(listing.encode()).hexdigest(), 1))  # fmt: skip
    assert server.hits == [("/e.tar.gz", "bytes=100-")], f"expected one resumed request, got {server.hits}"
    assert [p.name for p in tmp_path.iterdir()] == ["noto-emoji-v2.028"], "expected the archive removed"
