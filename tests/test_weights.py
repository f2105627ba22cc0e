"""Finding, downloading (with resume) and verifying pretrained files, against a loopback HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from audiokd_lib.weights import WeightsFile, WeightsNotFound, fetch, search_dirs, sha256_of

PAYLOAD = bytes(range(256)) * 400  # 100 kB: several download chunks are not needed, a resume point is


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at /file.bin, honouring "Range: bytes=N-" unless the server says not to."""

    def do_GET(self) -> None:
        if self.path != "/file.bin":
            self.send_error(404)
            return
        self.server.ranges.append(self.headers.get("Range"))
        start = 0
        if self.server.supports_range and self.headers.get("Range", "").startswith("bytes="):
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
        body = PAYLOAD[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # keep the test output quiet
        pass


class Server:
    """A loopback server in a thread; `stop()` makes any later request fail to connect."""

    def __init__(self, supports_range: bool = True):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
        self.httpd.supports_range = supports_range
        self.httpd.ranges = []
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/file.bin"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()

    @property
    def ranges(self) -> list[str | None]:
        return self.httpd.ranges

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
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


def test_download_checks_hash_and_then_uses_the_cache(server: Server, cache: Path):
    wf = weights_file(server.url)
    path = fetch(wf, progress=False)
    assert path == cache / "file.bin" and path.read_bytes() == PAYLOAD
    assert sha256_of(path) == wf.sha256
    assert not (cache / "file.bin.part").exists()
    server.stop()
    assert fetch(wf, progress=False) == path  # no network needed the second time
    assert server.ranges == [None]


def test_wrong_hash_after_download_raises_and_leaves_nothing(server: Server, cache: Path):
    wf = weights_file(server.url, sha256="0" * 64)
    with pytest.raises(ValueError, match="0{64}") as err:
        fetch(wf, progress=False)
    assert server.url in str(err.value) and hashlib.sha256(PAYLOAD).hexdigest() in str(err.value)
    assert list(cache.iterdir()) == []


def test_corrupted_local_copy_is_refused_not_replaced(server: Server, cache: Path, tmp_path: Path):
    local = tmp_path / "mine"
    local.mkdir()
    (local / "file.bin").write_bytes(PAYLOAD[:-1] + b"x")
    wf = weights_file(server.url)
    with pytest.raises(ValueError, match="file.bin") as err:
        fetch(wf, weights_dir=local, progress=False)
    assert wf.sha256 in str(err.value) and sha256_of(local / "file.bin") in str(err.value)
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


def test_unreachable_server_raises_weights_not_found(server: Server, cache: Path):
    server.stop()
    with pytest.raises(WeightsNotFound, match="failed"):
        fetch(weights_file(server.url), progress=False, timeout=5)


def test_partial_download_resumes_with_range(server: Server, cache: Path):
    cache.mkdir()
    (cache / "file.bin.part").write_bytes(PAYLOAD[:30000])
    path = fetch(weights_file(server.url), progress=False)
    assert path.read_bytes() == PAYLOAD
    assert server.ranges == ["bytes=30000-"]


def test_stale_part_is_restarted_when_server_ignores_range(cache: Path):
    srv = Server(supports_range=False)
    try:
        cache.mkdir()
        (cache / "file.bin.part").write_bytes(b"stale bytes from another file")
        path = fetch(weights_file(srv.url), progress=False)
        assert path.read_bytes() == PAYLOAD and srv.ranges == ["bytes=29-"]
    finally:
        srv.stop()
