"""Incremental caption rows: one new caption position per greedy step, with per-layer key/value caches.

The official greedy captioning re-runs the text encoder and all Q + 77 decoder rows at every step.
Two facts make that redundant:

- the Q query rows never attend to caption rows, so their states (and the keys/values they offer the
  caption rows in self-attention) are the same at every step: `XDecoder.caption_state` computes them
  once;
- caption rows are causal, so the row at position p depends only on the caption tokens 0..p.

So step p runs one row per image through the 9 layers: cross-attention to the cached projected
memory keys/values, self-attention to the Q query rows and to the caption rows 0..p (their keys and
values are kept in `CaptionCache`, one buffer per layer), FFN. The text side is the same idea
(`LanguageEncoder.token_features_step` with a `TextKVCache`). Results equal the full passes up to
float rounding; the greedy tokens are identical.

    cache = new_caption_cache(decoder, state, batch)
    row = caption_step(decoder, state, cache, token_features (B, 1, D), position)   # (B, D)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.decoders.xdecoder import CaptionState, XDecoder, attend, project


@dataclass
class CaptionCache:
    """Self-attention keys and values per decoder layer, each (Q + context_length, B, D): the Q query
    rows (from `CaptionState.self_kv`, fixed) followed by the caption rows run so far."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]


def new_caption_cache(decoder: XDecoder, state: CaptionState) -> CaptionCache:
    """Buffers for every caption position, the query rows' keys/values copied in front."""
    keys, values = [], []
    for query_keys, query_values in state.self_kv:
        q, b, d = query_keys.shape
        k = query_keys.new_empty(q + decoder.cfg.context_length, b, d)
        v = query_values.new_empty(q + decoder.cfg.context_length, b, d)
        k[:q] = query_keys
        v[:q] = query_values
        keys.append(k)
        values.append(v)
    return CaptionCache(keys, values)


def caption_step(
    decoder: XDecoder,
    state: CaptionState,
    cache: CaptionCache,
    token_features: torch.Tensor,
    position: int,
) -> torch.Tensor:
    """The caption row at `position` after the last layer, decoder-normed and projected by
    `caping_embed`: (B, D), the row `XDecoder.caption_rows` gives at that position.

    token_features (B, 1, D): text token features of this position (content E, positional term
    E + pos_embed_caping[position]). Rows 0..position-1 must already be in `cache`; this one is added.
    """
    rows = token_features.transpose(0, 1)  # (1, B, D)
    pos = rows + decoder.pos_embed_caping.weight[position]
    end = decoder.num_queries + position + 1  # query rows and caption rows 0..position
    for i in range(decoder.num_layers):
        cross = decoder.transformer_cross_attention_layers[i]
        pad = state.cross_pad[i]
        blocked = None if pad is None else pad[:, None, :]
        k, v = state.cross_kv[i]
        out = attend(cross.multihead_attn, project(cross.multihead_attn, rows + pos, 0), k, v, blocked)
        rows = cross.norm(rows + out)
        layer = decoder.transformer_self_attention_layers[i]
        mha = layer.self_attn
        x = rows + pos
        cache.keys[i][end - 1] = project(mha, x, 1)[0]
        cache.values[i][end - 1] = project(mha, rows, 2)[0]
        out = attend(mha, project(mha, x, 0), cache.keys[i][:end], cache.values[i][:end], None)
        rows = layer.norm(rows + out)
        rows = decoder.transformer_ffn_layers[i](rows)
    return decoder.decoder_norm(rows[0]) @ decoder.caping_embed
