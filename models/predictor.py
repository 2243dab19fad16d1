"""The model-level API the service calls: one object per loaded model.

    predictor = Predictor.from_config(name, checkpoint=None, device="cpu", runtime="torch")
    predictor.model_id                              -> str, config name + checkpoint hash (cache keys)
    predictor.info                                  -> dict: name, tasks, runtime, device, input sizes
    predictor.encode_texts(names)                   -> Tensor (N, D): one class embedding per name,
                                                       81-template averaged, normalised
    predictor.segment(images, class_embeddings, task, thing_flags=None, threshold=None)
                                                    -> list[SegmentationResult]
    predictor.refer(images, phrases, multi=False, threshold=None) -> list[ReferringResult]
    predictor.caption(images)                       -> list[str]
    predictor.embed_images(images)                  -> Tensor (B, D)
    predictor.embed_texts(texts)                    -> Tensor (N, D)
    predictor.retrieve(images, texts)               -> Tensor (B, N): image x text scores

Other families (OpenSeeD: `models.predictor_openseed`, Mask2Former: `models.predictor_mask2former`,
both `FamilyPredictor`s) serve a subset of these tasks through predictors with the
same methods; `info["tasks"]` lists what a loaded model serves, `info["box_head"]` whether it has
`detect` and box-head boxes in its segments, `info["vocabulary_in_decoder"]` whether the vocabulary
changes the decoder (OpenSeeD: requests with different vocabularies cannot share a decoder pass) and
`info["label_set"]` the closed vocabulary of a closed-set model (None: open vocabulary), with
`info["label_names_accepted"]` every spelling of its names that a vocabulary may use.

Conventions:
- `images` is a list of RGB uint8 numpy arrays (H, W, 3), each of its own size; the list goes through
  one batched forward pass with padding and gives the same results as one image at a time.
- `class_embeddings` is a list with one (C_i, D) tensor per image (rows of `encode_texts`), so images
  with different vocabularies share a batch; "background" is appended inside `segment`.
  `thing_flags` is a list with one list of C_i bools per image (None, or a None entry: the model's
  default, every class a thing for open-vocabulary models).
- `task` is "semantic", "instance" or "panoptic". `threshold` overrides the task's score threshold.
- `refer` takes one phrase per image. `multi=False` returns the best match; `multi=True` every
  grounding query whose score passes the threshold, possibly none.
- Masks in results are boolean numpy arrays at the original image size (H, W).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.beam_caption import beam_caption
from models.checkpoint import load_checkpoint, quick_hash
from models.configs import XDecoderConfig, config_names, get_config
from models.decoders.xdecoder import class_logits
from models.language.tokenizer import EOS_ID, PERIOD_ID, ClipTokenizer
from models.postprocess import (
    caption_from_tokens,
    grounding_scores,
    instance_inference,
    panoptic_inference,
    resize_mask_logits,
    retrieval_scores,
    select_referring,
    semantic_inference,
)
from models.precision import check_precision, precision_context, prepare_model
from models.preprocess import ImageBatch, batch_images
from models.xdecoder import ImageFeatures, XDecoderModel


@dataclass
class Segment:
    """One segment of a segmentation result.

    `label_index` indexes the vocabulary the caller passed (background is never returned).
    `mask` is a bool array (H, W) at the original image size. `bbox` is (x, y, w, h) in original-image
    pixels from a box head; None when the model has none (the service derives it from the mask).
    """

    id: int
    label_index: int
    score: float
    isthing: bool
    mask: np.ndarray
    bbox: tuple[float, float, float, float] | None = None


@dataclass
class SegmentationResult:
    """Result of `Predictor.segment` for one image; `task` is semantic, instance or panoptic."""

    task: str
    image_size: tuple[int, int]  # (H, W) of the original image
    segments: list[Segment] = field(default_factory=list)


@dataclass
class ReferringMatch:
    """One grounding match: its score and bool mask (H, W) at the original image size."""

    score: float
    mask: np.ndarray


@dataclass
class ReferringResult:
    """Result of `Predictor.refer` for one (image, phrase) pair; `matches` may be empty."""

    phrase: str
    image_size: tuple[int, int]
    matches: list[ReferringMatch] = field(default_factory=list)


@dataclass
class Detection:
    """One box of a detection result: vocabulary index, score, (x, y, w, h) in original-image pixels."""

    label_index: int
    score: float
    bbox: tuple[float, float, float, float]


@dataclass
class DetectionResult:
    """Result of `detect` for one image, detections sorted by score (highest first)."""

    image_size: tuple[int, int]
    detections: list[Detection] = field(default_factory=list)


logger = logging.getLogger(__name__)

TASKS = ("semantic", "instance", "panoptic", "refer", "caption", "retrieve", "embed")
SEGMENT_TASKS = ("semantic", "instance", "panoptic")
# Official evaluation thresholds (spec 2.6): panoptic keeps queries above OBJECT_MASK_THRESHOLD;
# instance keeps the top-100 (our default threshold 0.0 keeps every non-empty one).
OBJECT_MASK_THRESHOLD = 0.8
OVERLAP_THRESHOLD = 0.8
INSTANCE_TOPK = 100
INSTANCE_THRESHOLD = 0.0
# Referring match scores are the cosine of a grounding query with the phrase (the official grounding
# score without its temperature); multi-match keeps those above this threshold.
REFER_THRESHOLD = 0.5
CAPTION_STEPS = 50
# Beam-search captions are ranked by summed log-probability + this weight x the image-text retrieval
# score (a cosine mean in [-1, 1]); chosen on the demo model (models/demo/README.md).
CAPTION_RANK_WEIGHT = 10.0
DEMO_WEIGHTS = Path(__file__).with_name("weights") / "demo.safetensors"
DEMO_SEED = 0


def check_segment_task(task: str) -> None:
    """`ValueError` naming the choices unless `task` is one of SEGMENT_TASKS (every family)."""
    if task not in SEGMENT_TASKS:
        raise ValueError(f"unknown segmentation task {task!r}; use one of {', '.join(SEGMENT_TASKS)}")


def build_model(name: str, checkpoint: str | Path | None) -> tuple[XDecoderModel, str]:
    """The model of config `name` with its weights, and the weights' identity for `model_id`."""
    cfg = get_config(name)
    if checkpoint is None and cfg.released:
        raise ValueError(
            f"model {name!r} needs a checkpoint: pass checkpoint=PATH (the service setting is "
            "OPENSET_CHECKPOINT) pointing at the released .pt or .safetensors file"
        )
    if checkpoint is None and DEMO_WEIGHTS.is_file():
        checkpoint = DEMO_WEIGHTS
    if checkpoint is not None:
        model = XDecoderModel(cfg)
        load_checkpoint(model, checkpoint)
        return model.eval(), quick_hash(checkpoint)[:12]
    logger.warning("no weights for %r at %s: using an untrained, seeded initialisation", name, DEMO_WEIGHTS)
    return seeded_model(cfg), f"untrained-seed{DEMO_SEED}"


