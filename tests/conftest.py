"""Shared pytest fixtures: where the golden reference data lives and where generated files go."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_reference_root() -> Path:
    """The folder with the golden reference cases (`xdecoder_focalt/`, `ms_deform_attn/`, ...).

    Looked up in `OPENSET_REFERENCE_DIR`, then `../shared/reference` next to the repository, then
    `/work/shared/reference`. A missing folder is an error, not a skip: the parity tests are the
    proof that the models are faithful.
    """
    candidates = [
        os.environ.get("OPENSET_REFERENCE_DIR"),
        str(REPO_ROOT.parent / "shared" / "reference"),
        "/work/shared/reference",
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "xdecoder_focalt").is_dir():
            return Path(candidate)
    raise FileNotFoundError(
        "golden reference data not found; set OPENSET_REFERENCE_DIR to the folder holding "
        "xdecoder_focalt/ and ms_deform_attn/"
    )


@pytest.fixture(scope="session")
def reference_root() -> Path:
    return find_reference_root()


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """Generated files (reference checkpoints, exports) shared between test runs; git-ignored."""
    path = Path(os.environ.get("OPENSET_TEST_CACHE", REPO_ROOT / ".cache" / "tests"))
    path.mkdir(parents=True, exist_ok=True)
    return path
