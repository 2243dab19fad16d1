"""An exported model that the Predictor drives like `XDecoderModel`: the same methods, each running the
exported graphs (ONNX Runtime sessions or TensorRT engines), so pre- and postprocessing stay shared.

    model = load_exported("exports/demo", runtime="onnxruntime", device="cpu")
    features = model.encode_images(images (B, 3, H, W), padded_sizes)
    head, _ = model.decoder.forward_seg(features.memory)     # head.embeds (B, Q, D), head.masks
    model.decoder.forward_grounding(features.memory, tokens) # tokens: per image (T_i, D)
    model.greedy_caption(features, steps, early_stop)        # ids (B, 77), the loop in Python
    model.backbone_embedding(features)                       # (B, D)
    model.text_encoder.encode_class_names / token_features / eos_features / logit_scale

Padded batches: the graphs run unpadded batches, so images are grouped by their own padded size
and each group runs alone; outputs are put back into the batch layout, zero outside each image's
area (the Predictor reads only that area). The results equal torch's, which are the same batched
and alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from export.graphs import FEATURES
from export.manifest import GraphEntry, Manifest, check_config, config_from_dict, read_manifest
from models.language.text_encoder import LanguageEncoder, TextEncoderConfig
from models.language.tokenizer import BOS_ID, EOS_ID, ClipTokenizer

RUNTIMES = ("onnxruntime", "tensorrt")


class GraphRunner(Protocol):
    """One exported graph, ready to run: named numpy inputs -> named numpy outputs."""

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class OrtRunner:
    """A graph in an ONNX Runtime session (the MSDA plugin node registered when present)."""

    def __init__(self, path: Path, providers: list[str], threads: int | None = None) -> None:
        import onnx
        import onnxruntime as ort
        from onnxruntime_extensions import get_library_path

        from models.ops.ort_plugin import _move_plugin_nodes, _register_python_op, has_plugin_nodes

        proto = onnx.load(str(path))
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if has_plugin_nodes(proto):  # as `models.ops.ort_plugin.ort_session`, with our thread count
            proto = _move_plugin_nodes(proto, _register_python_op())
            options.register_custom_ops_library(get_library_path())
        self.session = ort.InferenceSession(proto.SerializeToString(), options, providers=providers)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self.outputs, {name: feeds[name] for name in self.inputs})
        return dict(zip(self.outputs, values, strict=True))


def ort_providers(device: str) -> list[str]:
    """CUDA first for a cuda device when this onnxruntime build has it, CPU always."""
    import onnxruntime as ort

    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError(
                "device 'cuda' with runtime 'onnxruntime' needs onnxruntime-gpu (CUDAExecutionProvider); "
                f"this build has {ort.get_available_providers()}"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@dataclass
class Group:
    """Images of the batch with one padded size (h, w), and their graph outputs."""

    indices: list[int]
    size: tuple[int, int]
    arrays: dict[str, np.ndarray]


@dataclass
class ExportedFeatures:
    """What `encode_images` returns; it is its own `memory` (the Predictor passes `features.memory`)."""

    groups: list[Group]
    batch: int
    padded: tuple[int, int]  # (H, W) of the whole padded batch

    @property
    def memory(self) -> ExportedFeatures:
        return self


@dataclass
class RuntimeHead:
    """Decoder outputs in batch layout: embeds (B, R, D), masks (B, R, H/4, W/4)."""

    embeds: torch.Tensor
    masks: torch.Tensor


class ExportedModel:
    """The Predictor-facing model over exported graphs (see the module docstring)."""

    def __init__(
        self, manifest: Manifest, open_graph: Callable[[GraphEntry], GraphRunner], device: str
    ) -> None:
        self.manifest = manifest
        self.cfg = config_from_dict(manifest.config)
        self.device = torch.device(device)
        self._open_graph = open_graph
        self._runners: dict[tuple[str, tuple[int, int] | None], GraphRunner] = {}
        self.decoder = ExportedDecoder(self)
        self.text_encoder = ExportedTextEncoder(self)

    # XDecoderModel's nn.Module calls the Predictor makes
    def to(self, device: str | torch.device) -> ExportedModel:
        return self

    def eval(self) -> ExportedModel:
        return self

    def run(
        self, name: str, size: tuple[int, int] | None, feeds: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Run graph `name` (the one for image size `size`) on numpy feeds."""
        entry = self.manifest.graph(name, size)
        key = (name, None if entry.size is None else tuple(entry.size))
        if key not in self._runners:
            self._runners[key] = self._open_graph(entry)
        return self._runners[key].run(feeds)

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def encode_images(
        self, images: torch.Tensor, sizes: Sequence[tuple[int, int]] | None = None
    ) -> ExportedFeatures:
        """images (B, 3, H, W) normalised and zero-padded; sizes: each image's own padded size."""
        b, _, h, w = images.shape
        sizes = list(sizes) if sizes is not None else [(h, w)] * b
        groups = []
        for size in dict.fromkeys(tuple(s) for s in sizes):
            indices = [i for i, s in enumerate(sizes) if tuple(s) == size]
            crop = images[indices, :, : size[0], : size[1]].float().cpu().numpy()
            groups.append(Group(indices, size, self.run("image_encoder", size, {"images": crop})))
        return ExportedFeatures(groups, b, (h, w))

    def backbone_embedding(self, features: ExportedFeatures) -> torch.Tensor:
        """(B, D): res5 pooled over each image's area @ backbone_proj."""
        return self.tensor(gather(features, [g.arrays["backbone_embedding"] for g in features.groups]))

    def greedy_caption(
        self, features: ExportedFeatures, steps: int = 50, early_stop: bool = True
    ) -> torch.Tensor:
        """Greedy caption ids (B, L) exactly as `XDecoderModel.greedy_caption`, one exported
        `caption_step` per step around the cached `caption_state`."""
        length = self.cfg.text.context_length
        steps = min(steps, length - 1)
        rows = []
        for group in features.groups:
            feeds = {name: group.arrays[name] for name in FEATURES}
            state = self.run("caption_state", group.size, feeds)
            tokens = np.full((len(group.indices), length), BOS_ID, dtype=np.int64)
            for s in range(steps):
                prefix = self.text_encoder.run(tokens[:, : s + 1])["token_features"]
                logits = self.run("caption_step", group.size, {"token_features": prefix, **state})["logits"]
                tokens[:, s + 1] = logits.argmax(axis=-1)
                if early_stop and bool((tokens[:, 1 : s + 2] == EOS_ID).any(axis=1).all()):
                    break
            rows.append(tokens)
        return self.tensor(gather(features, rows))


