"""Shared fixtures: a profile whose outputs go to a temporary folder."""

from __future__ import annotations

import os
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


@pytest.fixture
def smoke_profile(tmp_path: Path) -> Path:
    """The smoke profile with its outputs redirected into tmp_path."""
    return write_profile(tmp_path, f"extends: {ROOT / 'params' / 'smoke.yaml'}\noutputs: {tmp_path / 'outputs'}\n", "smoke")
