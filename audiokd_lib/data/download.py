"""Fetching files over HTTP: resumable, checked, within a byte budget, and unpacked without escapes.

Three ways to read a remote file, one for each kind of archive the datasets come in:

- :func:`download` fetches a whole file into a ".part" file, resumes it with an HTTP Range request
  after an interruption, checks its length and hash, and only then renames it into place.
- :class:`ArchiveStream` reads a .tar.gz front to back and keeps what arrived in the same ".part"
  file, so a reader can stop as soon as it has the members it wants (tarfile's streaming mode
  `r|gz` never seeks back) and a later read resumes where the last one stopped. Only an archive
  read to its end can be checked against its md5.
- :class:`RangeFile` is a seekable file over HTTP Range requests: handed to `zipfile.ZipFile`, it
  fetches the central directory (the zip's table of contents, at its end) and then only the
  members asked for. zipfile checks each member's CRC-32 as it reads it.

Every byte that arrives is charged to a :class:`Ledger`, a small JSON file in the cache folder that
refuses, before starting, any download that would take the total past the budget.

An archive from the network is untrusted input: a member named "../../.bashrc", an absolute path,
a link pointing outside the target folder or a member claiming terabytes is refused, never written
(:func:`safe_tar_members`, :func:`zip_member_target`).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import stat
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from tqdm.auto import tqdm

from audiokd_lib.core.files import atomic_path, file_digest, write_json

CHUNK = 1 << 20  # bytes read at a time, for hashing and downloading


MAX_MEMBER_BYTES = 200_000_000  # no clip or metadata file of these datasets comes near 200 MB


MAX_ZIP_RATIO = 100  # audio barely compresses: a member inflating 100-fold is a zip bomb


BUDGET_HINT = ("ask for less (fewer classes or files_per_class under data.downloads.<dataset>) "
               "or raise data.downloads.budget_bytes")


class DownloadError(RuntimeError):
    """A download that failed or was refused, with what to do about it."""


class ChecksumError(DownloadError):
    """A file whose hash is not the published one."""


class BudgetExceeded(DownloadError):
    """A download that would take the bytes fetched into the cache past the budget."""


class UnsafeArchive(DownloadError):
    """An archive member that would land outside the target folder, be a link out of it, or is absurdly large."""


class RangeNotSupported(DownloadError):
    """A server that answers a Range request with the whole file."""


def megabytes(n: int) -> str:
    """A byte count for people: '12.3 MB' (MB = 1e6 bytes)."""
    return f"{n / 1e6:,.1f} MB"




class Ledger:
    """Bytes fetched into one cache folder, kept in a JSON file, against a budget."""

    def __init__(self, path: str | Path, budget: int):
        self.path = Path(path)
        self.budget = budget

    def _read(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.is_file() else {"bytes": 0, "by_source": {}}

    @property
    def spent(self) -> int:
        """Bytes fetched so far, all downloads into this cache together."""
        return int(self._read()["bytes"])

    @property
    def remaining(self) -> int:
        return max(0, self.budget - self.spent)

    def check(self, planned: int, what: str) -> None:
        """Refuse, before anything is fetched, a download of `planned` bytes that the budget cannot cover."""
        if planned > self.remaining:
            raise BudgetExceeded(
                f"{what} needs {megabytes(planned)}, but only {megabytes(self.remaining)} of the "
                f"{megabytes(self.budget)} budget is left ({megabytes(self.spent)} already fetched into "
                f"{self.path.parent}, see {self.path.name}). Nothing was downloaded: {BUDGET_HINT}."
            )

    def charge(self, nbytes: int, source: str) -> None:
        """Add `nbytes` fetched from `source` (a file name) to the ledger."""
        if nbytes:
            entry = self._read()
            entry["bytes"] += nbytes
            entry["by_source"][source] = entry["by_source"].get(source, 0) + nbytes
            write_json(self.path, entry)


def open_url(url: str, start: int = 0, end: int | None = None,
             timeout: float = 60) -> tuple[http.client.HTTPResponse, bool]:
    """Open `url` asking for bytes `start`..`end` (inclusive; None: to the end); say whether the server obliged (206)."""
    if start or end is not None:
        ask = f"bytes={start}-{'' if end is None else end}"
        try:
            response = urllib.request.urlopen(urllib.request.Request(url, headers={"Range": ask}), timeout=timeout)
        except urllib.error.HTTPError as err:
            if err.code != 416:  # 416: the range cannot be served (e.g. the .part is too long): start over
                raise
        else:
            return response, response.status == 206
    return urllib.request.urlopen(url, timeout=timeout), False


def _check_digest(path: Path, url: str, md5: str | None, sha256: str | None) -> None:
    """Delete `path` and raise if its hash is not the expected one (no expected hash: nothing to check)."""
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected:
            got = file_digest(path, algorithm)
            if got != expected:
                path.unlink()
                raise ChecksumError(
                    f"downloaded {url} but its {algorithm} is {got}, expected {expected}; the download was deleted. "
                    "Try again; if it repeats, the file at that URL has changed."
                )


def download(url: str, target: str | Path, *, md5: str | None = None, sha256: str | None = None,
             size: int | None = None, ledger: Ledger | None = None, progress: bool = True,
             timeout: float = 60) -> Path:
    """Download `url` to `target` through `target.part` (resumed where the server allows), check it, rename it.

    `size` (when known in advance, e.g. from the Zenodo record) lets the ledger refuse the download
    before it starts; without it the download stops at the budget. A connection that closes early
    keeps the .part for the next attempt; a hash mismatch deletes it. A `target` already there was
    checked when it arrived and is returned as it is.
    """
    target = Path(target)
    if target.is_file():
        return target
    part = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.is_file() else 0
    if ledger is not None and size is not None:
        ledger.check(max(size - offset, 0), target.name)
    limit = ledger.remaining if ledger is not None else None
    response, resumed = open_url(url, offset, timeout=timeout)
    received, expected = 0, None
    try:
        with response:
            offset = offset if resumed else 0
            length = response.headers.get("Content-Length")
            expected = int(length) if length else None
            total = offset + expected if expected is not None else size
            with (
                open(part, "ab" if resumed else "wb") as out,
                tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=target.name,
                     disable=not progress) as bar,
            ):
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                    if limit is not None and received > limit:
                        raise BudgetExceeded(
                            f"{target.name} passed the byte budget after {megabytes(received)} "
                            f"(the part is kept in {part}): {BUDGET_HINT}."
                        )
    finally:
        if ledger is not None:
            ledger.charge(received, target.name)
    if expected is not None and received < expected:
        raise DownloadError(
            f"{url}: the connection closed after {offset + received:,} of {offset + expected:,} bytes. "
            f"What arrived is kept in {part}: run again to resume."
        )
    _check_digest(part, url, md5, sha256)
    os.replace(part, target)  # atomic: the finished file appears whole or not at all
    return target


class ArchiveStream(io.RawIOBase):
    """Read a remote archive front to back, from its cached prefix first, keeping new bytes in the .part file.

    Used as `tarfile.open(fileobj=stream, mode="r|gz")`. Call :meth:`finish` once the archive's last
    member was read: it reads the rest, checks the md5 and renames the .part to `target`. Closing
    the stream (a `with` block) charges the bytes fetched to the ledger.
    """

    def __init__(self, url: str, target: str | Path, *, md5: str | None = None, size: int | None = None,
                 ledger: Ledger | None = None, progress: bool = True, timeout: float = 60):
        super().__init__()
        self.url, self.target, self.md5, self.timeout, self.ledger = url, Path(target), md5, timeout, ledger
        self.part = self.target.with_name(self.target.name + ".part")
        self.complete = self.target.is_file()  # read before, whole and checked
        if not self.complete:
            self.part.parent.mkdir(parents=True, exist_ok=True)
            self.part.touch()
        # Both files stay open across reads and are closed by close().
        self._local = open(self.target if self.complete else self.part, "rb")  # noqa: SIM115
        self._prefix = os.fstat(self._local.fileno()).st_size  # what the cache holds; the rest comes remotely
        self._response: http.client.HTTPResponse | None = None
        self._out: IO[bytes] | None = None
        self._expected: int | None = None
        self._received = 0
        self.fetched = 0  # bytes over the network in this read
        self.position = 0  # bytes of the archive read so far
        self._limit = ledger.remaining if ledger is not None else None
        self._bar = tqdm(total=size, unit="B", unit_scale=True, desc=self.target.name, disable=not progress)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._local.read(min(len(buffer), self._prefix - self._local.tell()))
        if not data and not self.complete:
            data = self._remote(len(buffer))
        buffer[: len(data)] = data
        self.position += len(data)
        self._bar.update(len(data))
        return len(data)

    def _connect(self) -> None:
        have = self.part.stat().st_size
        self._response, resumed = open_url(self.url, have, timeout=self.timeout)
        length = self._response.headers.get("Content-Length")
        self._expected = int(length) if length else None
        if not resumed and have:
            # The server sends the whole file again: skip what the .part already holds.
            skipped = len(self._response.read(have))
            self.fetched += skipped
            self._expected = None if self._expected is None else self._expected - skipped
        self._out = open(self.part, "ab")  # noqa: SIM115

    def _remote(self, n: int) -> bytes:
        if self._response is None:
            self._connect()
        data = self._response.read(n)
        if not data:
            if self._expected is not None and self._received < self._expected:
                raise DownloadError(
                    f"{self.url}: the connection closed {self._expected - self._received:,} bytes early. "
                    f"What arrived is kept in {self.part}: run again to resume."
                )
            return b""
        self._out.write(data)
        self._received += len(data)
        self.fetched += len(data)
        if self._limit is not None and self.fetched > self._limit:
            raise BudgetExceeded(
                f"reading {self.target.name} reached the byte budget after {megabytes(self.position + len(data))} "
                f"of the archive, before the subset was complete (the part is kept in {self.part} and resumed "
                f"next time): {BUDGET_HINT}."
            )
        return data

    def finish(self) -> bool:
        """Read to the archive's end; check its md5 and keep it as `target`. Return whether a hash was checked."""
        while self.read(CHUNK):
            pass
        if self.complete:
            return True
        self._close_files()
        _check_digest(self.part, self.url, self.md5, None)
        os.replace(self.part, self.target)
        self.complete = True
        return self.md5 is not None

    def _close_files(self) -> None:
        for handle in (self._local, self._out, self._response):
            if handle is not None:
                handle.close()

    def close(self) -> None:
        if not self.closed:
            self._close_files()
            self._bar.close()
            if self.ledger is not None:
                self.ledger.charge(self.fetched, self.target.name)
        super().close()


