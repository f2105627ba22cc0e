"""Finding, downloading (with resume) and verifying pretrained files, against a loopback HTTP server."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FileServer

from audiokd_lib.core.files import file_digest
from audiokd_lib.models.weights import WeightsFile, WeightsNotFound, fetch, search_dirs

PAYLOAD = bytes(range(256)) * 400  # 100 kB: several download chunks are not needed, a resume point is


@pytest.fixture
def server() -> Iterator[FileServer]:
    srv = FileServer({"/file.bin": PAYLOAD})
    yield srv
    if srv.thread.is_alive():
        srv.stop()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("AUDIOKD_CACHE", str(folder))
    monkeypatch.delenv("AUDIOKD_WEIGHTS", raising=False)
    return folder


def weights_file(url: str, sha256: str = hashlib.sha256(PAYLOAD).hexdigest()) -> WeightsFile:
    return WeightsFile("file.bin", url, sha256, "CC0", "a test server")


def test_download_checks_hash_and_then_uses_the_cache(server: FileServer, cache: Path):
    wf = weights_file(server.url("/file.bin"))
    path = fetch(wf, progress=False)
    assert path == cache / "file.bin" and path.read_bytes() == PAYLOAD
    assert file_digest(path) == wf.sha256
    assert not (cache / "file.bin.part").exists()
    server.stop()
    assert fetch(wf, progress=False) == path  # no network needed the second time
    assert server.ranges == [None]


def test_wrong_hash_after_download_raises_and_leaves_nothing(server: FileServer, cache: Path):
    wf = weights_file(server.url("/file.bin"), sha256="0" * 64)
    with pytest.raises(ValueError, match="0{64}") as err:
        fetch(wf, progress=False)
    assert server.url("/file.bin") in str(err.value) and hashlib.sha256(PAYLOAD).hexdigest() in str(err.value)
    assert list(cache.iterdir()) == []


def test_corrupted_local_copy_is_refused_not_replaced(server: FileServer, cache: Path, tmp_path: Path):
    local = tmp_path / "mine"
    local.mkdir()
    (local / "file.bin").write_bytes(PAYLOAD[:-1] + b"x")
    wf = weights_file(server.url("/file.bin"))
    with pytest.raises(ValueError, match="file.bin") as err:
        fetch(wf, weights_dir=local, progress=False)
    assert wf.sha256 in str(err.value) and file_digest(local / "file.bin") in str(err.value)
    assert (local / "file.bin").read_bytes().endswith(b"x") and server.ranges == []


def test_missing_without_download_names_folders_and_url(cache: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AUDIOKD_WEIGHTS", str(tmp_path / "env"))
    wf = weights_file("http://example.invalid/file.bin")
    assert search_dirs(tmp_path / "param") == [tmp_path / "param", tmp_path / "env", cache]
    with pytest.raises(WeightsNotFound) as err:
        fetch(wf, weights_dir=tmp_path / "param", download=False)
    message = str(err.value)
    for text in (tmp_path / "param", tmp_path / "env", cache, wf.url, "download=False", "AUDIOKD_WEIGHTS"):
        assert str(text) in message


def test_unreachable_server_raises_weights_not_found(server: FileServer, cache: Path):
    server.stop()
    with pytest.raises(WeightsNotFound, match="failed"):
        fetch(weights_file(server.url("/file.bin")), progress=False, timeout=5)


def test_partial_download_resumes_with_range(server: FileServer, cache: Path):
    cache.mkdir()
    (cache / "file.bin.part").write_bytes(PAYLOAD[:30000])
    path = fetch(weights_file(server.url("/file.bin")), progress=False)
    assert path.read_bytes() == PAYLOAD
    assert server.ranges == ["bytes=30000-"]


def test_stale_part_is_restarted_when_server_ignores_range(cache: Path):
    srv = FileServer({"/file.bin": PAYLOAD}, supports_range=False)
    try:
        cache.mkdir()
        (cache / "file.bin.part").write_bytes(b"stale bytes from another file")
        path = fetch(weights_file(srv.url("/file.bin")), progress=False)
        assert path.read_bytes() == PAYLOAD and srv.ranges == ["bytes=29-"]
    finally:
        srv.stop()
