"""The Predictor of Mask2Former models: closed-vocabulary semantic / instance / panoptic segmentation.

    predictor = Mask2FormerPredictor.from_config("mask2former-swint-coco-panoptic", checkpoint=PATH)
    predictor.encode_texts(names)                       -> (N, K) one-hot rows of the label set
    predictor.segment(images, class_embeddings, task)  -> list[SegmentationResult]

The vocabulary is a choice among the K classes of the model's label set (`models.labels`): unknown
names raise a `ValueError` naming the valid ones. `encode_texts` returns one-hot rows so that the
service's text path (cache, batching) works unchanged; `segment` reads each image's requested class
indices from them and restricts the logits with `models.labels.select_class_logits`, so the
probabilities of the requested classes are those of the full label set.

Postprocessing is the X-Decoder one (softmax with a no-object column, thresholds 0.8 / 0.8, top-100
instances) with detectron2's bilinear mask resizing. The released models pad a batch to its largest
image without a padding mask, so images run in groups of equal padded size, as alone.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from models.checkpoint_formats import load_any_checkpoint
from models.labels import select_class_logits
from models.mask2former import Mask2FormerModel, get_mask2former_config
from models.postprocess import resize_mask_logits
from models.precision import precision_context
from models.predictor import (
    SEGMENT_TASKS,
    FamilyPredictor,
    SegmentationResult,
    check_segment_task,
    segments_from_outputs,
)
from models.preprocess import batch_images


class Mask2FormerPredictor(FamilyPredictor):
    """One loaded Mask2Former model (see the module docstring)."""

    family = "Mask2Former"
    checkpoint_formats = ".pkl, .safetensors (or a transformers folder) or .pt"
    get_config = staticmethod(get_mask2former_config)
    model_class = Mask2FormerModel
    load_weights = staticmethod(load_any_checkpoint)

    @property
    def info(self) -> dict:
        labels = self.model.cfg.labels
        return self.base_info() | {
            "tasks": list(SEGMENT_TASKS),
            "box_head": False,
            "vocabulary_in_decoder": False,
            "label_set": list(labels.names),
            "label_names_accepted": labels.accepted_names(),
            "embedding_dim": len(labels),
        }

    def encode_texts(self, names: list[str]) -> torch.Tensor:
        """Class names of the label set -> (N, K) one-hot rows; `ValueError` for unknown names."""
        indices = self.model.select_vocabulary(list(names))
        return F.one_hot(torch.tensor(indices), len(self.model.labels)).float()

    @torch.inference_mode()
    def segment(
        self,
        images: list[np.ndarray],
        class_embeddings: list[torch.Tensor],
        task: str,
        thing_flags: list[list[bool] | None] | None = None,
        threshold: float | None = None,
    ) -> list[SegmentationResult]:
        """Segmentation restricted to each image's requested classes (rows of `encode_texts`).
        Without `thing_flags`, the label set's own thing/stuff split is used."""
        check_segment_task(task)
        if len(class_embeddings) != len(images):
            raise ValueError("class_embeddings needs one (C_i, K) tensor per image")
        labels = self.model.labels
        selected = []
        for i, rows in enumerate(class_embeddings):
            if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] != len(labels):
                raise ValueError(f"class_embeddings[{i}] must be (C, {len(labels)}) rows of encode_texts")
            selected.append(rows.argmax(dim=1).tolist())
        batch = batch_images(images, self.model.cfg.resize)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(batch.padded_sizes):
            by_size.setdefault(size, []).append(i)
        results: list[SegmentationResult | None] = [None] * len(images)
        for (ph, pw), indices in by_size.items():
            tensor = batch.tensor[indices, :, :ph, :pw].to(self.device)
            with precision_context(self.precision, self.device):
                logits, masks = self.model(tensor)
            for k, i in enumerate(indices):
                class_logits = select_class_logits(logits[k].float(), selected[i])
                resized = resize_mask_logits(
                    masks[k], (ph, pw), batch.image_sizes[i], batch.original_sizes[i], "bilinear", "bilinear"
                )
                flags = None if thing_flags is None else thing_flags[i]
                flags = [labels.isthing[c] for c in selected[i]] if flags is None else flags
                segments = segments_from_outputs(task, class_logits, resized, flags, threshold)
                results[i] = SegmentationResult(task, batch.original_sizes[i], segments)
        return [r for r in results if r is not None]
