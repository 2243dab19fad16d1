"""The exported graphs: thin `nn.Module` wrappers around parts of `XDecoderModel`, one per ONNX file.

Every image graph runs on an unpadded batch (each image fills the batch: `sizes=None` in
`XDecoderModel.encode_images`); runtimes group images by padded size, so results equal the
single-image runs of torch.

    image_encoder    images (B, 3, H, W)        -> mask_features (B, Dm, H/4, W/4),
                                                   ms0 (B, D, H/32, W/32), ms1 (.., H/16), ms2 (.., H/8),
                                                   backbone_embedding (B, Dp)
    segment_decoder  features, class_embeddings (C, Dp)
                                                -> class_logits (B, Q, C), embeds (B, Q, Dp),
                                                   masks (B, Q, H/4, W/4)
    grounding_decoder features, tokens (B, T, Dp), token_valid (B, T) bool
                                                -> embeds (B, 2Q-1, Dp), masks (B, 2Q-1, H/4, W/4)
    caption_state    features                   -> per layer l: cross_k{l}, cross_v{l} (K_l, B, D),
                                                   self_k{l}, self_v{l} (Q, B, D)
    caption_step     token_features (B, L, Dp), the caption state
                                                -> logits (B, V) of position L-1
    text_encoder     input_ids (N, L) int64     -> token_features (N, L, Dp), eos_features (N, Dp)

`features` is (mask_features, ms0, ms1, ms2). The class embeddings are an input, so the vocabulary
stays dynamic; greedy captioning's loop stays in Python around `caption_step`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from models.decoders.xdecoder import DecoderMemory, XDecoder, class_logits
from models.xdecoder import XDecoderModel

FEATURES = ["mask_features", "ms0", "ms1", "ms2"]


@dataclass
class GraphSpec:
    """One exported graph: its module, names, the dynamic axes of each input and output."""

    name: str
    module: nn.Module
    inputs: list[str]
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)


def memory_of(decoder: XDecoder, features: tuple[torch.Tensor, ...]) -> DecoderMemory:
    mask_features, *multi_scale = features
    return decoder.prepare_memory(list(multi_scale), mask_features, None)


class ImageEncoder(nn.Module):
    def __init__(self, model: XDecoderModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.model.encode_images(images, None)
        memory = features.memory
        return (memory.mask_features, *features.multi_scale, self.model.backbone_embedding(features))


class SegmentDecoder(nn.Module):
    def __init__(self, model: XDecoderModel) -> None:
        super().__init__()
        self.decoder = model.decoder
        self.text = model.text_encoder

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        *features, class_embeddings = inputs
        head, _ = self.decoder.forward_seg(memory_of(self.decoder, tuple(features)))
        logits = class_logits(head.embeds, class_embeddings, self.text.logit_scale)
        return logits, head.embeds, head.masks


class GroundingDecoder(nn.Module):
    """`XDecoder.forward_grounding` with the phrase tokens as one padded tensor and a validity mask,
    so phrases of different lengths share a batch inside one graph."""

    def __init__(self, model: XDecoderModel) -> None:
        super().__init__()
        self.decoder = model.decoder

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        *features, tokens, token_valid = inputs
        dec = self.decoder
        memory = memory_of(dec, tuple(features))
        batch, t_max = token_valid.shape
        q = dec.num_queries
        n_q = 2 * q - 1
        grounding = tokens.transpose(0, 1)  # (T, B, D)
        # Blocked (True) pairs as in `forward_grounding`: the Q queries see only themselves (with the
        # official query mask); copies and tokens see each other but not the Q queries; padded tokens
        # are seen by nobody.
        blocked = token_valid.new_ones(batch, n_q + t_max, n_q + t_max)
        queries = dec.self_attn_mask[0, :q, :q].expand(batch, q, q)
        top = torch.cat((queries, blocked[:, :q, q:]), dim=2)
        bottom = torch.cat((blocked[:, q:, :q], ~blocked[:, q:, q:]), dim=2)
        pad = torch.cat((~blocked[:, 0, :n_q], ~token_valid), dim=1)
        self_mask = torch.cat((top, bottom), dim=1) | pad[:, None, :]
        self_mask = self_mask.repeat_interleave(dec.num_heads, dim=0)

        output, qpos = dec._initial_queries(batch)
        output = torch.cat((output, output[:-1]), dim=0)
        qpos = torch.cat((qpos, qpos[:-1]), dim=0)
        token_state = grounding
        head = dec.heads(output, memory, 0, n_q)
        for i in range(dec.num_layers):
            level = i % len(memory.src)
            cross_mask = dec._cross_mask(head.attn_mask, memory, level)
            output = dec.transformer_cross_attention_layers[i](
                output, memory.src[level], memory.pos[level], qpos, cross_mask
            )
            joint = torch.cat((output, token_state), dim=0)
            joint_pos = torch.cat((qpos, grounding), dim=0)
            joint = dec.transformer_self_attention_layers[i](joint, joint_pos, self_mask)
            joint = dec.transformer_ffn_layers[i](joint)
            output, token_state = joint[:n_q], joint[n_q:]
            head = dec.heads(output, memory, (i + 1) % len(memory.src), n_q)
        return head.embeds, head.masks


class CaptionState(nn.Module):
    """`XDecoder.caption_state` flattened into 4 tensors per layer."""

    def __init__(self, model: XDecoderModel) -> None:
        super().__init__()
        self.decoder = model.decoder

    def forward(self, *features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        state = self.decoder.caption_state(memory_of(self.decoder, features))
        out: list[torch.Tensor] = []
        for (cross_k, cross_v), (self_k, self_v) in zip(state.cross_kv, state.self_kv, strict=True):
            out += [cross_k, cross_v, self_k, self_v]
        return tuple(out)


class CaptionStep(nn.Module):
    """One greedy step: `XDecoder.caption_rows` on the first L positions, then the vocabulary logits
    of position L-1 (token_embedding as the output projection, as in `greedy_caption`)."""

    def __init__(self, model: XDecoderModel) -> None:
        super().__init__()
        self.decoder = model.decoder
        self.vocab = model.text_encoder.lang_encoder.token_embedding

    def forward(self, token_features: torch.Tensor, *state: torch.Tensor) -> torch.Tensor:
        from models.decoders.xdecoder import CaptionState as State

        layers = range(self.decoder.num_layers)
        caption_state = State(
            cross_kv=[(state[4 * i], state[4 * i + 1]) for i in layers],
            cross_pad=[None for _ in layers],
            self_kv=[(state[4 * i + 2], state[4 * i + 3]) for i in layers],
        )
        rows = self.decoder.caption_rows(caption_state, token_features)
        return rows[:, -1] @ self.vocab.weight.transpose(0, 1)


class TextEncoder(nn.Module):
    """Token features and first-EOS features of the full given length (no data-dependent cut)."""

    def __init__(self, model: XDecoderModel) -> None:
        super().__init__()
        self.text = model.text_encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.text.hidden_states(input_ids)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        eos = hidden[rows, input_ids.argmax(dim=1)]
        return hidden @ self.text.lang_proj, eos @ self.text.lang_proj


def state_names(num_layers: int) -> list[str]:
    return [f"{kind}{i}" for i in range(num_layers) for kind in ("cross_k", "cross_v", "self_k", "self_v")]


def graph_specs(model: XDecoderModel, dynamic_size: bool) -> list[GraphSpec]:
    """The six graphs of `model`; batch (and text) axes are always dynamic, image axes when asked."""
    layers = model.cfg.decoder.num_layers
    image_axes = {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}
    feature_axes = {
        "mask_features": {0: "batch", 2: "h4", 3: "w4"},
        "ms0": {0: "batch", 2: "h32", 3: "w32"},
        "ms1": {0: "batch", 2: "h16", 3: "w16"},
        "ms2": {0: "batch", 2: "h8", 3: "w8"},
    }
    if not dynamic_size:
        feature_axes = {name: {0: "batch"} for name in FEATURES}
    masks_axes = {0: "batch", 2: "h4", 3: "w4"} if dynamic_size else {0: "batch"}
    state = state_names(layers)
    state_axes: dict[str, dict[int, str]] = {}
    for i in range(layers):
        level = ("k32", "k16", "k8")[i % 3]
        state_axes |= {f"cross_k{i}": {0: level, 1: "batch"}, f"cross_v{i}": {0: level, 1: "batch"}}
        state_axes |= {f"self_k{i}": {1: "batch"}, f"self_v{i}": {1: "batch"}}
    if not dynamic_size:
        state_axes = {name: {1: "batch"} for name in state}
    return [
        GraphSpec(
            "image_encoder",
            ImageEncoder(model),
            ["images"],
            [*FEATURES, "backbone_embedding"],
            {"images": image_axes, **feature_axes, "backbone_embedding": {0: "batch"}},
        ),
        GraphSpec(
            "segment_decoder",
            SegmentDecoder(model),
            [*FEATURES, "class_embeddings"],
            ["class_logits", "embeds", "masks"],
            {
                **feature_axes,
                "class_embeddings": {0: "classes"},
                "class_logits": {0: "batch", 2: "classes"},
                "embeds": {0: "batch"},
                "masks": masks_axes,
            },
        ),
        GraphSpec(
            "grounding_decoder",
            GroundingDecoder(model),
            [*FEATURES, "tokens", "token_valid"],
            ["embeds", "masks"],
            {
                **feature_axes,
                "tokens": {0: "batch", 1: "tokens"},
                "token_valid": {0: "batch", 1: "tokens"},
                "embeds": {0: "batch"},
                "masks": masks_axes,
            },
        ),
        GraphSpec(
            "caption_state", CaptionState(model), list(FEATURES), state, {**feature_axes, **state_axes}
        ),
        GraphSpec(
            "caption_step",
            CaptionStep(model),
            ["token_features", *state],
            ["logits"],
            {"token_features": {0: "batch", 1: "length"}, **state_axes, "logits": {0: "batch"}},
        ),
        GraphSpec(
            "text_encoder",
            TextEncoder(model),
            ["input_ids"],
            ["token_features", "eos_features"],
            {
                "input_ids": {0: "texts", 1: "length"},
                "token_features": {0: "texts", 1: "length"},
                "eos_features": {0: "texts"},
            },
        ),
    ]
