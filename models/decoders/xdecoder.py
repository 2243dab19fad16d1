"""The X-Decoder transformer decoder (`sem_seg_head.predictor`), with the official parameter names.

Q = `num_queries` learnable queries: Q-1 object queries and the class query at index Q-1. Each of the
L decoder layers runs masked cross-attention on one pixel-decoder level (1/32, 1/16, 1/8 in turn),
self-attention and an FFN, all post-norm. Prediction heads run before the first layer and after each
layer; they pool the class query, project queries to the joint space (`pred_captions`), and predict
mask logits and the cross-attention mask of the next layer.

Three passes share the layers:

- segmentation (`forward_seg`): Q queries;
- grounding (`forward_grounding`): Q queries, copies of the Q-1 object queries, and the phrase tokens
  that join self-attention and FFN (spec 2.7);
- captioning (`caption_state`, then `caption_rows`): caption rows that attend to every pixel and to
  the queries, causally among themselves (spec 2.8). Queries never see caption rows, so their states
  equal those of the segmentation pass; their keys and values are computed once, and those of the
  caption positions already decoded are cached, so each greedy step runs one new row.

Padded batches: `DecoderMemory` carries, per level, each image's own area; padded keys are blocked and
attention masks are resized per image over its own area, so results match single-image runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.configs import DecoderConfig
from models.pixel_decoders.fpn_encoder import sine_position_embedding


def build_self_attn_mask(num_queries: int, context_length: int) -> torch.Tensor:
    """The (1, Q+T, Q+T) bool buffer, True = blocked (spec 2.5)."""
    n = num_queries + context_length
    mask = torch.zeros(1, n, n, dtype=torch.bool)
    mask[:, :num_queries, num_queries:] = True
    caption = torch.ones(context_length, context_length, dtype=torch.bool).triu(1)
    mask[:, num_queries:, num_queries:] = caption
    mask[:, : num_queries - 1, num_queries - 1] = True
    mask[:, num_queries - 1, : num_queries - 1] = True
    return mask


def resize_bicubic_aa(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic, antialiased, align_corners=False resize of (B, C, H, W): every mask resize of X-Decoder.
    Computed in float32 (bf16/fp16 masks under autocast are cast up: thresholds stay stable)."""
    return F.interpolate(x.float(), size=size, mode="bicubic", align_corners=False, antialias=True)


