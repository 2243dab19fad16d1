"""The REST API of a real server (worker process, Redis): every endpoint, mask formats, errors, batching,
the text-embedding cache, and survival when Redis dies."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import redis
from PIL import Image
from pycocotools import mask as mask_utils

from tests.service_helpers import image_bytes, metric, start_redis, start_server

API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
LIMITS = {
    "max_upload_bytes": 300_000,
    "max_image_pixels": 200 * 200,
    "max_vocabulary": 20,
    "max_text_length": 40,
    "max_retrieve_items": 3,
}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def redis_server():
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(redis_server, tmp_path_factory):
    process = start_server(
        tmp_path_factory.mktemp("api"),
        workers=1,
        max_batch_size=8,
        max_batch_delay_ms=50,
        api_key=API_KEY,
        redis_url=redis_server.url,
        **LIMITS,
    )
    yield process
    assert process.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    with server.client(headers=AUTH) as client:
        yield client


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def segment(client, vocabulary, **fields):
    """POST /v1/segment; threshold 0 so that every image gives segments whatever the weights."""
    body = {"image": b64(image_bytes()), "vocabulary": vocabulary, "threshold": 0.0, **fields}
    return client.post("/v1/segment", json=body)


# -- endpoints -------------------------------------------------------------------------------------


def test_probes_and_models(server, client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    models = client.get("/v1/models").json()["models"]
    assert [model["name"] for model in models] == ["demo"]
    assert models[0]["model_id"] and models[0]["workers"] == 1
    assert {"panoptic", "refer", "caption"} <= set(models[0]["tasks"])
    assert models[0]["runtime"] == "torch" and models[0]["device"] == "cpu"


def test_segment_json_rle_matches_boxes_and_areas(client):
    response = segment(client, ["dark", "mid", "bright"], task="panoptic")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "demo" and body["task"] == "panoptic"
    assert body["image"] == {"width": 96, "height": 64}
    assert body["segments"], body
    for seg in body["segments"]:
        assert seg["label"] == ["dark", "mid", "bright"][seg["label_index"]]
        mask = mask_utils.decode({"size": seg["mask"]["size"], "counts": seg["mask"]["counts"].encode()})
        assert mask.shape == (64, 96)
        assert int(mask.sum()) == seg["area"] > 0
        ys, xs = np.nonzero(mask)
        assert seg["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    timings = body["timings_ms"]
    assert timings["total"] >= timings["worker"] >= timings["inference"] > 0


@pytest.mark.parametrize("task", ["semantic", "instance"])
def test_segment_tasks(client, task):
    response = segment(client, "dark, mid, bright", task=task)
    assert response.status_code == 200, response.text
    assert response.json()["task"] == task


def test_segment_multipart_png_and_polygon_agree_with_rle(client):
    files = {"image": ("image.png", image_bytes(), "image/png")}
    results = {}
    for mask_format in ("rle", "png", "polygon"):
        data = {
            "vocabulary": '["dark", "mid", "bright"]',
            "mask_format": mask_format,
            "stuff": "mid",
            "task": "instance",
            "threshold": "0",
        }
        response = client.post("/v1/segment", data=data, files=files)
        assert response.status_code == 200, response.text
        results[mask_format] = response.json()["segments"]
    assert [s["area"] for s in results["png"]] == [s["area"] for s in results["rle"]]
    for rle, png, polygon in zip(results["rle"], results["png"], results["polygon"], strict=True):
        mask = mask_utils.decode({"size": rle["mask"]["size"], "counts": rle["mask"]["counts"].encode()})
        decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(png["mask"])))) > 0
        assert np.array_equal(decoded, mask.astype(bool))
        drawn = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon["mask"], 64, 96)))
        assert (drawn & mask).sum() / mask.sum() > 0.9  # outlines cover the mask (holes are not drawn)
    assert all(seg["isthing"] == (seg["label"] != "mid") for seg in results["rle"])


def test_refer_best_and_multi(client):
    files = {"image": ("image.png", image_bytes(), "image/png")}
    best = client.post("/v1/refer", data={"phrase": "the bright part"}, files=files)
    assert best.status_code == 200, best.text
    assert best.json()["phrase"] == "the bright part"
    assert len(best.json()["matches"]) <= 1
    multi = client.post("/v1/refer", json={"image": b64(image_bytes()), "phrase": "a region", "multi": True})
    assert multi.status_code == 200, multi.text
    for match in multi.json()["matches"]:
        assert set(match) == {"score", "bbox", "area", "mask"} and len(match["bbox"]) == 4


def test_caption(client):
    response = client.post(
        "/v1/caption", files={"image": ("i.jpg", image_bytes(image_format="JPEG"), "image/jpeg")}
    )
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["caption"], str) and response.json()["caption"].strip()


def test_caption_with_beams_json_and_multipart(client):
    image = image_bytes(seed=4)
    as_json = client.post("/v1/caption", json={"image": b64(image), "beams": 4})
    as_form = client.post("/v1/caption", files={"image": ("i.png", image, "image/png")}, data={"beams": "4"})
    assert as_json.status_code == 200, as_json.text
    assert as_form.status_code == 200, as_form.text
    assert as_json.json()["caption"].strip()
    assert as_json.json()["caption"] == as_form.json()["caption"]


def test_retrieve_json_and_multipart(client):
    images = [image_bytes(seed=1), image_bytes(80, 80, seed=2)]
    texts = ["a dark region", "a bright region", "stripes"]
    response = client.post("/v1/retrieve", json={"images": [b64(i) for i in images], "texts": texts})
    assert response.status_code == 200, response.text
    body = response.json()
    scores = np.asarray(body["scores"])
    assert scores.shape == (2, 3)
    assert body["image_to_text"] == np.argsort(-scores, axis=1, kind="stable").tolist()
    assert body["text_to_image"] == np.argsort(-scores, axis=0, kind="stable").T.tolist()
    files = [("images", ("a.png", images[0], "image/png")), ("images", ("b.png", images[1], "image/png"))]
    multipart = client.post("/v1/retrieve", data={"texts": texts}, files=files)
    assert multipart.status_code == 200, multipart.text
    assert np.allclose(multipart.json()["scores"], scores, atol=1e-4)


def test_embed_texts_and_images(client):
    texts = client.post("/v1/embed", json={"texts": ["a dog", "a cat"]})
    assert texts.status_code == 200, texts.text
    vectors = np.asarray(texts.json()["embeddings"])
    assert vectors.shape[0] == 2 and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)
    images = client.post("/v1/embed", json={"images": [b64(image_bytes())]})
    assert images.status_code == 200, images.text
    assert len(images.json()["embeddings"]) == 1


def test_aliases_answer_like_v1(client):
    alias = client.post("/embed", json={"texts": ["a red square"]})
    assert alias.status_code == 200, alias.text
    versioned = client.post("/v1/embed", json={"texts": ["a red square"]})
    assert alias.json()["embeddings"] == versioned.json()["embeddings"]
    body = {"image": b64(image_bytes()), "vocabulary": ["a", "b"], "task": "instance", "threshold": 0.0}
    segment = client.post("/segment", json=body)
    assert segment.status_code == 200 and segment.json()["segments"]


def test_openapi_documents_routes_bodies_and_aliases(client):
    document = client.get("/openapi.json").json()
    for name in ("segment", "refer", "caption", "retrieve", "embed"):
        operation = document["paths"][f"/v1/{name}"]["post"]
        content = operation["requestBody"]["content"]
        assert {"application/json", "multipart/form-data"} <= set(content)
        assert "example" in content["application/json"]
        assert {"200", "400", "413", "415", "422", "429", "503", "504"} <= set(operation["responses"])
        alias = document["paths"][f"/{name}"]["post"]
        assert alias["summary"] == f"Alias of POST /v1/{name}"
    segment_body = document["paths"]["/v1/segment"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert segment_body["schema"]["properties"]["image"]["format"] == "binary"
    assert set(segment_body["schema"]["properties"]["mask_format"]["enum"]) == {"rle", "png", "polygon"}
    assert {"/v1/models", "/healthz", "/readyz", "/metrics"} <= set(document["paths"])


def test_request_id_is_honoured_or_generated(server, client):
    given = client.get("/v1/models", headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    generated = client.get("/v1/models")
    assert len(generated.headers["x-request-id"]) >= 16
    response = client.post(
        "/v1/embed", headers={"X-Request-ID": "trace-42"}, json={"images": [b64(image_bytes())]}
    )
    assert response.status_code == 200
    lines = [json.loads(line) for line in server.logs().splitlines() if '"trace-42"' in line]
    assert lines and lines[-1]["endpoint"] == "/v1/embed" and lines[-1]["batch_size"] >= 1
    assert lines[-1]["timings_ms"]["worker"] > 0
    assert b64(image_bytes())[-64:] not in server.logs()  # no image data in logs


# -- errors ----------------------------------------------------------------------------------------


def huge_png() -> bytes:
    """A 300x300 image: a few hundred bytes, over the 200x200 pixel limit."""
    buffer = io.BytesIO()
    Image.new("RGB", (300, 300)).save(buffer, format="PNG")
    return buffer.getvalue()


def gif_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20)).save(buffer, format="GIF")
    return buffer.getvalue()


BAD_INPUTS = [
    ("upload_too_large", "/v1/caption", {"json": {"image": b64(b"x" * 400_000)}}, 413, "payload_too_large"),
    ("too_many_pixels", "/v1/caption", {"json": {"image": b64(huge_png())}}, 413, "too_many_pixels"),
    (
        "corrupt_image",
        "/v1/caption",
        {"json": {"image": b64(b"\x89PNG\r\n\x1a\nbroken")}},
        400,
        "invalid_image",
    ),
    ("truncated_image", "/v1/caption", {"json": {"image": b64(image_bytes()[:200])}}, 400, "invalid_image"),
    ("gif_image", "/v1/caption", {"json": {"image": b64(gif_bytes())}}, 415, "unsupported_image_format"),
    ("bad_base64", "/v1/caption", {"json": {"image": "not base64!"}}, 400, "invalid_base64"),
    (
        "wrong_media_type",
        "/v1/caption",
        {"content": b"hello", "headers": {"Content-Type": "text/plain"}},
        415,
        "unsupported_media_type",
    ),
    (
        "bad_json",
        "/v1/caption",
        {"content": b"{", "headers": {"Content-Type": "application/json"}},
        400,
        "invalid_json",
    ),
    (
        "empty_vocabulary",
        "/v1/segment",
        {"json": {"image": b64(image_bytes()), "vocabulary": []}},
        400,
        "invalid_vocabulary",
    ),
    (
        "too_many_classes",
        "/v1/segment",
        {"json": {"image": b64(image_bytes()), "vocabulary": [f"c{i}" for i in range(21)]}},
        400,
        "invalid_vocabulary",
    ),
    (
        "class_name_too_long",
        "/v1/segment",
        {"json": {"image": b64(image_bytes()), "vocabulary": ["x" * 41]}},
        400,
        "class_name_too_long",
    ),
    (
        "vocabulary_not_strings",
        "/v1/segment",
        {"json": {"image": b64(image_bytes()), "vocabulary": [1, {}]}},
        422,
        "validation_error",
    ),
    (
        "stuff_not_in_vocabulary",
        "/v1/segment",
        {"json": {"image": b64(image_bytes()), "vocabulary": ["a"], "stuff": ["b"]}},
        400,
        "invalid_stuff",
    ),
    (
        "phrase_too_long",
        "/v1/refer",
        {"json": {"image": b64(image_bytes()), "phrase": "y" * 41}},
        400,
        "phrase_too_long",
    ),
    (
        "too_many_retrieve_images",
        "/v1/retrieve",
        {"json": {"images": [b64(image_bytes())] * 4, "texts": ["a"]}},
        400,
        "too_many_items",
    ),
    (
        "too_many_retrieve_texts",
        "/v1/retrieve",
        {"json": {"images": [b64(image_bytes())], "texts": ["a", "b", "c", "d"]}},
        400,
        "too_many_items",
    ),
    (
        "bad_mask_format",
        "/v1/segment",
        {"json": {"image": b64(image_bytes()), "vocabulary": ["a"], "mask_format": "svg"}},
        422,
        "validation_error",
    ),
    (
        "bad_task",
        "/v1/segment",
        {"json": {"image": b64(image_bytes()), "vocabulary": ["a"], "task": "x"}},
        422,
        "validation_error",
    ),
    ("missing_image", "/v1/caption", {"json": {}}, 400, "invalid_image"),
    (
        "unknown_field",
        "/v1/caption",
        {"json": {"image": b64(image_bytes()), "colour": 1}},
        422,
        "validation_error",
    ),
    (
        "zero_beams",
        "/v1/caption",
        {"json": {"image": b64(image_bytes()), "beams": 0}},
        422,
        "validation_error",
    ),
    (
        "too_many_beams",
        "/v1/caption",
        {"json": {"image": b64(image_bytes()), "beams": 17}},
        422,
        "validation_error",
    ),
    (
        "unknown_model",
        "/v1/caption",
        {"json": {"image": b64(image_bytes()), "model": "nope"}},
        400,
        "unknown_model",
    ),
    (
        "embed_both",
        "/v1/embed",
        {"json": {"images": [b64(image_bytes())], "texts": ["a"]}},
        400,
        "invalid_request",
    ),
    (
        "detect_without_box_head",
        "/v1/detect",
        {"json": {"image": b64(image_bytes()), "vocabulary": ["a"]}},
        400,
        "unsupported_task",
    ),
    (
        "detect_too_many_boxes",
        "/v1/detect",
        {"json": {"image": b64(image_bytes()), "vocabulary": ["a"], "max_detections": 301}},
        422,
        "validation_error",
    ),
    ("unknown_route", "/v1/nothing", {"json": {}}, 404, "not_found"),
]


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "code"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_gets_json_error_and_server_survives(client, path, kwargs, status, code):
    response = client.post(path, **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"]
    assert client.get("/healthz").status_code == 200


def test_api_key_is_required_on_v1_and_aliases(server):
    with server.client() as anonymous:
        for path in ("/v1/caption", "/caption"):
            missing = anonymous.post(path, json={"image": b64(image_bytes())})
            assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
        wrong = anonymous.post("/v1/segment", json={}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert anonymous.get("/v1/models").status_code == 401
        assert anonymous.get("/healthz").status_code == 200 and anonymous.get("/metrics").status_code == 200


def test_rejections_are_counted(server, client):
    before = metric(server.metrics(), "openset_rejected_total", reason="invalid")
    client.post("/v1/caption", json={"image": b64(b"junk")})
    assert metric(server.metrics(), "openset_rejected_total", reason="invalid") == before + 1


# -- batching, cache, Redis ------------------------------------------------------------------------


def test_concurrent_requests_with_different_vocabularies_share_batches(server):
    before = server.metrics()
    vocabularies = [[f"shade {i}", "bright", "mid"] for i in range(8)]

    def call(vocabulary):
        with server.client(headers=AUTH) as client:
            return segment(client, vocabulary).status_code

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(call, vocabularies)) == [200] * 8
    after = server.metrics()
    count = metric(after, "openset_batch_size_count", task="panoptic") - metric(
        before, "openset_batch_size_count", task="panoptic"
    )
    total = metric(after, "openset_batch_size_sum", task="panoptic") - metric(
        before, "openset_batch_size_sum", task="panoptic"
    )
    assert total == 8 and count < 8, (count, total)  # at least one batch held several requests
    assert metric(after, "openset_queue_wait_seconds_count", task="panoptic") >= 8
    assert metric(after, "openset_inference_duration_seconds_count", task="panoptic") == metric(
        after, "openset_batch_size_count", task="panoptic"
    )


def test_repeated_vocabulary_hits_the_memory_cache_and_fills_redis(server, client, redis_server):
    vocabulary = ["teal square", "amber circle"]
    before = server.metrics()
    assert segment(client, vocabulary).status_code == 200
    middle = server.metrics()
    assert (
        metric(middle, "openset_text_cache_requests_total", tier="memory", result="miss")
        - metric(before, "openset_text_cache_requests_total", tier="memory", result="miss")
        == 2
    )
    assert segment(client, [" Teal  Square", "amber circle"]).status_code == 200  # normalised: same keys
    after = server.metrics()
    assert (
        metric(after, "openset_text_cache_requests_total", tier="memory", result="hit")
        - metric(middle, "openset_text_cache_requests_total", tier="memory", result="hit")
        == 2
    )
    stored = redis.Redis(port=redis_server.port)
    keys = stored.keys("openset:text:*")
    assert len(keys) >= 2
    dim = client.get("/v1/models").json()["models"][0]["info"]["embedding_dim"]
    assert {len(stored.get(key)) for key in keys} == {4 * dim}  # raw float32 vectors


def test_service_survives_redis_death(server, client, redis_server):
    """Runs last in this module: kills Redis, then new vocabularies must still be served."""
    redis_server.stop()
    before = metric(server.metrics(), "openset_text_cache_requests_total", tier="redis", result="error")
    for i in range(3):
        response = segment(client, [f"fresh class {i}", "another"])
        assert response.status_code == 200, response.text
    after = metric(server.metrics(), "openset_text_cache_requests_total", tier="redis", result="error")
    assert after > before
    assert "redis unavailable" in server.logs()
