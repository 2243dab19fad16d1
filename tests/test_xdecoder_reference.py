"""Parity with the official X-Decoder outputs: the golden cases through `models.reference_check`."""

from __future__ import annotations

from pathlib import Path

import pytest

from models import reference_check
from models.reference_check import detect_config, manifest_shapes


def test_config_detection(reference_root: Path) -> None:
    assert (
        detect_config(manifest_shapes(reference_root / "xdecoder_focalt" / "keys.json")) == "xdecoder-focalt"
    )
    assert (
        detect_config(manifest_shapes(reference_root / "xdecoder_focall" / "keys.json")) == "xdecoder-focall"
    )


@pytest.mark.slow
@pytest.mark.parametrize("model", ["xdecoder_focalt", "xdecoder_focall"])
def test_golden_case_a(
    model: str, reference_root: Path, cache_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """Every array of every task of case_a within its tolerance (Focal-L: about 1.4 GB of weights)."""
    case = reference_root / model / "case_a"
    keys = case.parent / "keys.json"
    checkpoint = reference_check.reference_checkpoint(keys, cache_dir)
    status = reference_check.main([str(case), "--checkpoint", str(checkpoint)])
    out = capsys.readouterr().out
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