def gather(features: ExportedFeatures, per_group: list[np.ndarray]) -> np.ndarray:
    """Per-group arrays (b_g, ...) of equal trailing shape -> one (B, ...) array in batch order."""
    out = np.zeros((features.batch, *per_group[0].shape[1:]), dtype=per_group[0].dtype)
    for group, array in zip(features.groups, per_group, strict=True):
        out[group.indices] = array
    return out


def gather_masks(features: ExportedFeatures, per_group: list[np.ndarray]) -> np.ndarray:
    """Per-group masks (b_g, R, h/4, w/4) -> (B, R, H/4, W/4), zero outside each image's area."""
    h4, w4 = features.padded[0] // 4, features.padded[1] // 4
    rows = per_group[0].shape[1]
    out = np.zeros((features.batch, rows, h4, w4), dtype=per_group[0].dtype)
    for group, masks in zip(features.groups, per_group, strict=True):
        out[group.indices, :, : masks.shape[2], : masks.shape[3]] = masks
    return out


class ExportedDecoder:
    """`XDecoder.forward_seg` and `forward_grounding` over the exported decoder graphs."""

    def __init__(self, model: ExportedModel) -> None:
        self.model = model
        self.num_queries = model.cfg.decoder.num_queries

    def forward_seg(self, memory: ExportedFeatures) -> tuple[RuntimeHead, list]:
        """Segmentation pass -> (head with embeds (B, Q, D) and masks (B, Q, H/4, W/4), [])."""
        dim = self.model.cfg.text.projection_dim
        # The graph also scores a vocabulary; the Predictor scores per image itself, so one row is fed.
        probe = np.zeros((1, dim), dtype=np.float32)
        probe[0, 0] = 1.0
        embeds, masks = [], []
        for group in memory.groups:
            feeds = {name: group.arrays[name] for name in FEATURES}
            out = self.model.run("segment_decoder", group.size, {**feeds, "class_embeddings": probe})
            embeds.append(out["embeds"])
            masks.append(out["masks"])
        head = RuntimeHead(
            self.model.tensor(gather(memory, embeds)), self.model.tensor(gather_masks(memory, masks))
        )
        return head, []

    def forward_grounding(self, memory: ExportedFeatures, tokens: list[torch.Tensor]) -> RuntimeHead:
        """Grounding pass; tokens: per image its phrase tokens (T_i, D). Rows: Q then Q-1 copies."""
        embeds, masks = [], []
        for group in memory.groups:
            mine = [tokens[i].float().cpu().numpy() for i in group.indices]
            t_max = max(t.shape[0] for t in mine)
            padded = np.zeros((len(mine), t_max, mine[0].shape[1]), dtype=np.float32)
            valid = np.zeros((len(mine), t_max), dtype=bool)
            for k, t in enumerate(mine):
                padded[k, : t.shape[0]] = t
                valid[k, : t.shape[0]] = True
            feeds = {name: group.arrays[name] for name in FEATURES}
            out = self.model.run(
                "grounding_decoder", group.size, {**feeds, "tokens": padded, "token_valid": valid}
            )
            embeds.append(out["embeds"])
            masks.append(out["masks"])
        return RuntimeHead(
            self.model.tensor(gather(memory, embeds)), self.model.tensor(gather_masks(memory, masks))
        )


