"""The onnxruntime runtime in the service and behind the Predictor: a real `openset serve` with
OPENSET_RUNTIME=onnxruntime on a demo export answers like the torch one, and the demo evaluation
scores are the same under both runtimes."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from models.demo.evaluate import EvalSettings, evaluate
from models.predictor import Predictor
from service.cli import main
from tests.service_helpers import image_bytes, start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo-onnx")
    assert main(["export", "onnx", "--model", "demo", "--out", str(out), "--dynamic"]) == 0
    return out


def _post(client, path: str, **fields) -> dict:  # noqa: ANN001
    body = {"image": base64.b64encode(image_bytes(seed=3)).decode(), **fields}
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _mask(segment: dict) -> np.ndarray:
    return mask_utils.decode({"size": segment["mask"]["size"], "counts": segment["mask"]["counts"].encode()})


def test_service_on_onnxruntime_answers_like_torch(demo_export: Path, tmp_path: Path) -> None:
    answers = {}
    for runtime, checkpoint in (("torch", None), ("onnxruntime", demo_export)):
        server = start_server(tmp_path, workers=1, runtime=runtime, checkpoint=checkpoint)
        try:
            with server.client() as client:
                (model,) = client.get("/v1/models").json()["models"]
                assert model["runtime"] == runtime
                answers[runtime] = {
                    task: _post(
                        client, "/v1/segment", vocabulary=["dark", "mid", "bright"], task=task, threshold=0.0
                    )
                    for task in ("panoptic", "semantic", "instance")
                }
                answers[runtime]["caption"] = _post(client, "/v1/caption")
                if runtime == "onnxruntime":  # beam search is torch-only: a clear 400, the server lives
                    body = {"image": base64.b64encode(image_bytes(seed=3)).decode(), "beams": 4}
                    refused = client.post("/v1/caption", json=body)
                    assert refused.status_code == 400, refused.text
                    assert refused.json()["error"]["code"] == "invalid_request"
                    assert "torch runtime" in refused.json()["error"]["message"]
                    assert client.get("/healthz").status_code == 200
                answers[runtime]["refer"] = _post(
                    client, "/v1/refer", phrase="the bright part", multi=True, threshold=0.0
                )
        finally:
            assert server.stop() == 0
    torch_answers, ort_answers = answers["torch"], answers["onnxruntime"]
    assert ort_answers["caption"]["caption"] == torch_answers["caption"]["caption"]
    for task in ("panoptic", "semantic", "instance"):
        want, got = torch_answers[task]["segments"], ort_answers[task]["segments"]
        assert want, task
        assert [s["label_index"] for s in got] == [s["label_index"] for s in want], task
        for a, b in zip(got, want, strict=True):
            assert abs(a["score"] - b["score"]) <= 1e-3
            union = np.logical_or(_mask(a), _mask(b)).sum()
            assert np.logical_and(_mask(a), _mask(b)).sum() >= 0.99 * union
    want, got = torch_answers["refer"]["matches"], ort_answers["refer"]["matches"]
    assert len(got) == len(want) > 0
    assert np.allclose([m["score"] for m in got], [m["score"] for m in want], atol=1e-3)


def test_demo_scores_are_the_same_under_onnxruntime(demo_export: Path) -> None:
    settings = EvalSettings(num_images=24, galleries=1, gallery_size=40, batch_size=8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        scores = {
            runtime: evaluate(Predictor.from_config("demo", checkpoint=checkpoint, runtime=runtime), settings)
            for runtime, checkpoint in (("torch", None), ("onnxruntime", demo_export))
        }
    finally:
        torch.set_num_threads(threads)
    assert set(scores["torch"]) == set(scores["onnxruntime"])
    for name, value in scores["torch"].items():
        assert abs(scores["onnxruntime"][name] - value) <= 0.005, (name, value, scores["onnxruntime"][name])
