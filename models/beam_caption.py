"""Beam search over caption ids, on the same cached one-position steps as greedy captioning.

Greedy captioning (`XDecoderModel.greedy_caption`, the official decoding) keeps one hypothesis per
image. Beam search keeps `beams` of them: each step extends every live hypothesis by every token,
keeps the `beams` best by summed log-probability, and sets aside a hypothesis as finished when its
new token ends the caption (end-of-text, or the period the returned text is cut at). The cached keys
and values of the text encoder and the caption rows follow their hypotheses from step to step.

The search stops once `beams` hypotheses of every image have finished (the first to finish, as
`early_stopping=True` does in common implementations), so a later and likelier one can be missed.
`Predictor.caption(images, beams=...)` picks among the finished captions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.decoders.xdecoder import CaptionState
from models.language.tokenizer import BOS_ID
from models.xdecoder import ImageFeatures, XDecoderModel


@dataclass
class CaptionCandidate:
    """One finished hypothesis: its ids (start token, caption tokens, end token) and the summed
    log-probability of every token after the start token."""

    ids: list[int]
    log_prob: float


def repeat_state(state: CaptionState, times: int) -> CaptionState:
    """The caption state of B images -> that of B * times rows, each image's rows side by side."""
    return CaptionState(
        cross_kv=[(k.repeat_interleave(times, 1), v.repeat_interleave(times, 1)) for k, v in state.cross_kv],
        cross_pad=[None if p is None else p.repeat_interleave(times, 0) for p in state.cross_pad],
        self_kv=[(k.repeat_interleave(times, 1), v.repeat_interleave(times, 1)) for k, v in state.self_kv],
    )


@torch.inference_mode()
def beam_caption(
    model: XDecoderModel, features: ImageFeatures, beams: int, steps: int, end_ids: set[int]
) -> list[list[CaptionCandidate]]:
    """Per image of `features` (B images), the first `beams` captions to finish, best summed
    log-probability first. The search stops once every image has them, or after `steps` steps;
    hypotheses still live then count as finished."""
    if beams < 1:
        raise ValueError(f"beams must be at least 1, got {beams}")
    decoder, text = model.decoder, model.text_encoder
    batch = features.memory.mask_features.shape[0]
    rows_count = batch * beams
    device = features.memory.mask_features.device
    state = repeat_state(decoder.caption_state(features.memory), beams)
    cache = text.new_cache(rows_count)
    vocab = text.lang_encoder.token_embedding.weight
    vocab_size = vocab.shape[0]
    tokens = torch.full((rows_count, model.cfg.text.context_length), BOS_ID, dtype=torch.long, device=device)
    scores = torch.full((batch, beams), float("-inf"), device=device)
    scores[:, 0] = 0.0  # at the start every hypothesis of an image is the same: expand one
    finished: list[list[CaptionCandidate]] = [[] for _ in range(batch)]
    steps = min(steps, tokens.shape[1] - 1)
    decoded = 1  # positions of `tokens` filled so far
    for s in range(steps):
        new_features = text.token_features_step(tokens[:, s : s + 1], cache)
        rows = decoder.caption_rows(state, new_features, start=s, cache=True)
        log_probs = (rows[:, 0].float() @ vocab.float().transpose(0, 1)).log_softmax(dim=-1)  # (B*K, V)
        totals = (scores.reshape(-1, 1) + log_probs).reshape(batch, beams * vocab_size)
        top_scores, top_index = totals.topk(2 * beams, dim=1)  # enough for `beams` live ones
        parents = torch.zeros(batch, beams, dtype=torch.long, device=device)
        words = torch.full((batch, beams), BOS_ID, dtype=torch.long, device=device)
        kept = torch.full((batch, beams), float("-inf"), device=device)
        all_scores, all_index = top_scores.tolist(), top_index.tolist()
        for i in range(batch):
            live = 0
            for score, index in zip(all_scores[i], all_index[i], strict=True):
                parent, word = divmod(index, vocab_size)
                if word in end_ids:
                    if len(finished[i]) < beams:
                        ids = tokens[i * beams + parent, : s + 1].tolist() + [word]
                        finished[i].append(CaptionCandidate(ids, score))
                    continue
                parents[i, live], words[i, live], kept[i, live] = parent, word, score
                live += 1
                if live == beams:
                    break
        order = (torch.arange(batch, device=device)[:, None] * beams + parents).flatten()
        tokens = tokens[order]
        tokens[:, s + 1] = words.flatten()
        scores = kept
        cache.keys = [k[order] for k in cache.keys]
        cache.values = [v[order] for v in cache.values]
        state.joint_kv = [(k[:, order], v[:, order]) for k, v in state.joint_kv]
        decoded = s + 2
        if all(len(f) >= beams for f in finished):
            break
    for i in range(batch):
        for j in range(beams):
            if len(finished[i]) < beams and scores[i, j] > float("-inf"):
                ids = tokens[i * beams + j, :decoded].tolist()
                finished[i].append(CaptionCandidate(ids, float(scores[i, j])))
        finished[i].sort(key=lambda c: c.log_prob, reverse=True)
    return finished
