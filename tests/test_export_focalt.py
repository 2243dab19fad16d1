"""X-Decoder Focal-T through ONNX: `openset export onnx` at the captioning / retrieval size, then
`openset export verify` against torch and against the golden case (captions and retrieval)."""

from __future__ import annotations

from pathlib import Path

import pytest

from models import reference_check
from service.cli import main


@pytest.mark.slow
def test_focalt_export_matches_torch_and_the_golden_case(
    reference_root: Path, cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    case = reference_root / "xdecoder_focalt" / "case_a"
    checkpoint = reference_check.reference_checkpoint(case.parent / "keys.json", cache_dir)
    out = tmp_path / "focalt"
    export = ["export", "onnx", "--model", "xdecoder-focalt", "--checkpoint", str(checkpoint)]
    assert main([*export, "--out", str(out), "--size", "224x224"]) == 0
    capsys.readouterr()
    assert main(["export", "verify", str(out), "--reference", str(case)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.endswith(("PASS", "FAIL"))]
    assert lines and all(line.endswith("PASS") for line in lines)
    names = {line.split()[0] for line in lines}
    for name in (
        "segment_decoder:class_logits@224x224",
        "grounding_decoder:masks@224x224",
        "caption_step:logits@224x224",
        "text_encoder:eos_features",
        "captioning:captioning.final_tokens",
        "retrieval:final.pred_captions",
        "retrieval:retrieval.scores",
    ):
        assert name in names, name
