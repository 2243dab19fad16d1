"""The OpenSeeD decoder (`sem_seg_head.predictor`; MaskDINO-style), with the official parameter names.

Inputs are the pixel decoder's levels in encoder order [1/8, 1/16, 1/32, 1/64] and the mask features
at 1/4. The decoder flattens the levels in the *reverse* order [1/64, 1/32, 1/16, 1/8] (its memory).

1. Two-stage query selection (depends on the vocabulary): every memory position gets a proposal box
   (its pixel centre, size 0.05 * 2**level); positions whose proposal is not strictly inside
   (0.01, 0.99) are invalid. `enc_output` + `enc_output_norm` map the memory, class logits come from
   the text embeddings, and the `num_queries` positions with the highest max class logit become the
   queries, with boxes `_bbox_embed(mem) + proposal` (inverse-sigmoid space).
2. The initial prediction from the selected features.
3. `num_layers` post-norm layers: self-attention, deformable cross-attention on 4-d box references
   (`MSDeformAttn`, `openset::ms_deform_attn`), FFN. The query position is `ref_point_head` of the
   sine embedding of the reference box (y, x, w, h). After each layer the box is refined with the
   un-normed output: ref <- sigmoid(bbox_embed(out) + inverse_sigmoid(ref)).
4. Heads on `decoder_norm(out)` (the layer output `hs`), which apply `decoder_norm` again (the
   official double LayerNorm): class logits exp(logit_scale) * cos(LN(hs) @ class_embed, T) and masks
   mask_embed(LN(hs)) . mask_features; boxes sigmoid(bbox_embed(hs) + inverse_sigmoid(ref_in)).

One box MLP is shared under every official name (`_bbox_embed`, `bbox_embed.0..8`,
`decoder.bbox_embed.0..8`) and `decoder.norm` is `decoder_norm`, so `state_dict()` lists every alias
and the released file loads strictly. `lang_mapper` is kept for loading only (training denoising).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.decoders.xdecoder import MLP
from models.language.text_encoder import LanguageEncoder, TextEncoderConfig
from models.ops import MSDeformAttn


@dataclass
class OpenSeeDDecoderConfig:
    """The OpenSeeD decoder (config `openseed_swint_lang`: 300 queries, 9 layers, 4 levels)."""

    hidden_dim: int = 256
    num_queries: int = 300
    num_layers: int = 9
    num_heads: int = 8
    dim_feedforward: int = 2048
    num_feature_levels: int = 4
    num_points: int = 4
    mask_dim: int = 256
    proposal_base_size: float = 0.05  # proposal w = h = base * 2**level (decoder level order)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) with x clamped to [0, 1] and both x and 1 - x clamped below at `eps`."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def box_sine_embedding(boxes: torch.Tensor, num_feats: int = 128) -> torch.Tensor:
    """Sine embedding of boxes (..., 4) as (cx, cy, w, h) in [0, 1] -> (..., 4 * num_feats).

    Per coordinate: v * 2pi / 10000**(2 * (i // 2) / num_feats), sin at even and cos at odd channels;
    the coordinates are concatenated in the order (y, x, w, h).
    """
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    dim_t = 10000 ** (2 * (dim_t // 2) / num_feats)

    def embed(v: torch.Tensor) -> torch.Tensor:
        pos = (v * (2 * math.pi))[..., None] / dim_t
        return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)

    x, y, w, h = boxes.unbind(-1)
    return torch.cat((embed(y), embed(x), embed(w), embed(h)), dim=-1)


def encoder_proposals(
    memory: torch.Tensor, spatial_shapes: list[tuple[int, int]], base_size: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two-stage proposals of the flattened memory (B, S, D), levels in `spatial_shapes` order.

    Returns the memory with invalid positions zeroed (B, S, D), the proposals in inverse-sigmoid
    space (B, S, 4) with +inf at invalid positions, and the validity (B, S) bool.
    """
    b = memory.shape[0]
    proposals = []
    for level, (h, w) in enumerate(spatial_shapes):
        ys, xs = torch.meshgrid(
            torch.linspace(0, h - 1, h, dtype=torch.float32, device=memory.device),
            torch.linspace(0, w - 1, w, dtype=torch.float32, device=memory.device),
            indexing="ij",
        )
        centres = (torch.stack((xs, ys), dim=-1) + 0.5) / torch.tensor(
            [w, h], dtype=torch.float32, device=memory.device
        )
        sizes = torch.full_like(centres, base_size * 2.0**level)
        proposals.append(torch.cat((centres, sizes), dim=-1).view(1, h * w, 4).expand(b, -1, -1))
    boxes = torch.cat(proposals, dim=1)
    valid = ((boxes > 0.01) & (boxes < 0.99)).all(dim=-1)
    logits = torch.log(boxes / (1 - boxes)).masked_fill(~valid[..., None], float("inf"))
    return memory.masked_fill(~valid[..., None], 0.0), logits, valid


def flatten_levels(levels: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Maps (B, D, h_l, w_l) -> flat (B, S, D) in the given order, and their (h, w)."""
    shapes = [(int(x.shape[-2]), int(x.shape[-1])) for x in levels]
    return torch.cat([x.flatten(2).transpose(1, 2) for x in levels], dim=1), shapes


class DeformableDecoderLayer(nn.Module):
    """Post-norm: self-attention (norm2), deformable cross-attention (norm1), FFN with ReLU (norm3)."""

    def __init__(self, cfg: OpenSeeDDecoderConfig) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.cross_attn = MSDeformAttn(d, cfg.num_feature_levels, cfg.num_heads, cfg.num_points)
        self.norm1 = nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, cfg.num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.linear1 = nn.Linear(d, cfg.dim_feedforward)
        self.linear2 = nn.Linear(cfg.dim_feedforward, d)
        self.norm3 = nn.LayerNorm(d)

    def forward(
        self,
        tgt: torch.Tensor,
        query_pos: torch.Tensor,
        reference: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
    ) -> torch.Tensor:
        """tgt, query_pos (B, Q, D); reference (B, Q, L, 4); memory (B, S, D) -> (B, Q, D)."""
        q = tgt + query_pos
        tgt = self.norm2(tgt + self.self_attn(q, q, tgt, need_weights=False)[0])
        attended = self.cross_attn(tgt + query_pos, reference, memory, spatial_shapes, level_start_index)
        tgt = self.norm1(tgt + attended)
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class DeformableDecoder(nn.Module):
    """`decoder`: the layers, `norm` (= the predictor's `decoder_norm`), `ref_point_head` and the
    shared `bbox_embed` list (both tied by `OpenSeeDDecoder`)."""

    def __init__(self, cfg: OpenSeeDDecoderConfig, norm: nn.LayerNorm) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.layers = nn.ModuleList(DeformableDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = norm
        self.ref_point_head = MLP(2 * d, d, d, 2)
        self.bbox_embed = nn.ModuleList()  # set by the predictor (one MLP shared by all layers)
        self.num_levels = cfg.num_feature_levels
        self.hidden_dim = d

    def forward(
        self,
        tgt: torch.Tensor,
        reference_logits: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """tgt (B, Q, D); reference_logits (B, Q, 4) boxes in inverse-sigmoid space; memory (B, S, D).

        Returns `hs` (per layer `norm(out)`, (B, Q, D)) and the references (num_layers + 1 boxes
        (B, Q, 4) after sigmoid: the input ones, then each layer's refinement).
        """
        output = tgt
        reference = reference_logits.sigmoid()
        references = [reference]
        hs = []
        for layer, box_head in zip(self.layers, self.bbox_embed, strict=True):
            per_level = reference[:, :, None].expand(-1, -1, self.num_levels, -1)
            query_pos = self.ref_point_head(box_sine_embedding(reference, self.hidden_dim // 2))
            output = layer(output, query_pos, per_level, memory, spatial_shapes, level_start_index)
            reference = (box_head(output) + inverse_sigmoid(reference)).sigmoid()
            references.append(reference)
            hs.append(self.norm(output))
        return hs, references


@dataclass
class OpenSeeDOutput:
    """pred_logits (B, Q, C); pred_boxes (B, Q, 4) cxcywh normalised to the padded input;
    pred_masks (B, Q, H/4, W/4) mask logits (None when masks were not asked for)."""

    pred_logits: torch.Tensor
    pred_boxes: torch.Tensor
    pred_masks: torch.Tensor | None


class OpenSeeDDecoder(nn.Module):
    """`sem_seg_head.predictor` (see the module docstring). `lang_encoder` is the text encoder."""

    def __init__(self, cfg: OpenSeeDDecoderConfig, text: TextEncoderConfig) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.cfg = cfg
        self.lang_mapper = nn.Parameter(torch.zeros(text.projection_dim, d))
        self.class_embed = nn.Parameter(torch.zeros(d, text.projection_dim))
        self.enc_output = nn.Linear(d, d)
        self.enc_output_norm = nn.LayerNorm(d)
        self.lang_encoder = LanguageEncoder(text)
        self.mask_embed = MLP(d, d, cfg.mask_dim, 3)
        self.decoder_norm = nn.LayerNorm(d)
        self.decoder = DeformableDecoder(cfg, self.decoder_norm)
        box_head = MLP(d, d, 4, 3)
        self.decoder.bbox_embed = nn.ModuleList([box_head] * cfg.num_layers)
        self._bbox_embed = box_head
        self.bbox_embed = self.decoder.bbox_embed
        nn.init.normal_(self.class_embed, std=0.02)
        nn.init.normal_(self.lang_mapper, std=0.02)

    # ------------------------------------------------------------------ heads

    def class_logits(self, features: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        """exp(logit_scale) * cos(features @ class_embed, T): (B, N, D), (C, E) -> (B, N, C)."""
        v = features @ self.class_embed
        v = v / (v.norm(dim=-1, keepdim=True) + 1e-7)
        return self.lang_encoder.logit_scale.exp() * (v @ class_embeddings.to(v.dtype).transpose(0, 1))

    def heads(
        self, output: torch.Tensor, mask_features: torch.Tensor, class_embeddings: torch.Tensor, masks: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Class logits (B, Q, C) and mask logits (B, Q, h, w) of `decoder_norm(output)` (B, Q, D)."""
        x = self.decoder_norm(output)
        logits = self.class_logits(x, class_embeddings)
        if not masks:
            return logits, None
        return logits, torch.einsum("bqc,bchw->bqhw", self.mask_embed(x), mask_features)

    def box_predictions(self, hs: list[torch.Tensor], references: list[torch.Tensor]) -> list[torch.Tensor]:
        """Boxes of every layer from its normed output: sigmoid(bbox_embed(hs_l) + logit(ref_l))."""
        return [
            (head(h) + inverse_sigmoid(ref)).sigmoid()
            for head, h, ref in zip(self.bbox_embed, hs, references[:-1], strict=True)
        ]

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        multi_scale: list[torch.Tensor],
        mask_features: torch.Tensor,
        class_embeddings: torch.Tensor,
        masks: bool = True,
        record: dict[str, torch.Tensor] | None = None,
    ) -> OpenSeeDOutput:
        """multi_scale: the pixel decoder's levels (B, D, h_l, w_l) in encoder order [1/8 .. 1/64];
        mask_features (B, mask_dim, H/4, W/4); class_embeddings (C, E) unit-norm text embeddings.

        `masks=False` skips the final mask logits (detection). `record` receives the intermediates
        under the reference names (`decoder.*`).
        """
        memory, shapes = flatten_levels(multi_scale[::-1])
        device = memory.device
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=device)
        level_start_index = torch.cat(
            (spatial_shapes.new_zeros(1), (spatial_shapes[:, 0] * spatial_shapes[:, 1]).cumsum(0)[:-1])
        )
        # Two-stage query selection.
        zeroed, proposals, valid = encoder_proposals(memory, shapes, self.cfg.proposal_base_size)
        enc_memory = self.enc_output_norm(self.enc_output(zeroed))
        enc_logits = self.class_logits(enc_memory, class_embeddings)
        enc_logits = enc_logits.masked_fill(~valid[..., None], float("-inf"))
        enc_boxes = self._bbox_embed(enc_memory) + proposals
        k = min(self.cfg.num_queries, memory.shape[1])
        scores, selected = enc_logits.max(dim=-1)[0].topk(k, dim=1)
        reference_logits = enc_boxes.gather(1, selected[..., None].expand(-1, -1, 4))
        tgt = enc_memory.gather(1, selected[..., None].expand(-1, -1, enc_memory.shape[-1]))

        hs, references = self.decoder(tgt, reference_logits, memory, spatial_shapes, level_start_index)
        pred_logits, pred_masks = self.heads(hs[-1], mask_features, class_embeddings, masks=masks)
        boxes = self.box_predictions(hs, references)
        if record is not None:
            # The initial prediction (from the selected features) is used in training only.
            initial_logits, initial_masks = self.heads(tgt, mask_features, class_embeddings, masks=True)
            per_layer_logits = [initial_logits] + [
                self.heads(h, mask_features, class_embeddings, masks=False)[0] for h in hs
            ]
            record.update(
                {
                    "decoder.spatial_shapes": spatial_shapes,
                    "decoder.src_flatten": memory,
                    "decoder.output_proposals": proposals,
                    "decoder.proposals_output_memory": zeroed,
                    "decoder.enc_output_memory": enc_memory,
                    "decoder.enc_class_logits": enc_logits,
                    "decoder.enc_coord_unselected": enc_boxes,
                    "decoder.topk_proposals": selected,
                    "decoder.topk_scores": scores,
                    "decoder.interm_pred_logits": initial_logits,
                    "decoder.interm_pred_boxes": reference_logits.sigmoid(),
                    "decoder.interm_pred_masks": initial_masks,
                    "decoder.hs": torch.stack(hs),
                    "decoder.references": torch.stack(references),
                    "decoder.per_layer_pred_boxes": torch.stack([references[0], *boxes]),
                    "decoder.per_layer_pred_logits": torch.stack(per_layer_logits),
                }
            )
        return OpenSeeDOutput(pred_logits, boxes[-1], pred_masks)
