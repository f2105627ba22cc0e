"""Shared fixtures: a profile whose outputs go to a temporary folder, tiny students, a loopback HTTP server."""

from __future__ import annotations

import http.server
import os
import threading
import urllib.parse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Kernels and torch in the tests behave as in `make`: no OpenMP spin-waiting, no GUI backend.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MPLBACKEND", "Agg")


def write_profile(folder: Path, text: str, name: str = "profile") -> Path:
    """Write a params file into `folder` and return its path."""
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def smoke_chain(tmp_path_factory) -> tuple[Path, list]:
    """(profile, executed notebooks): one papermill run of the whole chain on the smoke profile, shared by
    the tests of what it leaves behind (and, as the uninterrupted reference, by the killed-chain test)."""
    from audiokd_lib.experiment.pipeline import run_notebooks

    folder = tmp_path_factory.mktemp("smoke")
    profile = write_profile(folder, f"extends: {ROOT / 'params' / 'smoke.yaml'}\noutputs: {folder / 'outputs'}\n",
                            "smoke")
    return profile, run_notebooks(profile, log=lambda *_: None)


@pytest.fixture
def smoke_profile(tmp_path: Path) -> Path:
    """The smoke profile with its outputs redirected into tmp_path."""
    return write_profile(tmp_path, f"extends: {ROOT / 'params' / 'smoke.yaml'}\noutputs: {tmp_path / 'outputs'}\n", "smoke")


@pytest.fixture
def tiny(smoke_profile):
    """(params, classes, stats, data): a smoke-profile student's settings on 4 classes, and a synthetic,
    learnable feature set of 64 clips."""
    import torch

    from audiokd_lib.audio.features import NormStats
    from audiokd_lib.core.params import load_params
    from audiokd_lib.training import FeatureSet

    params = load_params(smoke_profile)
    # 32 steps in all: BatchNorm's running statistics must follow fast to be usable in eval mode.
    params = params.model_copy(update={"student": params.student.model_copy(update={"bn_momentum": 0.5})})
    classes = ["a", "b", "c", "d"]
    stats = NormStats(torch.full((128,), -5.0), torch.full((128,), 2.0), 1, [], "f", "d")
    gen = torch.Generator().manual_seed(1)
    targets = torch.arange(64) % 4
    feats = torch.randn(64, 1, 128, 40, generator=gen) - 6
    for c in range(4):  # each class lights its own band of mel bins
        feats[targets == c, :, 30 * c:30 * c + 20, :] += 4
    data = FeatureSet(feats, targets, [f"clip{i}" for i in range(64)], classes, "fp")
    return params, classes, stats, data


@pytest.fixture(scope="session")
def tiny_student():
    """Build an untrained student of the smoke profile, in eval mode: `tiny_student(classes, seed=0, **student)`.

    Keywords other than `seed` and `multilabel` override the profile's `student` section (`width_mult=1.0`,
    `arch="mobilenet_v2"`). Its normalisation is a fixed, plausible one for log-mels, not measured.
    """
    # Imported here: OpenMP reads OMP_WAIT_POLICY when torch loads, so torch must load after it is set above.
    import torch

    from audiokd_lib.audio.features import NormStats
    from audiokd_lib.core.params import load_params
    from audiokd_lib.models import students

    smoke = load_params(ROOT / "params" / "smoke.yaml")
    n_mels = smoke.features.n_mels
    stats = NormStats(torch.full((n_mels,), -6.0), torch.full((n_mels,), 3.0), 1, [], "f", "d")

    def build(classes=("a", "b", "c"), seed: int | None = 0, multilabel: bool = False, **student):
        params = smoke.model_copy(update={"student": smoke.student.model_copy(update=student)})
        return students.build_student(params, list(classes), stats, multilabel=multilabel, seed=seed).eval()

    return build


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves the server's files, honouring "Range: bytes=a-b", "a-" and "-n" unless told not to."""

    def do_GET(self) -> None:
        server: FileServer = self.server.owner
        path = urllib.parse.urlsplit(self.path).path  # Zenodo's "?download=1" changes nothing
        server.requests.append((path, self.headers.get("Range")))
        if path not in server.files:
            self.send_error(404)
            return
        body, ask = server.files[path], self.headers.get("Range", "")
        start, end = 0, len(body) - 1
        ranged = server.supports_range and ask.startswith("bytes=")
        if ranged:
            first, _, last = ask.removeprefix("bytes=").partition("-")
            start, end = (len(body) - int(last), end) if not first else (int(first), int(last) if last else end)
            if start >= len(body):
                self.send_error(416)
                return
            end = min(end, len(body) - 1)
        part = body[start:end + 1]
        self.send_response(206 if ranged else 200)
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
        self.send_header("Content-Length", str(len(part)))
        self.end_headers()
        cut = server.cut_after.pop(path, None)  # one-shot: the next request for this file is cut
        sent = part if cut is None else part[:cut]
        self.wfile.write(sent)
        server.sent[path] = server.sent.get(path, 0) + len(sent)

    def log_message(self, *args) -> None:  # keep the test output quiet
        pass


class FileServer:
    """Files (URL path -> bytes) served on 127.0.0.1 from a thread; `stop()` makes later requests fail.

    It records every request (path, Range header) and the body bytes sent per path; `cut_after[path]
    = n` closes the next answer for that path after n body bytes, like a dropped connection.
    """

    def __init__(self, files: dict[str, bytes] | None = None, supports_range: bool = True):
        self.files = dict(files or {})
        self.supports_range = supports_range
        self.requests: list[tuple[str, str | None]] = []
        self.sent: dict[str, int] = {}
        self.cut_after: dict[str, int] = {}
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
        self.httpd.owner = self
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return self.base + path

    @property
    def ranges(self) -> list[str | None]:
        """The Range header of every request, in order (None: none asked)."""
        return [ask for _, ask in self.requests]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()
