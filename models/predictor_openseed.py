"""The Predictor of OpenSeeD models: open-vocabulary segmentation with boxes, and detection.

    predictor = OpenSeeDPredictor.from_config("openseed-swint", checkpoint=PATH)
    predictor.encode_texts(names)                       -> (N, 512) class embeddings
    predictor.segment(images, class_embeddings, task)  -> list[SegmentationResult] (instance
                                                           segments carry box-head boxes)
    predictor.detect(images, class_embeddings)          -> list[DetectionResult]

Same conventions as `models.predictor.Predictor` (one vocabulary per image, uint8 RGB images of any
size, masks at the original size). OpenSeeD has no padding mask: padded pixels are image content to
it, so an image's result would change with the size of its batch-mates. Images are therefore run in
groups of equal padded size (the service's size buckets make these the usual case). Its query
selection depends on the vocabulary, so within a group the backbone and pixel decoder run once for
all images and the decoder once per distinct vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from models import postprocess_openseed as post
from models.configs import ResizeRule
from models.language.tokenizer import ClipTokenizer
from models.openseed import OpenSeeDModel, get_openseed_config
from models.postprocess import resize_mask_logits
from models.precision import precision_context
from models.predictor import (
    SEGMENT_TASKS,
    Detection,
    DetectionResult,
    FamilyPredictor,
    Segment,
    SegmentationResult,
    check_segment_task,
    semantic_segments,
)
from models.preprocess import normalize, padded_size, resized_shape

TASKS = (*SEGMENT_TASKS, "detect")


@dataclass
class PreparedImage:
    """One image ready for the network: (3, h, w) normalised, zero-padded to (ph, pw)."""

    tensor: torch.Tensor
    image_size: tuple[int, int]  # (h, w) after the resize
    padded_size: tuple[int, int]
    original_size: tuple[int, int]


@dataclass
class ImageOutput:
    """The decoder outputs of one image: logits (Q, C), boxes (Q, 4) cxcywh of the padded input,
    mask logits (Q, h, w) or None."""

    logits: torch.Tensor
    boxes: torch.Tensor
    masks: torch.Tensor | None
    image: PreparedImage


def prepare_image(image: np.ndarray, short: int, max_size: int) -> PreparedImage:
    """uint8 (H, W, 3) -> resized with PIL bicubic (OpenSeeD's evaluation resize), normalised, padded."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"images must be uint8 (H, W, 3) arrays, got {image.dtype} {image.shape}")
    original = (int(image.shape[0]), int(image.shape[1]))
    h, w = resized_shape(original[0], original[1], ResizeRule(short=short, max_size=max_size))
    if (h, w) != image.shape[:2]:
        image = np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))
    x = normalize(image)
    ph, pw = padded_size(h, w)
    padded = torch.zeros(3, ph, pw)
    padded[:, :h, :w] = x
    return PreparedImage(padded, (h, w), (ph, pw), original)