class ExportedTextEncoder:
    """`LanguageEncoder`'s calls over the exported `text_encoder` graph."""

    def __init__(self, model: ExportedModel) -> None:
        self.model = model
        text = model.cfg.text
        self.config = TextEncoderConfig(
            width=text.width,
            layers=text.layers,
            heads=text.heads,
            context_length=text.context_length,
            vocab_size=text.vocab_size,
            projection_dim=text.projection_dim,
        )
        self.logit_scale = torch.tensor(model.manifest.logit_scale, device=model.device)
        # Stands for the projection in `LanguageEncoder.encode_class_names` (its dtype and device only).
        self.lang_proj = torch.zeros(0, device=model.device)

    def run(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        return self.model.run("text_encoder", None, {"input_ids": ids.astype(np.int64)})

    def token_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(N, L) -> (N, L, D)."""
        return self.model.tensor(self.run(input_ids.cpu().numpy())["token_features"])

    def eos_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(N, L) -> (N, D) at each row's first EOS; runs only up to the last row's EOS (causal)."""
        ids = input_ids.cpu().numpy()
        end = int(ids.argmax(axis=1).max()) + 1
        return self.model.tensor(self.run(ids[:, :end])["eos_features"])

    def encode_class_names(self, names: Sequence[str], tokenizer: ClipTokenizer) -> torch.Tensor:
        """(C, D) unit-norm class embeddings: the template averaging of `LanguageEncoder` itself,
        with this object's `eos_features`."""
        return LanguageEncoder.encode_class_names(self, names, tokenizer)  # type: ignore[arg-type]


def open_runner(
    runtime: str, directory: Path, device: str, threads: int | None = None
) -> Callable[[GraphEntry], GraphRunner]:
    """The function that opens one manifest entry of `directory` with `runtime` (`threads`: ONNX
    Runtime's intra-op threads; None: its default, one per core)."""
    if runtime == "onnxruntime":
        providers = ort_providers(device)
        return lambda entry: OrtRunner(directory / entry.file, providers, threads)
    if runtime == "tensorrt":
        from export.tensorrt_runtime import TrtRunner

        return lambda entry: TrtRunner(directory / entry.file, device)
    raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")


def load_exported(
    directory: str | Path,
    runtime: str = "onnxruntime",
    device: str = "cpu",
    same_config: bool = True,
    threads: int | None = None,
) -> ExportedModel:
    """The exported model in `directory` (an `openset export onnx` or `export tensorrt` output).

    `same_config`: the export must match the config the code now has under its name.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if same_config:
        check_config(manifest)
    expected = "tensorrt" if runtime == "tensorrt" else "onnx"
    if manifest.kind != expected:
        raise ValueError(
            f"{directory} holds a {manifest.kind} export; runtime {runtime!r} needs a {expected} export"
        )
    return ExportedModel(manifest, open_runner(runtime, directory, device, threads), device)


def load_for_predictor(
    name: str, checkpoint: str | Path | None, runtime: str, device: str
) -> tuple[ExportedModel, str]:
    """What `Predictor.from_config(name, checkpoint, device, runtime)` runs for the exported runtimes:
    the model of the export directory `checkpoint` and its weights' identity. ONNX Runtime gets
    torch's thread count (the worker sets it from OPENSET_TORCH_THREADS)."""
    if checkpoint is None or not Path(checkpoint).is_dir():
        command = "onnx" if runtime == "onnxruntime" else "tensorrt"
        raise ValueError(
            f"runtime {runtime!r} runs an export: set checkpoint (OPENSET_CHECKPOINT) to the directory "
            f"written by `openset export {command}`, got {checkpoint!r}"
        )
    model = load_exported(checkpoint, runtime, device, threads=torch.get_num_threads())
    if model.manifest.model != name:
        raise ValueError(f"{checkpoint} holds an export of {model.manifest.model!r}, not of {name!r}")
    return model, model.manifest.weights_id
