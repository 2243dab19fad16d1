"""Greedy captioning the way the official code runs it: full passes, no caches (reference only).

Every step re-encodes all 77 caption positions with the text encoder and runs all Q + 77 decoder
rows (queries and caption rows together, prediction heads after every layer, the full
`self_attn_mask`), then reads the logits at the step's position. The served path
(`XDecoderModel.greedy_caption`: one new position per step, key/value caches) must give the same
tokens; tests compare the two and `load_tests/bench_xdecoder.py` measures the speed-up. Nothing in
serving calls this.

    logits = caption_logits_full_pass(model, memory, tokens)    # (B, 77, vocab)
    tokens = greedy_caption_full_passes(model, memory, steps)   # (B, 77)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from models.decoders.xdecoder import DecoderMemory
from models.language.tokenizer import BOS_ID

if TYPE_CHECKING:
    from models.xdecoder import XDecoderModel


def caption_logits_full_pass(
    model: XDecoderModel, memory: DecoderMemory, tokens: torch.Tensor
) -> torch.Tensor:
    """One official captioning forward: tokens (B, L) -> logits (B, L, vocab) at every position.

    Caption rows attend to every pixel of their own image (padded keys stay blocked), to all query rows
    and causally to each other; query rows use the mask of the prediction heads and never see
    caption rows.
    """
    decoder, text = model.decoder, model.text_encoder
    batch, length = tokens.shape
    q, heads = decoder.num_queries, decoder.num_heads
    features = text.token_features(tokens).transpose(0, 1)  # (L, B, D)
    queries, query_pos = decoder._initial_queries(batch)
    output = torch.cat((queries, features), dim=0)
    pos = torch.cat((query_pos, features + decoder.pos_embed_caping.weight[:length, None, :]), dim=0)
    self_mask = decoder.self_attn_mask[:, : q + length, : q + length].repeat(batch * heads, 1, 1)
    head = decoder.heads(output, memory, 0, q)
    for i in range(decoder.num_layers):
        level = i % len(memory.src)
        query_mask = decoder._cross_mask(head.attn_mask, memory, level)  # (B*heads, Q, HW)
        caption_mask = torch.zeros(
            batch, length, query_mask.shape[-1], dtype=torch.bool, device=query_mask.device
        )
        pad = memory.padding[level] if memory.padding else None
        if pad is not None:
            caption_mask |= pad[:, None, :]
        cross_mask = torch.cat((query_mask, caption_mask.repeat_interleave(heads, dim=0)), dim=1)
        output = decoder.transformer_cross_attention_layers[i](
            output, memory.src[level], memory.pos[level], pos, cross_mask
        )
        output = decoder.transformer_self_attention_layers[i](output, pos, self_mask)
        output = decoder.transformer_ffn_layers[i](output)
        head = decoder.heads(output, memory, (i + 1) % len(memory.src), q)
    captions = decoder.decoder_norm(output[q:]).transpose(0, 1) @ decoder.caping_embed
    return captions @ text.lang_encoder.token_embedding.weight.transpose(0, 1)


def greedy_caption_full_passes(model: XDecoderModel, memory: DecoderMemory, steps: int = 50) -> torch.Tensor:
    """Official greedy decoding: all start tokens, `steps` full passes, step s sets position s+1.
    Returns the ids (B, L); no early stop."""
    batch = memory.mask_features.shape[0]
    length = model.cfg.text.context_length
    tokens = torch.full((batch, length), BOS_ID, dtype=torch.long, device=memory.mask_features.device)
    for s in range(min(steps, length - 1)):
        tokens[:, s + 1] = caption_logits_full_pass(model, memory, tokens)[:, s].argmax(dim=-1)
    return tokens