class RangeFile(io.RawIOBase):
    """A remote file opened for reading through HTTP Range requests: seekable, so zipfile reads only what it needs.

    `fetched` counts the bytes that came over the network. Reads near the end fetch a whole block
    (the end of central directory record, then the directory itself); :meth:`prefetch` fetches
    one member in a single request.
    """

    BLOCK = 1 << 16

    def __init__(self, url: str, ledger: Ledger | None = None, name: str = "", timeout: float = 60):
        super().__init__()
        self.url, self.ledger, self.name, self.timeout = url, ledger, name or url, timeout
        self.fetched = self.requests = 0
        self._buffer, self._start, self._pos = b"", 0, 0
        self.size = 1  # until the first answer says how large the file is
        self._fill(0, 1)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.size - self._pos)
        if n <= 0:
            return 0
        if not self._start <= self._pos <= self._pos + n <= self._start + len(self._buffer):
            end = min(self.size, self._pos + max(n, self.BLOCK))
            start = min(self._pos, max(0, end - self.BLOCK))  # near the end, take the whole last block
            self._fill(start, end - start)
        offset = self._pos - self._start
        buffer[:n] = self._buffer[offset: offset + n]
        self._pos += n
        return n

    def prefetch(self, start: int, length: int) -> None:
        """Fetch bytes start..start+length in one request, for the reads that follow."""
        self._fill(start, min(length, self.size - start))

    def _fill(self, start: int, length: int) -> None:
        """Fetch bytes start..start+length into the buffer, charging them to the ledger."""
        response, ranged = open_url(self.url, start, start + length - 1, self.timeout)
        with response:
            if not ranged:
                raise RangeNotSupported(f"{self.url}: the server does not answer Range requests")
            self.size = int(response.headers["Content-Range"].rsplit("/", 1)[1])
            try:
                data = response.read()
            except http.client.IncompleteRead as err:
                raise DownloadError(f"{self.url}: the connection closed during bytes {start:,}-{start + length - 1:,}; "
                                    "run again (members already extracted are kept)") from err
        self.fetched += len(data)
        self.requests += 1
        if self.ledger is not None:
            self.ledger.charge(len(data), self.name)
        self._buffer, self._start = data, start


