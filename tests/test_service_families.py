"""The REST API on the other model families, each on a real server with its untrained miniature:
OpenSeeD (box head: /v1/detect, box-head boxes in segments, batches grouped by vocabulary) and
Mask2Former (closed vocabulary: names outside the label set are a 400 naming the valid ones)."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.service_helpers import image_bytes, metric, start_server

pytestmark = pytest.mark.slow

WIDTH, HEIGHT = 96, 64


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def openseed(tmp_path_factory):
    process = start_server(
        tmp_path_factory.mktemp("openseed"),
        model="openseed-tiny",
        workers=1,
        max_batch_size=8,
        max_batch_delay_ms=400,
    )
    yield process
    assert process.stop() == 0


@pytest.fixture(scope="module")
def mask2former(tmp_path_factory):
    process = start_server(
        tmp_path_factory.mktemp("mask2former"), model="mask2former-tiny-coco-panoptic", workers=1
    )
    yield process
    assert process.stop() == 0


def detect(client, vocabulary: list[str], **fields):
    body = {"image": b64(image_bytes(WIDTH, HEIGHT)), "vocabulary": vocabulary, **fields}
    return client.post("/v1/detect", json=body)


# -- OpenSeeD ---------------------------------------------------------------------------------------


def test_openseed_models_lists_its_tasks_and_box_head(openseed):
    with openseed.client() as client:
        model = client.get("/v1/models").json()["models"][0]
    assert model["name"] == "openseed-tiny"
    assert set(model["tasks"]) == {"semantic", "instance", "panoptic", "detect"}
    assert model["info"]["box_head"] is True and model["info"]["vocabulary_in_decoder"] is True


def test_detect_returns_ranked_boxes_inside_the_image(openseed):
    vocabulary = ["red circle", "blue square", "sky"]
    with openseed.client() as client:
        response = detect(client, vocabulary, max_detections=7)
        alias = client.post(
            "/detect", json={"image": b64(image_bytes(WIDTH, HEIGHT)), "vocabulary": vocabulary}
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "openseed-tiny"
    assert body["image"] == {"width": WIDTH, "height": HEIGHT}
    detections = body["detections"]
    assert 1 <= len(detections) <= 7
    scores = [d["score"] for d in detections]
    assert scores == sorted(scores, reverse=True)
    for d in detections:
        assert d["label"] == vocabulary[d["label_index"]]
        x, y, w, h = d["bbox"]
        assert x >= 0 and y >= 0 and w >= 0 and h >= 0
        assert x + w <= WIDTH + 1e-6 and y + h <= HEIGHT + 1e-6
        assert "mask" not in d
    assert alias.status_code == 200 and len(alias.json()["detections"]) <= 100


def test_detect_threshold_drops_low_scores(openseed):
    with openseed.client() as client:
        everything = detect(client, ["cat", "dog"]).json()["detections"]
        cut = sorted(d["score"] for d in everything)[len(everything) // 2]
        kept = detect(client, ["cat", "dog"], threshold=cut).json()["detections"]
    assert kept and all(d["score"] > cut for d in kept)
    assert len(kept) < len(everything)


def test_openseed_instance_segments_carry_box_head_boxes(openseed):
    body = {
        "image": b64(image_bytes(WIDTH, HEIGHT)),
        "vocabulary": ["cat", "dog"],
        "task": "instance",
        "threshold": 0.0,
    }
    with openseed.client() as client:
        response = client.post("/v1/segment", json=body)
    assert response.status_code == 200, response.text
    segments = response.json()["segments"]
    assert segments
    # Box-head boxes are sub-pixel; mask boxes are whole pixels.
    assert any(any(v != int(v) for v in s["bbox"]) for s in segments)
    for s in segments:
        x, y, w, h = s["bbox"]
        assert 0 <= x <= WIDTH and 0 <= y <= HEIGHT and x + w <= WIDTH + 1e-6 and y + h <= HEIGHT + 1e-6


@pytest.mark.parametrize(
    ("path", "fields"),
    [
        ("/v1/caption", {"image": True}),
        ("/v1/refer", {"image": True, "phrase": "the cat"}),
        ("/v1/retrieve", {"images": True, "texts": ["a cat"]}),
        ("/v1/embed", {"texts": ["a cat"]}),
    ],
)
def test_tasks_the_model_does_not_serve_are_a_400(openseed, path, fields):
    image = b64(image_bytes(WIDTH, HEIGHT))
    body = {key: image if key == "image" else [image] if key == "images" else v for key, v in fields.items()}
    with openseed.client() as client:
        response = client.post(path, json=body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "unsupported_task"
        assert "detect" in response.json()["error"]["message"]
        assert client.get("/healthz").status_code == 200


def test_openseed_requests_with_different_vocabularies_share_a_batch(openseed):
    """Query selection depends on the vocabulary, yet requests with different vocabularies share a
    batch (the backbone and pixel decoder run once, the decoder once per vocabulary) and each gets
    the answer it gets alone."""
    vocabularies = [["cat", "dog"], ["car", "tree"], ["cat", "dog"], ["car", "tree"]]
    with openseed.client() as client:
        alone = {tuple(v): detect(client, v).json()["detections"] for v in vocabularies[:2]}
    before = openseed.metrics()

    def call(vocabulary):
        with openseed.client() as client:
            return detect(client, vocabulary).json()["detections"]

    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(call, vocabularies))
    after = openseed.metrics()
    count = metric(after, "openset_batch_size_count", task="detect") - metric(
        before, "openset_batch_size_count", task="detect"
    )
    total = metric(after, "openset_batch_size_sum", task="detect") - metric(
        before, "openset_batch_size_sum", task="detect"
    )
    assert total == 4 and count < 4, (count, total)  # at least one batch mixed several requests
    for vocabulary, detections in zip(vocabularies, together, strict=True):
        expected = alone[tuple(vocabulary)]
        assert sorted(d["label"] for d in detections) == sorted(d["label"] for d in expected)
        assert [d["score"] for d in detections] == pytest.approx([d["score"] for d in expected], abs=1e-4)


# -- Mask2Former --------------------------------------------------------------------------------------


def test_mask2former_segments_within_its_label_set(mask2former):
    body = {
        "image": b64(image_bytes(WIDTH, HEIGHT)),
        "vocabulary": ["person", "dog", "sky"],
        "task": "semantic",
    }
    with mask2former.client() as client:
        model = client.get("/v1/models").json()["models"][0]
        response = client.post("/v1/segment", json=body)
    assert model["info"]["label_set"][:3] == ["person", "bicycle", "car"]
    assert len(model["info"]["label_set"]) == 133
    assert response.status_code == 200, response.text
    segments = response.json()["segments"]
    assert segments and {s["label"] for s in segments} <= {"person", "dog", "sky"}


def test_mask2former_unknown_class_is_a_400_naming_the_valid_ones(mask2former):
    body = {"image": b64(image_bytes(WIDTH, HEIGHT)), "vocabulary": ["person", "unicorn"]}
    with mask2former.client() as client:
        response = client.post("/v1/segment", json=body)
        detect_response = detect(client, ["person"])
        assert client.get("/healthz").status_code == 200
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "unknown_class"
    assert "unicorn" in error["message"] and "person" in error["message"] and "toothbrush" in error["message"]
    assert detect_response.status_code == 400
    assert detect_response.json()["error"]["code"] == "unsupported_task"