class OpenSeeDPredictor(FamilyPredictor):
    """One loaded OpenSeeD model (see the module docstring)."""

    family = "OpenSeeD"
    get_config = staticmethod(get_openseed_config)
    model_class = OpenSeeDModel

    def __init__(self, model: OpenSeeDModel, name: str, weights_id: str, device: str, precision: str) -> None:
        super().__init__(model, name, weights_id, device, precision)
        self.tokenizer = ClipTokenizer()

    @property
    def info(self) -> dict:
        return self.base_info() | {
            "tasks": list(TASKS),
            "box_head": True,
            "vocabulary_in_decoder": True,
            "label_set": None,
            "embedding_dim": self.model.cfg.text.projection_dim,
        }

    # ------------------------------------------------------------------ text

    @torch.inference_mode()
    def encode_texts(self, names: list[str]) -> torch.Tensor:
        """Class names -> (N, 512): 81-template averaged, unit norm (context length 18)."""
        with precision_context(self.precision, self.device):
            return self.model.encode_texts(list(names), self.tokenizer).float()

    # ------------------------------------------------------------------ images

    def _run(
        self, images: Sequence[np.ndarray], class_embeddings: Sequence[torch.Tensor], masks: bool
    ) -> list[ImageOutput]:
        """Decoder outputs per image: groups of equal padded size share the backbone and the pixel
        decoder; within a group, images with the same vocabulary share a decoder pass."""
        if len(class_embeddings) != len(images):
            raise ValueError("class_embeddings needs one (C_i, D) tensor per image")
        dim = self.model.cfg.text.projection_dim
        for i, text in enumerate(class_embeddings):
            if text.ndim != 2 or text.shape[0] == 0 or text.shape[1] != dim:
                raise ValueError(
                    f"class_embeddings[{i}] must be (C, {dim}) with C >= 1, got {tuple(text.shape)}"
                )
        rule = self.model.cfg.resize
        prepared = [prepare_image(image, rule.short, rule.max_size) for image in images]
        outputs: list[ImageOutput | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(prepared):
            by_size.setdefault(p.padded_size, []).append(i)
        model = self.model
        with precision_context(self.precision, self.device):
            for indices in by_size.values():
                batch = torch.stack([prepared[i].tensor for i in indices]).to(self.device)
                features = model.backbone(batch)
                mask_features, _, levels = model.sem_seg_head.pixel_decoder(features)
                by_vocabulary: dict[bytes, list[int]] = {}
                for k, i in enumerate(indices):
                    key = class_embeddings[i].float().cpu().numpy().tobytes()
                    by_vocabulary.setdefault(key, []).append(k)
                for members in by_vocabulary.values():
                    rows = torch.tensor(members, device=self.device)
                    text = class_embeddings[indices[members[0]]].to(self.device, torch.float32)
                    out = model.decoder(
                        [level[rows] for level in levels], mask_features[rows], text, masks=masks
                    )
                    for j, k in enumerate(members):
                        i = indices[k]
                        mask = None if out.pred_masks is None else out.pred_masks[j].float()
                        outputs[i] = ImageOutput(
                            out.pred_logits[j].float(), out.pred_boxes[j].float(), mask, prepared[i]
                        )
        return [o for o in outputs if o is not None]

    @staticmethod
    def _boxes_xywh(output: ImageOutput, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        image = output.image
        xyxy = post.boxes_to_original(
            output.boxes[rows], image.padded_size, image.image_size, image.original_size
        )
        return post.xyxy_to_xywh(xyxy)

    @torch.inference_mode()
    def segment(
        self,
        images: list[np.ndarray],
        class_embeddings: list[torch.Tensor],
        task: str,
        thing_flags: list[list[bool] | None] | None = None,
        threshold: float | None = None,
    ) -> list[SegmentationResult]:
        """Semantic / instance / panoptic segmentation, one vocabulary per image. `threshold`:
        panoptic object threshold (default 0.25), instance minimum score, semantic minimum share."""
        check_segment_task(task)
        settings = self.model.cfg.postprocess
        results = []
        for i, output in enumerate(self._run(images, class_embeddings, masks=True)):
            image = output.image
            flags = None if thing_flags is None else thing_flags[i]
            flags = [True] * output.logits.shape[-1] if flags is None else flags
            assert output.masks is not None
            masks = resize_mask_logits(
                output.masks, image.padded_size, image.image_size, image.original_size, upsample="bilinear"
            )
            if task == "semantic":
                segments = semantic_segments(
                    post.semantic_inference(output.logits, masks, settings.temperature), flags, threshold
                )
            elif task == "panoptic":
                panoptic, info = post.panoptic_inference(
                    output.logits,
                    masks,
                    flags,
                    settings.object_mask_threshold if threshold is None else threshold,
                    settings.overlap_threshold,
                    settings.temperature,
                )
                # Thing segments carry their query's box-head box; stuff segments (merged
                # queries) get the box of their mask.
                boxes = self._boxes_xywh(output)
                segments = [
                    Segment(
                        s["id"],
                        s["category_id"],
                        s["score"],
                        s["isthing"],
                        (panoptic == s["id"]).cpu().numpy(),
                        tuple(float(v) for v in boxes[s["query"]]) if s["isthing"] else None,
                    )
                    for s in info
                ]
            else:
                found = post.instance_inference(output.logits, masks, output.boxes, flags, settings.top_k)
                boxes = self._boxes_xywh(output, found["query_indices"])
                minimum = 0.0 if threshold is None else threshold
                segments = []
                for score, label, mask, box in zip(
                    found["scores"], found["labels"], found["masks"], boxes, strict=True
                ):
                    if float(score) > minimum and bool(mask.any()):
                        segments.append(
                            Segment(
                                len(segments) + 1,
                                int(label),
                                float(score),
                                True,
                                mask.cpu().numpy(),
                                tuple(float(v) for v in box),
                            )
                        )
            results.append(SegmentationResult(task, image.original_size, segments))
        return results

    @torch.inference_mode()
    def detect(
        self, images: list[np.ndarray], class_embeddings: list[torch.Tensor], threshold: float | None = None
    ) -> list[DetectionResult]:
        """Boxes, labels and scores (the top-100 (query, class) pairs, best first), no masks;
        `threshold` drops scores at or below it."""
        settings = self.model.cfg.postprocess
        results = []
        for output in self._run(images, class_embeddings, masks=False):
            found = post.detection_inference(output.logits, output.boxes, settings.top_k)
            boxes = self._boxes_xywh(output, found["query_indices"])
            minimum = -1.0 if threshold is None else threshold
            detections = [
                Detection(int(label), float(score), tuple(float(v) for v in box))
                for score, label, box in zip(found["scores"], found["labels"], boxes, strict=True)
                if float(score) > minimum
            ]
            results.append(DetectionResult(output.image.original_size, detections))
        return results
