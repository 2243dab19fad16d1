"""Parity with the official X-Decoder outputs: the golden Focal-T case through `models.reference_check`."""

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
def test_focalt_case_a(reference_root: Path, cache_dir: Path, capsys: pytest.CaptureFixture) -> None:
    case = reference_root / "xdecoder_focalt" / "case_a"
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