def model_names() -> list[str]:
    """Every named config that `Predictor.from_config` loads, across the families."""
    from models.mask2former import mask2former_config_names
    from models.openseed import openseed_config_names

    return [*config_names(), *openseed_config_names(), *mask2former_config_names()]


def family_predictor(name: str) -> type | None:
    """The predictor class of a config name outside the X-Decoder family, or None for X-Decoder."""
    from models.mask2former import mask2former_config_names
    from models.openseed import openseed_config_names

    if name in openseed_config_names():
        from models.predictor_openseed import OpenSeeDPredictor

        return OpenSeeDPredictor
    if name in mask2former_config_names():
        from models.predictor_mask2former import Mask2FormerPredictor

        return Mask2FormerPredictor
    return None


def seeded_model(cfg: XDecoderConfig, seed: int = DEMO_SEED) -> XDecoderModel:
    """An untrained model with a deterministic initialisation (joint-space projections random, not
    zero, so every output depends on the input)."""
    with torch.random.fork_rng():  # deterministic, without touching the caller's random state
        torch.manual_seed(seed)
        model = XDecoderModel(cfg)
        for p in (model.backbone_proj, model.decoder.class_embed, model.decoder.caping_embed):
            nn.init.normal_(p, std=p.shape[0] ** -0.5)
    return model.eval()


