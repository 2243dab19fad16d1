"""Interactive load for the OpenSet gateway (locust is not part of `make setup`).

    pip install locust
    locust -f load_tests/locustfile.py --host http://127.0.0.1:8000
Set OPENSET_API_KEY in the environment when the server requires a key. The mix: segmentation with a
few shared vocabularies (cache hits) and occasional fresh ones (misses), referring, captioning,
retrieval and text embeddings, each with a synthetic image.
"""

from __future__ import annotations

import base64
import io
import os
import random

import numpy as np
from PIL import Image

try:
    from locust import HttpUser, between, task
except ImportError as exc:  # pragma: no cover - only when run without locust installed
    raise SystemExit(
        "locust is not installed: `pip install locust`, then run this file with `locust -f`."
    ) from exc

VOCABULARIES = [
    ["person", "dog", "grass", "sky"],
    ["car", "road", "building", "tree", "sky"],
    ["cat", "sofa", "floor", "wall", "window", "lamp"],
]


def synthetic_image(size: int = 256, seed: int = 0) -> str:
    """Base64 JPEG with a few coloured blocks."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((size, size, 3), np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, size - 32, size=2)
        pixels[y : y + rng.integers(16, 96), x : x + rng.integers(16, 96)] = rng.integers(0, 255, size=3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode()


IMAGES = [synthetic_image(seed=i) for i in range(8)]


class OpenSetUser(HttpUser):
    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        key = os.environ.get("OPENSET_API_KEY")
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"

    @task(6)
    def segment(self) -> None:
        vocabulary = random.choice(VOCABULARIES)
        if random.random() < 0.1:
            vocabulary = [*vocabulary, f"object {random.randrange(10**6)}"]  # a cache miss
        body = {"image": random.choice(IMAGES), "vocabulary": vocabulary, "task": "panoptic"}
        self.client.post("/v1/segment", json=body, name="/v1/segment")

    @task(2)
    def refer(self) -> None:
        body = {"image": random.choice(IMAGES), "phrase": "the red block on the left"}
        self.client.post("/v1/refer", json=body, name="/v1/refer")

    @task(1)
    def caption(self) -> None:
        self.client.post("/v1/caption", json={"image": random.choice(IMAGES)}, name="/v1/caption")

    @task(1)
    def retrieve(self) -> None:
        body = {"images": random.sample(IMAGES, 3), "texts": ["red blocks", "a dark scene"]}
        self.client.post("/v1/retrieve", json=body, name="/v1/retrieve")

    @task(1)
    def embed(self) -> None:
        self.client.post("/v1/embed", json={"texts": ["a dog on grass"]}, name="/v1/embed")