def _refuse(archive: str, member: str, why: str, root: Path) -> UnsafeArchive:
    return UnsafeArchive(
        f"{archive}: member {member!r} is refused ({why}); nothing more is extracted from it into {root}. "
        "The official archive has no such member: the download is not the published one; delete it from the "
        "cache and try again, or report the mirror you used."
    )


def _inside(target: Path, root: Path, archive: str, member: str) -> Path:
    if not target.resolve().is_relative_to(root.resolve()):
        raise _refuse(archive, member, "it would be written outside the target folder", root)
    return target


def safe_tar_members(tar: tarfile.TarFile, root: str | Path, archive: str) -> Iterator[tarfile.TarInfo]:
    """Yield the regular files of a (streamed) tar archive, stopping at the first unsafe member with an error.

    Python's `data` extraction filter decides what is unsafe: absolute paths, '..' escapes, links
    pointing outside `root`, device files. Links that stay inside are allowed but never yielded.
    """
    root = Path(root)
    for member in tar:
        try:
            tarfile.data_filter(member, str(root))
        except tarfile.FilterError as err:
            raise _refuse(archive, member.name, str(err), root) from err
        if member.size > MAX_MEMBER_BYTES:
            raise _refuse(archive, member.name, f"it claims {megabytes(member.size)}", root)
        if member.isfile():
            yield member