class MLP(nn.Module):
    """`layers.i`: `num_layers` Linear layers with ReLU between them, in -> hidden ... -> out
    (`mask_embed` here and in Mask2Former; OpenSeeD's box head and `ref_point_head`)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class SelfAttentionLayer(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads)
        self.norm = nn.LayerNorm(dim)

    def forward(
        self,
        tgt: torch.Tensor,
        pos: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """tgt, pos (N, B, D); mask (B*heads, N, N) bool, True = blocked."""
        q = tgt + pos
        out = self.self_attn(q, q, tgt, attn_mask=mask, need_weights=False)[0]
        return self.norm(tgt + out)


class CrossAttentionLayer(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(dim, heads)
        self.norm = nn.LayerNorm(dim)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        pos: torch.Tensor,
        query_pos: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """tgt, query_pos (N, B, D); memory, pos (HW, B, D); mask (B*heads, N, HW) bool or None."""
        out = self.multihead_attn(
            tgt + query_pos,
            memory + pos,
            memory,
            attn_mask=mask,
            need_weights=False,
        )[0]
        return self.norm(tgt + out)


class FFNLayer(nn.Module):
    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        return self.norm(tgt + self.linear2(F.relu(self.linear1(tgt))))


@dataclass
class DecoderMemory:
    """Pixel-decoder features prepared for cross-attention.

    src/pos: per level (HW_l, B, D); sizes: per level (h_l, w_l); mask_features (B, D, H/4, W/4);
    regions: per image its own area (h, w) at 1/4 scale, or None when no image is padded beyond
    its own area; padding: per level (B, HW_l) bool (True = padded key) or None.
    """

    src: list[torch.Tensor]
    pos: list[torch.Tensor]
    sizes: list[tuple[int, int]]
    mask_features: torch.Tensor
    regions: list[tuple[int, int]] | None = None
    padding: list[torch.Tensor | None] = field(default_factory=list)


@dataclass
class HeadOutput:
    """Prediction-head output for one round. embeds (B, R, D) = `pred_captions`; masks (B, R, H/4, W/4);
    attn_mask (B, R, HW_next) bool, True = blocked (before the all-blocked-row reset)."""

    embeds: torch.Tensor
    masks: torch.Tensor
    attn_mask: torch.Tensor


@dataclass
class CaptionState:
    """What the greedy caption steps reuse, per decoder layer: the projected keys and values (K, B, D)
    of its memory level (`cross_kv`, with the padded-key mask `cross_pad` (B, K) or None) and of the
    query rows after cross-attention (`self_kv`, (Q, B, D)); the query rows never see caption rows, so
    these are the same at every step.

    `joint_kv` is filled by `XDecoder.caption_rows(..., cache=True)`: per layer, buffers (Q + T, B, D)
    holding the query rows' keys and values followed by those of the `caption_length` caption
    positions decoded so far (T = context length; rows are causal, so earlier positions never change
    and a step only writes its own position)."""

    cross_kv: list[tuple[torch.Tensor, torch.Tensor]]
    cross_pad: list[torch.Tensor | None]
    self_kv: list[tuple[torch.Tensor, torch.Tensor]]
    joint_kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    caption_length: int = 0


def project(mha: nn.MultiheadAttention, x: torch.Tensor, part: int) -> torch.Tensor:
    """The q (0), k (1) or v (2) input projection of an nn.MultiheadAttention: (N, B, D) -> (N, B, D)."""
    d = mha.embed_dim
    return F.linear(
        x, mha.in_proj_weight[part * d : (part + 1) * d], mha.in_proj_bias[part * d : (part + 1) * d]
    )


def attend(
    mha: nn.MultiheadAttention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    blocked: torch.Tensor | None,
) -> torch.Tensor:
    """nn.MultiheadAttention on already projected q (L, B, D), k, v (S, B, D); blocked (B, L or 1, S)
    bool, True = not attended. Returns the output projection (L, B, D)."""
    length, b, d = q.shape
    h = mha.num_heads

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], b, h, d // h).permute(1, 2, 0, 3)

    mask = None if blocked is None else ~blocked[:, None]
    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
    return mha.out_proj(out.permute(2, 0, 1, 3).reshape(length, b, d))


class XDecoder(nn.Module):
    """`sem_seg_head.predictor`. The language encoder is attached as `lang_encoder` by the model."""

    def __init__(self, cfg: DecoderConfig, projection_dim: int) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.cfg = cfg
        self.num_queries = cfg.num_queries
        self.num_heads = cfg.num_heads
        self.num_layers = cfg.num_layers
        self.class_embed = nn.Parameter(torch.zeros(d, projection_dim))
        self.caping_embed = nn.Parameter(torch.zeros(d, projection_dim))
        self.register_buffer("self_attn_mask", build_self_attn_mask(cfg.num_queries, cfg.context_length))
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(d, cfg.num_heads) for _ in range(cfg.num_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(d, cfg.num_heads) for _ in range(cfg.num_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(d, cfg.dim_feedforward) for _ in range(cfg.num_layers)
        )
        self.decoder_norm = nn.LayerNorm(d)
        self.query_feat = nn.Embedding(cfg.num_queries, d)
        self.query_embed = nn.Embedding(cfg.num_queries, d)
        self.level_embed = nn.Embedding(cfg.num_feature_levels, d)
        self.mask_embed = MLP(d, d, d, 3)
        self.pos_embed_caping = nn.Embedding(cfg.context_length, projection_dim)

    # ------------------------------------------------------------------ memory and heads

    def prepare_memory(
        self,
        multi_scale: list[torch.Tensor],
        mask_features: torch.Tensor,
        regions: list[tuple[int, int]] | None = None,
    ) -> DecoderMemory:
        """multi_scale [(B, D, h_l, w_l)] (1/32, 1/16, 1/8); regions: per image (h, w) of its own
        area at 1/4 scale, or None when all images fill the batch."""
        src, pos, sizes, padding = [], [], [], []
        for level, feat in enumerate(multi_scale):
            b, _, h, w = feat.shape
            sizes.append((h, w))
            valid = None
            if regions is not None:
                stride = mask_features.shape[-2] // h
                valid = torch.zeros(b, 1, h, w, device=feat.device)
                for i, (rh, rw) in enumerate(regions):
                    valid[i, :, : rh // stride, : rw // stride] = 1
            pos.append(sine_position_embedding((b, h, w), feat.shape[1] // 2, valid, feat.device))
            pos[-1] = pos[-1].flatten(2).permute(2, 0, 1)
            src.append(
                (feat + self.level_embed.weight[level][None, :, None, None]).flatten(2).permute(2, 0, 1)
            )
            padding.append(None if valid is None else ~valid[:, 0].flatten(1).bool())
        return DecoderMemory(src, pos, sizes, mask_features, regions, padding)

    def pool_class_query(self, d: torch.Tensor, num_rows: int) -> torch.Tensor:
        """Replace the class query (index Q-1) of decoder-normed d (B, R, D) by its pooled form and
        keep the first `num_rows` rows."""
        q = self.num_queries
        n = d / (d.norm(dim=-1, keepdim=True) + 1e-7)
        sim = (n[:, q - 1 : q] @ n[:, : q - 1].transpose(1, 2)).softmax(-1)  # (B, 1, Q-1)
        cls = sim @ d[:, : q - 1]
        return torch.cat((d[:, : q - 1], cls, d[:, q:num_rows]), dim=1)

    def attention_mask(
        self, masks: torch.Tensor, size: tuple[int, int], memory: DecoderMemory
    ) -> torch.Tensor:
        """masks (B, R, H/4, W/4) -> blocked (B, R, h*w): bicubic-AA resize, sigmoid < 0.5."""
        if memory.regions is None:
            return (resize_bicubic_aa(masks, size).sigmoid() < 0.5).flatten(2)
        h4 = memory.mask_features.shape[-2]
        stride = h4 // size[0]
        blocked = torch.ones(masks.shape[0], masks.shape[1], *size, dtype=torch.bool, device=masks.device)
        for i, (rh, rw) in enumerate(memory.regions):
            own = masks[i : i + 1, :, :rh, :rw]
            small = resize_bicubic_aa(own, (rh // stride, rw // stride))
            blocked[i, :, : rh // stride, : rw // stride] = small[0].sigmoid() < 0.5
        return blocked.flatten(2)

    def heads(self, output: torch.Tensor, memory: DecoderMemory, level: int, num_rows: int) -> HeadOutput:
        """Prediction heads on decoder state output (N, B, D); keeps the first `num_rows` rows
        (Q for seg, 2Q-1 for grounding); the attention mask targets `level`."""
        d = self.decoder_norm(output).transpose(0, 1)
        d = self.pool_class_query(d, num_rows)
        embeds = d @ self.class_embed
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(d), memory.mask_features)
        attn = self.attention_mask(masks, memory.sizes[level], memory)
        if attn.shape[1] > self.num_queries:
            attn[:, self.num_queries] = False  # official quirk: row Q (first grounding copy) is forced open
        return HeadOutput(embeds, masks, attn)

    def _cross_mask(self, attn: torch.Tensor, memory: DecoderMemory, level: int) -> torch.Tensor:
        """(B, R, HW) blocked -> (B*heads, R, HW): un-block fully blocked rows, re-block padding."""
        attn = attn.clone()
        attn[attn.all(dim=-1)] = False
        pad = memory.padding[level] if memory.padding else None
        if pad is not None:
            attn = attn | pad[:, None, :]
        return attn.repeat_interleave(self.num_heads, dim=0)

    # ------------------------------------------------------------------ passes

    def _initial_queries(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.query_feat.weight.unsqueeze(1).repeat(1, batch, 1)
        qpos = self.query_embed.weight.unsqueeze(1).repeat(1, batch, 1)
        return output, qpos

    def forward_seg(
        self, memory: DecoderMemory, record: list[HeadOutput] | None = None, keep_rows: bool = False
    ) -> tuple[HeadOutput, list[torch.Tensor]]:
        """Segmentation pass. Returns the last head output and, when `keep_rows`, the query rows after
        each cross-attention (what captioning reuses). `record` collects every head output."""
        batch = memory.mask_features.shape[0]
        q = self.num_queries
        output, qpos = self._initial_queries(batch)
        self_mask = self.self_attn_mask[:, :q, :q].repeat(batch * self.num_heads, 1, 1)
        head = self.heads(output, memory, 0, q)
        if record is not None:
            record.append(head)
        rows = []
        for i in range(self.num_layers):
            level = i % len(memory.src)
            cross_mask = self._cross_mask(head.attn_mask, memory, level)
            output = self.transformer_cross_attention_layers[i](
                output, memory.src[level], memory.pos[level], qpos, cross_mask
            )
            if keep_rows:
                rows.append(output)
            output = self.transformer_self_attention_layers[i](output, qpos, self_mask)
            output = self.transformer_ffn_layers[i](output)
            head = self.heads(output, memory, (i + 1) % len(memory.src), q)
            if record is not None:
                record.append(head)
        return head, rows

    def forward_grounding(
        self, memory: DecoderMemory, tokens: list[torch.Tensor], record: list[HeadOutput] | None = None
    ) -> HeadOutput:
        """Grounding pass (`grounding_eval`). tokens: per image its grounding tokens (T_i, D) (token
        features of the phrase positions with attention mask 1). Output rows: Q queries then the Q-1
        grounding copies (2Q-1)."""
        batch = memory.mask_features.shape[0]
        q = self.num_queries
        n_q = 2 * q - 1
        t_max = max(t.shape[0] for t in tokens)
        grounding = memory.mask_features.new_zeros(t_max, batch, self.cfg.hidden_dim)
        for i, t in enumerate(tokens):
            grounding[: t.shape[0], i] = t
        n = n_q + t_max
        self_mask = torch.ones(batch, n, n, dtype=torch.bool, device=grounding.device)
        self_mask[:, :q, :q] = self.self_attn_mask[0, :q, :q]
        self_mask[:, q:, q:] = False
        for i, t in enumerate(tokens):
            self_mask[i, :, n_q + t.shape[0] :] = True  # padded tokens are never attended to
        self_mask = self_mask.repeat_interleave(self.num_heads, dim=0)

        output, qpos = self._initial_queries(batch)
        output = torch.cat((output, output[:-1]), dim=0)
        qpos = torch.cat((qpos, qpos[:-1]), dim=0)
        token_state = grounding
        head = self.heads(output, memory, 0, n_q)
        if record is not None:
            record.append(head)
        for i in range(self.num_layers):
            level = i % len(memory.src)
            cross_mask = self._cross_mask(head.attn_mask, memory, level)
            output = self.transformer_cross_attention_layers[i](
                output, memory.src[level], memory.pos[level], qpos, cross_mask
            )
            joint = torch.cat((output, token_state), dim=0)
            joint_pos = torch.cat((qpos, grounding), dim=0)
            joint = self.transformer_self_attention_layers[i](joint, joint_pos, self_mask)
            joint = self.transformer_ffn_layers[i](joint)
            output, token_state = joint[:n_q], joint[n_q:]
            head = self.heads(output, memory, (i + 1) % len(memory.src), n_q)
            if record is not None:
                record.append(head)
        return head

    def caption_state(self, memory: DecoderMemory) -> CaptionState:
        """Run the query rows once (they never see caption rows) and project, per layer, the keys and
        values the caption rows attend to."""
        _, rows = self.forward_seg(memory, keep_rows=True)
        return self.caption_state_from_rows(rows, memory)

    def caption_state_from_rows(self, rows: list[torch.Tensor], memory: DecoderMemory) -> CaptionState:
        """`caption_state` from the query rows (Q, B, D) after each cross-attention of a segmentation
        pass already run (`forward_seg(..., keep_rows=True)`; training reuses its own pass)."""
        b = memory.mask_features.shape[0]
        qpos = self.query_embed.weight.unsqueeze(1).repeat(1, b, 1)
        cross_kv, cross_pad, self_kv = [], [], []
        for i in range(self.num_layers):
            level = i % len(memory.src)
            cross = self.transformer_cross_attention_layers[i].multihead_attn
            src, pos = memory.src[level], memory.pos[level]
            cross_kv.append((project(cross, src + pos, 1), project(cross, src, 2)))
            cross_pad.append(memory.padding[level] if memory.padding else None)
            attn = self.transformer_self_attention_layers[i].self_attn
            self_kv.append((project(attn, rows[i] + qpos, 1), project(attn, rows[i], 2)))
        return CaptionState(cross_kv, cross_pad, self_kv)

    def caption_rows(
        self,
        state: CaptionState,
        token_features: torch.Tensor,
        start: int = 0,
        cache: bool = False,
        record: list[torch.Tensor] | None = None,
        self_attention: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Caption rows after the last layer, decoder-normed and projected by `caping_embed`.

        token_features (B, L, D): text token features of caption positions start..start+L-1. Content
        is E, position E + pos_embed_caping. Rows are causal: with start > 0 the earlier positions
        come from `state.joint_kv` (filled by previous calls with `cache=True`). Returns (B, L, D).
        `record` receives the projected rows of the heads before the first layer and after the last;
        `self_attention` receives, per layer, the projected self-attention queries (L, B, D) and keys
        (Q + start + L, B, D) of the caption rows (what training supervises the attention with).
        """
        b, length, _ = token_features.shape
        if start > 0 and start != state.caption_length:
            raise ValueError(f"caption rows from position {start} need the cache of positions 0..{start - 1}")
        rows = token_features.transpose(0, 1)
        pos = rows + self.pos_embed_caping.weight[start : start + length, None, :]
        q = self.num_queries
        end = q + start + length
        # Caption rows see every query row and every earlier caption row: a single new position
        # (a greedy step) has nothing blocked, so it needs no mask.
        causal = None if length == 1 else self.self_attn_mask[:, q + start : end, :end]
        if record is not None:
            record.append(self.decoder_norm(rows).transpose(0, 1) @ self.caping_embed)
        for i in range(self.num_layers):
            cross = self.transformer_cross_attention_layers[i]
            pad = state.cross_pad[i]
            blocked = None if pad is None else pad[:, None, :]
            k, v = state.cross_kv[i]
            out = attend(cross.multihead_attn, project(cross.multihead_attn, rows + pos, 0), k, v, blocked)
            rows = cross.norm(rows + out)
            layer = self.transformer_self_attention_layers[i]
            mha = layer.self_attn
            x = rows + pos
            k_new, v_new = project(mha, x, 1), project(mha, rows, 2)
            if cache:
                if i == len(state.joint_kv):
                    state.joint_kv.append(self._joint_buffers(state.self_kv[i]))
                k_all, v_all = state.joint_kv[i]
                k_all[q + start : end], v_all[q + start : end] = k_new, v_new
                k_all, v_all = k_all[:end], v_all[:end]
            else:
                k_before, v_before = state.joint_kv[i] if start > 0 else state.self_kv[i]
                k_all = torch.cat((k_before[: q + start], k_new), dim=0)
                v_all = torch.cat((v_before[: q + start], v_new), dim=0)
            q_new = project(mha, x, 0)
            if self_attention is not None:
                self_attention.append((q_new, k_all))
            rows = layer.norm(rows + attend(mha, q_new, k_all, v_all, causal))
            rows = self.transformer_ffn_layers[i](rows)
        if cache:
            state.caption_length = start + length
        out = self.decoder_norm(rows).transpose(0, 1) @ self.caping_embed
        if record is not None:
            record.append(out)
        return out

    def _joint_buffers(
        self, query_kv: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q + T, B, D) key and value buffers whose first Q rows are the query rows' (Q, B, D)."""
        capacity = self.num_queries + self.pos_embed_caping.num_embeddings
        buffers = []
        for rows in query_kv:
            buffer = rows.new_empty((capacity, *rows.shape[1:]))
            buffer[: self.num_queries] = rows
            buffers.append(buffer)
        return buffers[0], buffers[1]


def class_logits(embeds: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """exp(logit_scale) * cos(query embeddings (..., R, D), class embeddings (C, D)) -> (..., R, C).

    The query side is divided by (norm + 1e-7); the class embeddings are already unit norm. No clamp.
    """
    v = embeds / (embeds.norm(dim=-1, keepdim=True) + 1e-7)
    return logit_scale.exp() * v @ text.transpose(0, 1)


def grounding_similarity(embeds: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """`vl_similarity`: min(exp(logit_scale), 100) * cos, both sides divided by (norm + 1e-7).

    embeds (R, D), text (N, D) -> (R, N).
    """
    v = embeds / (embeds.norm(dim=-1, keepdim=True) + 1e-7)
    t = text / (text.norm(dim=-1, keepdim=True) + 1e-7)
    return torch.clamp(logit_scale.exp(), max=100) * v @ t.transpose(0, 1)
