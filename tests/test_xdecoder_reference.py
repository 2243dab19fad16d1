"""Parity with the official X-Decoder outputs: the golden cases through `models.reference_check`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from models import reference_check
from models.reference_check import detect_config, manifest_shapes
from tests.conftest import REPO_ROOT


def test_config_detection(reference_root: Path) -> None:
    assert (
        detect_config(manifest_shapes(reference_root / "xdecoder_focalt" / "keys.json")) == "xdecoder-focalt"
    )
    assert (
        detect_config(manifest_shapes(reference_root / "xdecoder_focall" / "keys.json")) == "xdecoder-focall"
    )


@pytest.mark.slow
@pytest.mark.parametrize("model", ["xdecoder_focalt", "xdecoder_focall"])
def test_golden_case_a(model: str, reference_root: Path, cache_dir: Path) -> None:
    """Every array of every task of case_a within its tolerance (Focal-L: about 1.4 GB of weights).

    The check runs as a user runs it, in a fresh process: torch's thread count (which earlier tests
    may have changed in this process) moves which near-zero attention-mask logits flip sign.
    """
    case = reference_root / model / "case_a"
    keys = case.parent / "keys.json"
    checkpoint = reference_check.reference_checkpoint(keys, cache_dir)
    result = subprocess.run(
        [sys.executable, "-m", "models.reference_check", str(case), "--checkpoint", str(checkpoint)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    status, out = result.returncode, result.stdout
    lines = [line for line in out.splitlines() if line.endswith(("PASS", "FAIL"))]
    failed = [line for line in lines if line.endswith("FAIL")]
    assert not failed, "\n".join(failed)
    assert status == 0
    # every task of the case was compared, with the task outputs among them
    for name in (
        "seg:post.sem_seg",
        "grounding:grounding.mask_binary",
        "captioning:captioning.final_tokens",
        "retrieval:retrieval.scores",
        "postproc:panoptic_segments_info",
    ):
        assert any(line.startswith(name + " ") for line in lines), name
    assert len(lines) > 150