def zip_member_target(info: zipfile.ZipInfo, root: str | Path, archive: str) -> Path:
    """Where a zip member is extracted under `root`; refuse escaping names, links and zip bombs."""
    root, name = Path(root), info.filename
    parts = PurePosixPath(name).parts
    if name.startswith("/") or "\\" in name or ".." in parts or (parts and ":" in parts[0]):
        raise _refuse(archive, name, "its path leaves the target folder", root)
    if stat.S_ISLNK(info.external_attr >> 16):
        raise _refuse(archive, name, "it is a symbolic link", root)
    bomb = info.file_size > MAX_ZIP_RATIO * info.compress_size and info.file_size > CHUNK
    if info.file_size > MAX_MEMBER_BYTES or bomb:
        raise _refuse(archive, name, f"it inflates {info.compress_size:,} bytes to {info.file_size:,}", root)
    return _inside(root / name, root, archive, name)


def write_member(source: IO[bytes], target: Path, root: str | Path, archive: str, member: str) -> Path:
    """Copy an opened archive member to `target` (atomically), which must lie inside `root`."""
    _inside(target, Path(root), archive, member)
    with atomic_path(target) as tmp, open(tmp, "wb") as out:
        shutil.copyfileobj(source, out, CHUNK)
    return target


def zip_span(info: zipfile.ZipInfo) -> int:
    """Bytes a member occupies in the archive: local header, name, extra field, data (plus slack for a longer extra)."""
    return 30 + len(info.filename.encode()) + len(info.extra) + info.compress_size + 64


def _intact(target: Path, info: zipfile.ZipInfo) -> bool:
    """Whether `target` already holds this member (same size and CRC-32), so it need not be fetched again."""
    if not target.is_file() or target.stat().st_size != info.file_size:
        return False
    crc = 0
    with open(target, "rb") as handle:
        while chunk := handle.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc == info.CRC


def extract_zip_members(zf: zipfile.ZipFile, members: list[zipfile.ZipInfo], root: str | Path, archive: str,
                        remote: RangeFile | None = None, ledger: Ledger | None = None, progress: bool = True) -> None:
    """Extract `members` of an open zip under `root`; members already there intact are skipped.

    With `remote` (the zip read over HTTP) the bytes still to fetch are checked against the ledger
    first, then each member comes in one Range request.
    """
    root = Path(root)
    todo = [info for info in members if not _intact(zip_member_target(info, root, archive), info)]
    if remote is not None and ledger is not None:
        ledger.check(sum(zip_span(info) for info in todo), f"{len(todo)} files from {archive}")
    for info in tqdm(sorted(todo, key=lambda i: i.header_offset), desc=archive, unit="file",
                     disable=not progress or len(todo) < 2):
        if remote is not None:
            remote.prefetch(info.header_offset, zip_span(info))
        try:
            with zf.open(info) as source:
                write_member(source, root / info.filename, root, archive, info.filename)
        except zipfile.BadZipFile as err:  # zipfile checks each member's CRC-32 as it reads it
            raise ChecksumError(f"{archive}: {info.filename} is damaged ({err}); run again to fetch it anew") from err
