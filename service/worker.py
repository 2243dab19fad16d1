"""The worker process: loads one Predictor, warms it up, then runs batches sent by the gateway.

Messages on the pipe are plain data (dicts, lists, str, bytes, numbers, numpy arrays) built by the
gateway or by this worker; user input only travels inside them as bytes and strings. Image bytes are
decoded here by PIL under the pixel limit, and masks are encoded here, so the gateway's event loop
never does pixel work.

    gateway -> worker: {"kind": "batch", "batch_id", "task", "options", "items": [dict, ...]}
                       | {"kind": "stop"}
    worker -> gateway: {"kind": "ready", "model_id", "info"} | {"kind": "fatal", "message"}
                       | {"kind": "result", "batch_id", "compute_s", "results": [dict, ...]}
"""

from __future__ import annotations

import logging
import os
import signal
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection

import numpy as np

from service.images import decode_image
from service.masks import encode_mask, mask_box_and_area

logger = logging.getLogger("openset.worker")

TEXT_CHUNK = 32  # class names per encode_texts call (each name expands to 81 prompts)


def worker_main(conn: Connection, config: dict) -> None:
    """Entry point of a worker process (multiprocessing spawn target)."""
    # The gateway owns shutdown: it sends "stop", or the pipe closes when it dies.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        runner = BatchRunner(config)
        runner.warm_up()
    except Exception as exc:  # the gateway logs it and retries with a backoff
        conn.send(
            {"kind": "fatal", "message": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
        )
        return
    conn.send(
        {"kind": "ready", "model_id": runner.predictor.model_id, "info": runner.info(), "pid": os.getpid()}
    )
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message["kind"] == "stop":
            return
        start = time.perf_counter()
        results = runner.run(message["task"], message["options"], message["items"])
        conn.send(
            {
                "kind": "result",
                "batch_id": message["batch_id"],
                "compute_s": time.perf_counter() - start,
                "results": results,
            }
        )


def clip_box(box: tuple[float, float, float, float], width: int, height: int) -> list[float]:
    """(x, y, w, h) from a box head, which may reach past the image, clipped to it (2 decimals)."""
    x0, y0 = min(max(box[0], 0.0), width), min(max(box[1], 0.0), height)
    x1, y1 = min(max(box[0] + box[2], 0.0), width), min(max(box[1] + box[3], 0.0), height)
    return [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]


def item_error(status: int, code: str, message: str) -> dict:
    return {"ok": False, "status": status, "code": code, "message": message}


class BatchRunner:
    """Runs one batch of one task on the Predictor; one result dict per item, errors included."""

    def __init__(self, config: dict) -> None:
        import torch

        from models.predictor import Predictor

        threads = config.get("torch_threads") or 1
        torch.set_num_threads(threads)
        self.torch = torch
        self.max_pixels = int(config["max_image_pixels"])
        self.predictor = Predictor.from_config(
            config["model"],
            checkpoint=config.get("checkpoint"),
            device=config["device"],
            runtime=config["runtime"],
            precision=config.get("precision", "fp32"),
        )
        self.handlers: dict[str, Callable[[dict, list[dict]], list[dict]]] = {
            "encode_text": self.encode_text,
            "segment": self.segment,
            "detect": self.detect,
            "refer": self.refer,
            "caption": self.caption,
            "retrieve": self.retrieve,
            "embed_image": self.embed_image,
            "embed_text": self.embed_text,
        }

    def info(self) -> dict:
        info = dict(self.predictor.info)
        if "embedding_dim" not in info:
            info["embedding_dim"] = int(self.predictor.encode_texts(["object"]).shape[-1])
        return info

    def warm_up(self) -> None:
        """One pass of every task the model serves on a small synthetic image, so the first request
        is not slow."""
        image = np.linspace(0, 255, 64 * 64 * 3).astype(np.uint8).reshape(64, 64, 3)
        info = self.predictor.info
        tasks = set(info["tasks"])
        names = list(info.get("label_set") or ["object", "background"])[:2]
        embeddings = self.predictor.encode_texts(names)
        with self.torch.inference_mode():
            for task in ("panoptic", "semantic", "instance"):
                if task in tasks:
                    self.predictor.segment([image], [embeddings], task)
                    break
            if "detect" in tasks:
                self.predictor.detect([image], [embeddings])
            if "refer" in tasks:
                self.predictor.refer([image], ["the object"])
            if "caption" in tasks:
                self.predictor.caption([image])
            if "retrieve" in tasks:
                self.predictor.retrieve([image], ["an object"])

    def run(self, task: str, options: dict, items: list[dict]) -> list[dict]:
        try:
            with self.torch.inference_mode():
                return self.handlers[task](options, items)
        except Exception as exc:
            logger.exception("batch of task %s failed", task)
            return [item_error(500, "internal_error", f"Inference failed: {type(exc).__name__}.")] * len(
                items
            )

    def _decode(
        self, items: list[dict], key: str = "image"
    ) -> tuple[list[int], list[np.ndarray], list[dict]]:
        """Decode each item's image; (indices of good items, their images, per-item results so far)."""
        results: list[dict] = [{} for _ in items]
        good, images = [], []
        for index, item in enumerate(items):
            start = time.perf_counter()
            try:
                images.append(decode_image(item[key], self.max_pixels))
                good.append(index)
            except Exception as exc:
                results[index] = item_error(400, "invalid_image", f"The image could not be decoded ({exc}).")
            results[index]["decode_ms"] = (time.perf_counter() - start) * 1e3
        return good, images, results

    def _finish(self, results: list[dict], index: int, body: dict, inference_ms: float, start: float) -> None:
        decode_ms = results[index].get("decode_ms", 0.0)
        postprocess_ms = (time.perf_counter() - start) * 1e3
        results[index] = {
            "ok": True,
            "body": body,
            "timings_ms": {
                "decode": round(decode_ms, 3),
                "inference": round(inference_ms, 3),
                "postprocess": round(postprocess_ms, 3),
                "worker": round(decode_ms + inference_ms + postprocess_ms, 3),
            },
        }

    def encode_text(self, options: dict, items: list[dict]) -> list[dict]:
        """Class embeddings for every item's texts; duplicates across items are computed once."""
        start = time.perf_counter()
        unique = list(dict.fromkeys(text for item in items for text in item["texts"]))
        chunks = [
            self.predictor.encode_texts(unique[i : i + TEXT_CHUNK]).float().cpu().numpy()
            for i in range(0, len(unique), TEXT_CHUNK)
        ]
        table = dict(zip(unique, np.concatenate(chunks).astype(np.float32), strict=True))
        inference_ms = (time.perf_counter() - start) * 1e3
        timings = {"decode": 0.0, "inference": inference_ms, "postprocess": 0.0, "worker": inference_ms}
        return [
            {
                "ok": True,
                "body": {"embeddings": np.stack([table[t] for t in item["texts"]])},
                "timings_ms": timings,
            }
            for item in items
        ]

    def segment(self, options: dict, items: list[dict]) -> list[dict]:
        good, images, results = self._decode(items)
        # One forward pass per distinct threshold (usually one); vocabularies differ freely.
        for threshold in dict.fromkeys(items[i].get("threshold") for i in good):
            group = [k for k, i in enumerate(good) if items[i].get("threshold") == threshold]
            start = time.perf_counter()
            outputs = self.predictor.segment(
                [images[k] for k in group],
                [self.torch.from_numpy(items[good[k]]["embeddings"]) for k in group],
                options["segment_task"],
                thing_flags=[items[good[k]]["thing_flags"] for k in group],
                threshold=threshold,
            )
            inference_ms = (time.perf_counter() - start) * 1e3
            for k, output in zip(group, outputs, strict=True):
                start = time.perf_counter()
                item = items[good[k]]
                segments = []
                height, width = output.image_size
                for segment in output.segments:
                    box, area = mask_box_and_area(segment.mask)
                    if segment.bbox is not None:
                        box = clip_box(segment.bbox, width, height)
                    segments.append(
                        {
                            "id": int(segment.id),
                            "label": item["labels"][segment.label_index],
                            "label_index": int(segment.label_index),
                            "score": round(float(segment.score), 5),
                            "isthing": bool(segment.isthing),
                            "bbox": box,
                            "area": area,
                            "mask": encode_mask(segment.mask, item["mask_format"]),
                        }
                    )
                body = {
                    "task": output.task,
                    "image": {"width": width, "height": height},
                    "segments": segments,
                }
                self._finish(results, good[k], body, inference_ms, start)
        return results

    def detect(self, options: dict, items: list[dict]) -> list[dict]:
        good, images, results = self._decode(items)
        for threshold in dict.fromkeys(items[i].get("threshold") for i in good):
            group = [k for k, i in enumerate(good) if items[i].get("threshold") == threshold]
            start = time.perf_counter()
            outputs = self.predictor.detect(
                [images[k] for k in group],
                [self.torch.from_numpy(items[good[k]]["embeddings"]) for k in group],
                threshold=threshold,
            )
            inference_ms = (time.perf_counter() - start) * 1e3
            for k, output in zip(group, outputs, strict=True):
                start = time.perf_counter()
                item = items[good[k]]
                height, width = output.image_size
                detections = [
                    {
                        "label": item["labels"][d.label_index],
                        "label_index": int(d.label_index),
                        "score": round(float(d.score), 5),
                        "bbox": clip_box(d.bbox, width, height),
                    }
                    for d in output.detections[: item["max_detections"]]
                ]
                body = {"image": {"width": width, "height": height}, "detections": detections}
                self._finish(results, good[k], body, inference_ms, start)
        return results

    def refer(self, options: dict, items: list[dict]) -> list[dict]:
        good, images, results = self._decode(items)
        for multi, threshold in dict.fromkeys((items[i]["multi"], items[i].get("threshold")) for i in good):
            group = [
                k
                for k, i in enumerate(good)
                if (items[i]["multi"], items[i].get("threshold")) == (multi, threshold)
            ]
            start = time.perf_counter()
            outputs = self.predictor.refer(
                [images[k] for k in group],
                [items[good[k]]["phrase"] for k in group],
                multi=multi,
                threshold=threshold,
            )
            inference_ms = (time.perf_counter() - start) * 1e3
            for k, output in zip(group, outputs, strict=True):
                start = time.perf_counter()
                item = items[good[k]]
                matches = []
                for match in output.matches:
                    box, area = mask_box_and_area(match.mask)
                    mask = encode_mask(match.mask, item["mask_format"])
                    matches.append(
                        {"score": round(float(match.score), 5), "bbox": box, "area": area, "mask": mask}
                    )
                height, width = output.image_size
                body = {
                    "phrase": output.phrase,
                    "image": {"width": width, "height": height},
                    "matches": matches,
                }
                self._finish(results, good[k], body, inference_ms, start)
        return results

    def caption(self, options: dict, items: list[dict]) -> list[dict]:
        good, images, results = self._decode(items)
        for beams in dict.fromkeys(items[i]["beams"] for i in good):
            group = [k for k, i in enumerate(good) if items[i]["beams"] == beams]
            start = time.perf_counter()
            captions = self.predictor.caption([images[k] for k in group], beams=beams)
            inference_ms = (time.perf_counter() - start) * 1e3
            for k, caption in zip(group, captions, strict=True):
                self._finish(results, good[k], {"caption": caption}, inference_ms, time.perf_counter())
        return results

    def _decode_many(self, items: list[dict]) -> tuple[list[int], list[list[np.ndarray]], list[dict]]:
        """Like `_decode` for items carrying a list of images under "images"."""
        results: list[dict] = [{} for _ in items]
        good, image_lists = [], []
        for index, item in enumerate(items):
            start = time.perf_counter()
            try:
                image_lists.append([decode_image(data, self.max_pixels) for data in item["images"]])
                good.append(index)
            except Exception as exc:
                results[index] = item_error(400, "invalid_image", f"An image could not be decoded ({exc}).")
            results[index]["decode_ms"] = (time.perf_counter() - start) * 1e3
        return good, image_lists, results

    def retrieve(self, options: dict, items: list[dict]) -> list[dict]:
        good, image_lists, results = self._decode_many(items)
        if not good:
            return results
        start = time.perf_counter()
        # One pass over every image and text of the batch; each item reads its own block.
        scores = (
            self.predictor.retrieve(
                [image for images in image_lists for image in images],
                [text for i in good for text in items[i]["texts"]],
            )
            .float()
            .cpu()
            .numpy()
        )
        inference_ms = (time.perf_counter() - start) * 1e3
        row = col = 0
        for k, index in enumerate(good):
            n_images, n_texts = len(image_lists[k]), len(items[index]["texts"])
            block = scores[row : row + n_images, col : col + n_texts]
            row, col = row + n_images, col + n_texts
            body = {
                "scores": np.round(block, 5).tolist(),
                "text_to_image": np.argsort(-block, axis=0, kind="stable").T.tolist(),
                "image_to_text": np.argsort(-block, axis=1, kind="stable").tolist(),
            }
            self._finish(results, index, body, inference_ms, time.perf_counter())
        return results

    def embed_image(self, options: dict, items: list[dict]) -> list[dict]:
        good, image_lists, results = self._decode_many(items)
        if not good:
            return results
        start = time.perf_counter()
        embeddings = self.predictor.embed_images([image for images in image_lists for image in images])
        embeddings = embeddings.float().cpu().numpy()
        inference_ms = (time.perf_counter() - start) * 1e3
        row = 0
        for k, index in enumerate(good):
            block = embeddings[row : row + len(image_lists[k])]
            row += len(image_lists[k])
            self._finish(results, index, {"embeddings": block.tolist()}, inference_ms, time.perf_counter())
        return results

    def embed_text(self, options: dict, items: list[dict]) -> list[dict]:
        start = time.perf_counter()
        embeddings = self.predictor.embed_texts([text for item in items for text in item["texts"]])
        embeddings = embeddings.float().cpu().numpy()
        inference_ms = (time.perf_counter() - start) * 1e3
        results: list[dict] = [{} for _ in items]
        row = 0
        for index, item in enumerate(items):
            block = embeddings[row : row + len(item["texts"])]
            row += len(item["texts"])
            self._finish(results, index, {"embeddings": block.tolist()}, inference_ms, time.perf_counter())
        return results