class Predictor:
    """One loaded model and the tasks it serves (see the module docstring)."""

    def __init__(self, model: XDecoderModel, name: str, weights_id: str, device: str, runtime: str) -> None:
        self.model = model
        self.name = name
        self.device = torch.device(device)
        self.runtime = runtime
        self.precision = "fp32"  # set by from_config; see models.precision
        self.tokenizer = ClipTokenizer()
        self.model_id = f"{name}@{weights_id}"
        self._background: torch.Tensor | None = None

    @classmethod
    def from_config(
        cls,
        name: str,
        checkpoint: str | Path | None = None,
        device: str = "cpu",
        runtime: str = "torch",
        precision: str = "fp32",
        compile: bool = False,
    ) -> Predictor:
        """`precision`: fp32 (the reference) | tf32 | bf16 | fp16; `compile`: torch.compile of the
        image encoder, one graph per input size (CUDA graphs on a GPU). See models.precision."""
        if name not in model_names():
            raise ValueError(f"unknown model {name!r}; known models: {', '.join(model_names())}")
        family = family_predictor(name)
        if family is not None:  # OpenSeeD, Mask2Former: their own predictors, same methods
            return family.from_config(name, checkpoint, device, runtime, precision, compile)
        if runtime in ("onnxruntime", "tensorrt"):  # an export directory (export/runtime.py)
            from export.runtime import load_for_predictor

            exported, weights_id = load_for_predictor(name, checkpoint, runtime, device)
            return cls(exported, name, weights_id, device, runtime)  # type: ignore[arg-type]
        if runtime != "torch":
            raise ValueError(f"runtime {runtime!r} is unknown; use 'torch', 'onnxruntime' or 'tensorrt'")
        check_precision(precision)
        model, weights_id = build_model(name, checkpoint)
        model = model.to(device)
        prepare_model(model, precision, compile=compile, device=device)
        if torch.device(device).type == "cpu":
            model.lay_out_caption_step_weights()
        predictor = cls(model, name, weights_id, device, runtime)
        predictor.precision = precision
        return predictor

    @property
    def info(self) -> dict:
        cfg = self.model.cfg
        sizes = {}
        for task, rule in self.model.cfg.resize.items():
            if rule.fixed:
                sizes[task] = {"fixed": list(rule.fixed)}
            elif rule.scale:
                sizes[task] = {"scale": rule.scale, "max": rule.max_size}
            else:
                sizes[task] = {"short": rule.short, "max": rule.max_size}
        return {
            "name": self.name,
            "model_id": self.model_id,
            "tasks": list(TASKS),
            "box_head": False,
            "vocabulary_in_decoder": False,
            "label_set": None,
            "runtime": self.runtime,
            "device": str(self.device),
            "precision": self.precision,
            "input_sizes": sizes,
            "num_queries": cfg.decoder.num_queries,
            "embedding_dim": cfg.text.projection_dim,
        }

    # ------------------------------------------------------------------ text

    @torch.inference_mode()
    def encode_texts(self, names: list[str]) -> torch.Tensor:
        """Class names -> (N, D): 81-template averaged, unit-norm class embeddings."""
        with self._autocast():
            return self.model.text_encoder.encode_class_names(list(names), self.tokenizer)

    def _background_embedding(self) -> torch.Tensor:
        if self._background is None:
            self._background = self.encode_texts(["background"])
        return self._background

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Retrieval text embeddings (N, D): EOS feature @ lang_proj, divided by its norm."""
        ids, _ = self.tokenizer.encode(list(texts), context_length=self.model.cfg.text.context_length)
        with self._autocast():
            emb = self.model.text_encoder.eos_features(ids.to(self.device)).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    # ------------------------------------------------------------------ images

    def _encode(self, images: list[np.ndarray], task: str) -> tuple[ImageBatch, ImageFeatures]:
        batch = batch_images(images, self.model.cfg.resize[task])
        tensor = batch.tensor
        if self.device.type == "cuda":  # from pinned host memory: an asynchronous copy
            tensor = tensor.pin_memory()
        with self._autocast():
            features = self.model.encode_images(tensor.to(self.device, non_blocking=True), batch.padded_sizes)
        return batch, features

    def _autocast(self) -> AbstractContextManager:
        """Autocast (bf16, fp16) or the TF32 switches (tf32) around model calls; nothing for fp32.
        Outputs that leave the model are cast to float32 before postprocessing."""
        return precision_context(self.precision, self.device)

    @staticmethod
    def _mask_logits(masks: torch.Tensor, batch: ImageBatch, i: int) -> torch.Tensor:
        """Image i's mask logits (R, H/4, W/4) in the padded batch -> (R, H0, W0) at its original size
        (upsampled from its own padded area, cropped, resized; bicubic + antialias)."""
        ph, pw = batch.padded_sizes[i]
        if masks.shape[0] == 0:
            return masks.new_zeros(0, *batch.original_sizes[i], dtype=torch.float32)
        own = masks[:, : ph // 4, : pw // 4].float()
        return resize_mask_logits(own, (ph, pw), batch.image_sizes[i], batch.original_sizes[i])

    @torch.inference_mode()
    def segment(
        self,
        images: list[np.ndarray],
        class_embeddings: list[torch.Tensor],
        task: str,
        thing_flags: list[list[bool] | None] | None = None,
        threshold: float | None = None,
    ) -> list[SegmentationResult]:
        """Open-vocabulary semantic / instance / panoptic segmentation, one vocabulary per image."""
        check_segment_task(task)
        if len(class_embeddings) != len(images):
            raise ValueError("class_embeddings needs one (C_i, D) tensor per image")
        dim = self.model.cfg.text.projection_dim
        for i, text in enumerate(class_embeddings):
            if text.ndim != 2 or text.shape[0] == 0 or text.shape[1] != dim:
                shape = tuple(text.shape)
                raise ValueError(f"class_embeddings[{i}] must be (C, {dim}) with C >= 1, got {shape}")
            if (
                thing_flags is not None
                and thing_flags[i] is not None
                and len(thing_flags[i]) != text.shape[0]
            ):
                raise ValueError(f"thing_flags[{i}] needs {text.shape[0]} flags, got {len(thing_flags[i])}")
        batch, features = self._encode(images, "segmentation")
        with self._autocast():
            head, _ = self.model.decoder.forward_seg(features.memory)
        background = self._background_embedding()
        scale = self.model.text_encoder.logit_scale
        results = []
        for i, text in enumerate(class_embeddings):
            text = torch.cat((text.to(self.device, torch.float32), background), dim=0)
            logits = class_logits(head.embeds[i].float(), text, scale)
            rows = mask_rows(task, logits, threshold)  # upsample only the masks the task reads
            masks = self._mask_logits(head.masks[i, rows], batch, i)
            flags = [True] * (text.shape[0] - 1) if thing_flags is None else thing_flags[i]
            flags = [True] * (text.shape[0] - 1) if flags is None else flags
            segments = segments_from_outputs(task, logits[rows], masks, flags, threshold)
            results.append(SegmentationResult(task, batch.original_sizes[i], segments))
        return results

    @torch.inference_mode()
    def refer(
        self,
        images: list[np.ndarray],
        phrases: list[str],
        multi: bool = False,
        threshold: float | None = None,
    ) -> list[ReferringResult]:
        """Referring segmentation, one phrase per image: the best grounding query, or with `multi`
        every query whose grounding probability passes `threshold`."""
        if len(phrases) != len(images):
            raise ValueError("refer needs one phrase per image")
        batch, features = self._encode(images, "grounding")
        ids, attention = self.tokenizer.encode(
            list(phrases), context_length=self.model.cfg.text.context_length
        )
        ids, attention = ids.to(self.device), attention.to(self.device)
        encoder = self.model.text_encoder
        with self._autocast():
            token_feats = encoder.token_features(ids)
            class_emb = encoder.eos_features(ids).float()
            tokens = [token_feats[i][attention[i].bool()] for i in range(len(phrases))]
            head = self.model.decoder.forward_grounding(features.memory, tokens)
        q = self.model.cfg.decoder.num_queries
        temperature = encoder.logit_scale.exp().clamp(max=100)
        if threshold is None:
            threshold = REFER_THRESHOLD
        results = []
        for i, phrase in enumerate(phrases):
            cosine = (
                grounding_scores(head.embeds[i, q:].float(), class_emb[i], encoder.logit_scale) / temperature
            )
            chosen = select_referring(cosine, multi, threshold)
            matches = []
            if chosen:
                masks = self._mask_logits(head.masks[i, q:][chosen], batch, i)
                for k, query in enumerate(chosen):
                    matches.append(ReferringMatch(float(cosine[query]), (masks[k] > 0).cpu().numpy()))
            results.append(ReferringResult(phrase, batch.original_sizes[i], matches))
        return results

    @torch.inference_mode()
    def caption_tokens(self, images: list[np.ndarray], steps: int = CAPTION_STEPS, early_stop: bool = True):
        """Greedy caption ids (B, 77) as the official decoder makes them (all start tokens, position
        s+1 set at step s). With `early_stop`, stops once every row holds an end-of-text token, which
        leaves the decoded text unchanged."""
        _, features = self._encode(images, "captioning")
        with self._autocast():
            return self.model.greedy_caption(features, steps, early_stop)

    def caption(self, images: list[np.ndarray], beams: int = 1) -> list[str]:
        """One caption per image, the text before the first end-of-text and the first '.'.

        beams = 1: greedy, the official decoding. beams > 1: beam search (`models.beam_caption`); of
        its finished captions the one with the highest summed log-probability + CAPTION_RANK_WEIGHT x
        the model's own image-text retrieval score."""
        if beams == 1:
            tokens = self.caption_tokens(images)
            return [caption_from_tokens(row, self.tokenizer) for row in tokens.tolist()]
        if self.runtime != "torch":
            raise ValueError(f"beam search needs the torch runtime, not {self.runtime!r}; use beams=1")
        _, features = self._encode(images, "captioning")
        with self._autocast():
            found = beam_caption(self.model, features, beams, CAPTION_STEPS, {EOS_ID, PERIOD_ID})
        texts = [[caption_from_tokens(c.ids, self.tokenizer) for c in candidates] for candidates in found]
        text_emb = self.embed_texts([text for image_texts in texts for text in image_texts])
        image_emb = self.embed_images(images)  # the retrieval pass, at the retrieval input size
        captions, first = [], 0
        for i, candidates in enumerate(found):
            retrieval = text_emb[first : first + len(candidates)] @ image_emb[i]
            first += len(candidates)
            log_probs = torch.tensor([c.log_prob for c in candidates])
            captions.append(texts[i][int((log_probs + CAPTION_RANK_WEIGHT * retrieval).argmax())])
        return captions

    @torch.inference_mode()
    def image_embeddings(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """The two retrieval image embeddings, unnormalised, each (B, D): the pooled class query of
        the segmentation pass (`pred_captions[:, Q-1]`) and res5 pooled @ backbone_proj."""
        _, features = self._encode(images, "retrieval")
        with self._autocast():
            head, _ = self.model.decoder.forward_seg(features.memory)
            return head.embeds[:, -1].float(), self.model.backbone_embedding(features).float()

    def embed_images(self, images: list[np.ndarray]) -> torch.Tensor:
        """(B, D): 0.5 * (decoder / |decoder| + backbone / |backbone|), so that its dot product with
        `embed_texts` is the official two-embedding ensemble retrieval score."""
        decoder, backbone = self.image_embeddings(images)
        return 0.5 * (
            decoder / decoder.norm(dim=-1, keepdim=True) + backbone / backbone.norm(dim=-1, keepdim=True)
        )

    def retrieve(self, images: list[np.ndarray], texts: list[str]) -> torch.Tensor:
        """(B, N) image x text scores: 0.5 cos(decoder, text) + 0.5 cos(backbone, text)."""
        decoder, backbone = self.image_embeddings(images)
        with torch.inference_mode():
            ids, _ = self.tokenizer.encode(list(texts), context_length=self.model.cfg.text.context_length)
            with self._autocast():
                text = self.model.text_encoder.eos_features(ids.to(self.device)).float()
            return retrieval_scores(decoder, backbone, text)


def weights_file(path: Path) -> Path:
    """The file that identifies a checkpoint: itself, or the safetensors of a `save_pretrained` folder."""
    return path / "model.safetensors" if path.is_dir() else path


class FamilyPredictor:
    """What the OpenSeeD and Mask2Former predictors share: a torch model with its name, weights
    identity, device and precision. A subclass sets `family`, its config lookup (`get_config`), its
    model class and, if not `models.checkpoint.load_checkpoint`, its weight loader, and adds its tasks
    and `info` fields (see the module docstring)."""

    family = ""
    checkpoint_formats = ".pt or .safetensors"  # named in the error for a missing checkpoint

    def __init__(self, model: nn.Module, name: str, weights_id: str, device: str, precision: str) -> None:
        self.model = model
        self.name = name
        self.device = torch.device(device)
        self.runtime = "torch"
        self.precision = precision
        self.model_id = f"{name}@{weights_id}"

    @staticmethod
    def get_config(name: str) -> Any:
        raise NotImplementedError

    @staticmethod
    def model_class(cfg: Any) -> nn.Module:
        raise NotImplementedError

    @staticmethod
    def load_weights(model: nn.Module, checkpoint: str | Path) -> None:
        load_checkpoint(model, checkpoint)

    @classmethod
    def build(cls, name: str, checkpoint: str | Path | None) -> tuple[nn.Module, str]:
        """The model of config `name` with its weights, and the weights' identity. Released configs
        need a checkpoint; the untrained miniatures get a seeded initialisation (with a warning)."""
        cfg = cls.get_config(name)
        if checkpoint is None and cfg.released:
            raise ValueError(
                f"model {name!r} needs a checkpoint: pass checkpoint=PATH (the service setting is "
                f"OPENSET_CHECKPOINT) pointing at the released {cls.checkpoint_formats} file"
            )
        with torch.random.fork_rng():  # deterministic, without touching the caller's random state
            torch.manual_seed(DEMO_SEED)
            model = cls.model_class(cfg)
        if checkpoint is None:
            logger.warning("model %r has no weights: using an untrained, seeded initialisation", name)
            return model.eval(), f"untrained-seed{DEMO_SEED}"
        cls.load_weights(model, checkpoint)
        return model.eval(), quick_hash(weights_file(Path(checkpoint)))[:12]

    @classmethod
    def from_config(
        cls,
        name: str,
        checkpoint: str | Path | None = None,
        device: str = "cpu",
        runtime: str = "torch",
        precision: str = "fp32",
        compile: bool = False,
    ) -> FamilyPredictor:
        """Same options as `Predictor.from_config`; these families are served by torch only (their
        ONNX exports are checked by `openset export verify`)."""
        if runtime != "torch":
            raise ValueError(f"{cls.family} models run on the torch runtime only (got {runtime!r})")
        check_precision(precision)
        model, weights_id = cls.build(name, checkpoint)
        model = model.to(device)
        prepare_model(model, precision, compile=compile, device=device)
        return cls(model, name, weights_id, device, precision)

    def base_info(self) -> dict:
        """The `info` fields every family has; subclasses add theirs."""
        resize = self.model.cfg.resize
        return {
            "name": self.name,
            "model_id": self.model_id,
            "family": self.family,
            "runtime": self.runtime,
            "device": str(self.device),
            "precision": self.precision,
            "input_sizes": {"segmentation": {"short": resize.short, "max": resize.max_size}},
            "num_queries": self.model.cfg.decoder.num_queries,
        }


def mask_rows(task: str, logits: torch.Tensor, threshold: float | None) -> torch.Tensor | slice:
    """The queries whose masks `task` reads, from the class logits (Q, C+1): panoptic reads only the
    queries it keeps (best class not background, probability above the threshold: their indices),
    the other tasks read all (a full slice). Each mask is resized on its own, so resizing only these
    gives the same segments."""
    if task != "panoptic":
        return slice(None)
    object_threshold = OBJECT_MASK_THRESHOLD if threshold is None else threshold
    scores, labels = logits.softmax(dim=-1).max(dim=-1)
    return torch.nonzero((labels != logits.shape[-1] - 1) & (scores > object_threshold)).flatten()


def segments_from_outputs(
    task: str, logits: torch.Tensor, masks: torch.Tensor, thing_flags: list[bool], threshold: float | None
) -> list[Segment]:
    """Segments of one image from its class logits (Q, C+1) and mask logits (Q, H, W)."""
    if task == "semantic":
        return semantic_segments(semantic_inference(logits, masks), thing_flags, threshold)
    if task == "panoptic":
        object_threshold = OBJECT_MASK_THRESHOLD if threshold is None else threshold
        panoptic, info = panoptic_inference(logits, masks, thing_flags, object_threshold, OVERLAP_THRESHOLD)
        return [
            Segment(s["id"], s["category_id"], s["score"], s["isthing"], (panoptic == s["id"]).cpu().numpy())
            for s in info
        ]
    result = instance_inference(logits, masks, thing_flags, top_k=INSTANCE_TOPK)
    minimum = INSTANCE_THRESHOLD if threshold is None else threshold
    segments = []
    for score, label, mask in zip(result["scores"], result["labels"], result["masks"], strict=True):
        if float(score) > minimum and bool(mask.any()):
            segments.append(Segment(len(segments) + 1, int(label), float(score), True, mask.cpu().numpy()))
    return segments


def semantic_segments(
    sem: torch.Tensor, thing_flags: Sequence[bool], threshold: float | None
) -> list[Segment]:
    """One segment per class that wins pixels of the per-class maps (C, H, W); its score is the mean
    share of its class map over its pixels (segments below `threshold` are dropped)."""
    labels = sem.argmax(dim=0)
    share = sem / sem.sum(dim=0, keepdim=True).clamp_min(1e-12)
    segments = []
    for c in labels.unique().tolist():
        mask = labels == c
        score = float(share[c][mask].mean())
        if threshold is not None and score < threshold:
            continue
        segments.append(Segment(len(segments) + 1, c, score, bool(thing_flags[c]), mask.cpu().numpy()))
    return segments
