"""The one training recipe of the demo model: every task's loss from one image pass.

    images -> backbone -> pixel decoder -> decoder memory
      segmentation pass (every head)   -> set-matched class CE (background = the "background" text)
                                          + mask BCE + dice                         `loss_seg`
      grounding pass (every head)      -> set-matched phrase scores (BCE on the cosine of each
                                          grounding query with the phrase, 0.5 = the decision
                                          threshold of `Predictor.refer`) + mask BCE + dice  `loss_ground`
      caption rows (teacher forcing)   -> next-token CE against the token embeddings, size,
                                          colour and shape tokens weighted up  `loss_caption`
                                          + the first self-attention head of a row whose next
                                          word is a mention's size, colour or shape (layers
                                          4 to 6) points at that thing's matched query `loss_pointer`
      pooled class query + res5 proj   -> contrastive with the captions (the retrieval score of
                                          `Predictor.retrieve`), perturbed captions as negatives
                                                                                    `loss_retrieval`
      pixel-decoder levels + mask features -> each thing's shape and size class from its
                                          mask-averaged features, through training-only linear
                                          probes (`models.demo.probes`); the object queries
                                          matched to things: shape, size class and place in
                                          the caption, the same way                 `loss_probe`

Class names are embedded with one random prompt template each (the predictor averages all 81).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from models.decoders.xdecoder import CaptionState, HeadOutput, class_logits
from models.demo.data import SIZE_CLASS, Batch
from models.demo.matching import hungarian_match
from models.demo.probes import RegionProbes, probe_loss, query_probe_loss
from models.demo.shapesworld import SHAPES, THING_COLOURS
from models.language.prompts import PROMPT_TEMPLATES
from models.language.tokenizer import ClipTokenizer
from models.predictor import REFER_THRESHOLD
from models.xdecoder import XDecoderModel

CLASS_WEIGHT, BCE_WEIGHT, DICE_WEIGHT = 2.0, 5.0, 5.0
BACKGROUND_WEIGHT = 0.1  # class-CE weight of unmatched queries (Mask2Former's eos_coef)
GROUNDING_SCALE = 10.0  # logit = scale * (cosine - REFER_THRESHOLD)
GROUNDING_POS_WEIGHT = 4.0
RETRIEVAL_SCALE = 20.0
CAPTION_WEIGHT, RETRIEVAL_WEIGHT, PROBE_WEIGHT = 4.0, 2.0, 2.0
CAPTION_NEGATIVES = 2048
POINTER_WEIGHT = 1.0
POINTER_LAYERS = (3, 4, 5)  # decoder layers whose first self-attention head points at the thing
CONTENT_TOKEN_WEIGHT = 3.0  # caption tokens of size words, colours and shapes (what a mention needs)


def mask_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Matched pairs: mask logits (N, P), targets (N, P) -> (mean BCE, mean dice loss)."""
    if logits.shape[0] == 0:
        zero = logits.sum() * 0.0
        return zero, zero
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    probs = logits.sigmoid()
    dice = 1 - (2 * (probs * targets).sum(-1) + 1) / (probs.sum(-1) + targets.sum(-1) + 1)
    return bce, dice.mean()


def flat_masks(masks: torch.Tensor, area: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) mask logits -> (N, a * b) over the image's own area (a, b) (padding left out)."""
    return masks[:, : area[0], : area[1]].flatten(1)


def pooled_targets(masks: torch.Tensor, size: tuple[int, int], area: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) soft masks -> (N, a * b): area pooled to the mask logits' size (h, w), then cut to
    the image's own area (a, b)."""
    if masks.shape[0] == 0:
        return masks.new_zeros(0, area[0] * area[1])
    return flat_masks(F.adaptive_avg_pool2d(masks[None], size)[0], area)


def class_embeddings(
    model: XDecoderModel, tokenizer: ClipTokenizer, names: list[str], rng: np.random.Generator
) -> torch.Tensor:
    """(C, D) unit-norm embeddings, each name in one random prompt template."""
    prompts = [PROMPT_TEMPLATES[rng.integers(len(PROMPT_TEMPLATES))].format(n) for n in names]
    ids, _ = tokenizer.encode(prompts, context_length=model.cfg.text.context_length)
    emb = model.text_encoder.eos_features(ids)
    return emb / (emb.norm(dim=-1, keepdim=True) + 1e-7)


def text_features(
    model: XDecoderModel, tokenizer: ClipTokenizer, texts: list[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids (N, L) cut after the longest text, attention (N, L), token features (N, L, D) and
    EOS features (N, D), from one text-encoder pass."""
    ids, attention = tokenizer.encode(texts, context_length=model.cfg.text.context_length)
    eos = ids.argmax(dim=1)
    length = int(eos.max()) + 1
    ids, attention = ids[:, :length], attention[:, :length]
    feats = model.text_encoder.token_features(ids)
    return ids, attention, feats, feats[torch.arange(len(texts)), eos]


def segmentation_loss(
    heads: list[HeadOutput],
    batch: Batch,
    vocab: list[torch.Tensor],
    logit_scale: torch.Tensor,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], list[torch.Tensor]]:
    """Set-matched class CE + mask BCE + dice over the object queries of every head; the last
    head's queries matched to things: (embeds (M, D), shapes, size classes, caption places (M,));
    and per image the last head's query matched to the thing of each caption place (T_i,)."""
    q = heads[0].embeds.shape[1]  # object queries are 0..q-2; q-1 is the class query
    total = heads[0].embeds.new_zeros(())
    examples = batch.examples
    size = tuple(heads[0].masks.shape[-2:])
    areas = [batch.mask_area(i, size) for i in range(len(examples))]
    targets = [pooled_targets(ex.masks, size, area) for ex, area in zip(examples, areas, strict=True)]
    matched: list[tuple[torch.Tensor, ...]] = []  # the last head's queries matched to things
    place_queries: list[torch.Tensor] = []  # per image: the last head's query of each caption place
    for head in heads:
        for i, ex in enumerate(examples):
            logits = class_logits(head.embeds[i, : q - 1], vocab[i], logit_scale)  # (Q-1, C+1)
            masks = flat_masks(head.masks[i, : q - 1], areas[i])
            cost = -logits.softmax(-1)[:, ex.labels]
            rows, cols = hungarian_match(masks, targets[i], cost, (CLASS_WEIGHT, BCE_WEIGHT, DICE_WEIGHT))
            if head is heads[-1]:
                is_thing = cols < ex.shapes.shape[0]  # segments 0..T-1 are the things
                things = cols[is_thing]
                targets_of_things = (ex.shapes[things], ex.size_classes[things], ex.caption_order[things])
                matched.append((head.embeds[i, rows[is_thing]], *targets_of_things))
                queries = torch.full((ex.shapes.shape[0],), -1, dtype=torch.long)
                queries[ex.caption_order[things]] = torch.as_tensor(rows[is_thing], dtype=torch.long)
                place_queries.append(queries)
            background = vocab[i].shape[0] - 1
            labels = torch.full((q - 1,), background, dtype=torch.long)
            labels[rows] = ex.labels[cols]
            weight = torch.ones(vocab[i].shape[0])
            weight[background] = BACKGROUND_WEIGHT
            ce = F.cross_entropy(logits, labels, weight=weight)
            bce, dice = mask_losses(masks[rows], targets[i][cols])
            total = total + CLASS_WEIGHT * ce + BCE_WEIGHT * bce + DICE_WEIGHT * dice
    matched_things = tuple(torch.cat(parts) for parts in zip(*matched, strict=True))
    return total / len(examples), matched_things, place_queries


def grounding_loss(heads: list[HeadOutput], batch: Batch, phrase_emb: torch.Tensor, q: int) -> torch.Tensor:
    """Grounding copies (rows Q..2Q-2) matched to the phrase's targets: BCE on their scores (matched
    = 1, others = 0, so an absent target leaves every score below the threshold) + mask BCE + dice."""
    total = phrase_emb.new_zeros(())
    text = phrase_emb / (phrase_emb.norm(dim=-1, keepdim=True) + 1e-7)
    examples = batch.examples
    size = tuple(heads[0].masks.shape[-2:])
    areas = [batch.mask_area(i, size) for i in range(len(examples))]
    targets = [pooled_targets(ex.phrase_masks, size, area) for ex, area in zip(examples, areas, strict=True)]
    for head in heads:
        for i in range(len(examples)):
            emb = head.embeds[i, q:]
            cosine = (emb / (emb.norm(dim=-1, keepdim=True) + 1e-7)) @ text[i]
            score = GROUNDING_SCALE * (cosine - REFER_THRESHOLD)
            masks = flat_masks(head.masks[i, q:], areas[i])
            cost = -score.sigmoid()[:, None].expand(-1, targets[i].shape[0])
            rows, cols = hungarian_match(masks, targets[i], cost, (CLASS_WEIGHT, BCE_WEIGHT, DICE_WEIGHT))
            labels = torch.zeros_like(score)
            labels[rows] = 1.0
            bce_score = F.binary_cross_entropy_with_logits(
                score, labels, pos_weight=torch.tensor(GROUNDING_POS_WEIGHT)
            )
            bce, dice = mask_losses(masks[rows], targets[i][cols])
            total = total + CLASS_WEIGHT * bce_score + BCE_WEIGHT * bce + DICE_WEIGHT * dice
    return total / len(examples)


@functools.cache
def content_token_ids(tokenizer: ClipTokenizer) -> torch.Tensor:
    """Token ids of the words a caption mention is scored on: size words, colours and shapes."""
    words = [*(w for w in SIZE_CLASS if w), *THING_COLOURS, *SHAPES]
    return torch.tensor(sorted({i for w in words for i in tokenizer.tokenize(w)}), dtype=torch.long)


def caption_loss(
    model: XDecoderModel,
    state: CaptionState,
    ids: torch.Tensor,
    feats: torch.Tensor,
    rng: np.random.Generator,
    content_ids: torch.Tensor,
    place_queries: list[torch.Tensor],
    tokenizer: ClipTokenizer,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token CE: caption row s predicts id s+1, up to and including the first end-of-text, and
    the pointer loss of the rows' attention (`pointer_loss`).
    Targets among `content_ids` (size words, colours, shapes) weigh `CONTENT_TOKEN_WEIGHT` in the mean.

    The softmax runs over the ids of the batch's captions plus `CAPTION_NEGATIVES` random ids of the
    vocabulary (a sampled softmax: the full 49,408-way softmax costs a fifth of a step)."""
    attention: list[tuple[torch.Tensor, torch.Tensor]] = []
    rows = model.decoder.caption_rows(state, feats, self_attention=attention)[:, :-1]  # (B, L-1, D)
    targets = ids[:, 1:].clone()
    eos = ids.argmax(dim=1)
    targets[torch.arange(targets.shape[1])[None] >= eos[:, None]] = -100
    weights = torch.where(torch.isin(targets, content_ids), CONTENT_TOKEN_WEIGHT, 1.0)
    weights[targets < 0] = 0.0
    vocab = model.text_encoder.lang_encoder.token_embedding.weight
    sampled = torch.from_numpy(rng.integers(0, vocab.shape[0], CAPTION_NEGATIVES))
    candidates = torch.cat((targets[targets >= 0], sampled)).unique()
    position = torch.full((vocab.shape[0],), -100, dtype=torch.long)
    position[candidates] = torch.arange(len(candidates))
    targets = torch.where(targets >= 0, position[targets.clamp_min(0)], targets)
    logits = rows @ vocab[candidates].T  # (B, L-1, K)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
    pointer = pointer_loss(model, attention, pointer_targets(ids, place_queries, content_ids, tokenizer))
    return (ce * weights.flatten()).sum() / weights.sum(), pointer


def pointer_targets(
    ids: torch.Tensor, place_queries: list[torch.Tensor], content_ids: torch.Tensor, tokenizer: ClipTokenizer
) -> torch.Tensor:
    """(B, L-1): for caption row s, the object query of the thing whose size, colour or shape word
    is token s+1 (the mention count is the number of articles "a" so far), -1 for every other row."""
    article = tokenizer.tokenize("a")[0]
    stop = tokenizer.tokenize("on")[0]
    targets = torch.full((ids.shape[0], ids.shape[1] - 1), -1, dtype=torch.long)
    is_content = torch.isin(ids, content_ids).tolist()
    for b, row in enumerate(ids.tolist()):
        place = -1
        for s, token in enumerate(row[1:]):
            if token == stop:
                break
            place += token == article
            if is_content[b][s + 1] and 0 <= place < len(place_queries[b]):
                targets[b, s] = place_queries[b][place]
    return targets


def pointer_loss(
    model: XDecoderModel, attention: list[tuple[torch.Tensor, torch.Tensor]], targets: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of the first self-attention head of the caption rows in `POINTER_LAYERS` against
    the object query of the thing each row's next word describes. attention: per layer the caption
    rows' projected queries (L, B, D) and keys (Q + L, B, D); targets (B, L-1), -1 = unsupervised."""
    decoder = model.decoder
    q, head_dim = decoder.num_queries, decoder.cfg.hidden_dim // decoder.num_heads
    supervised = targets >= 0
    if not bool(supervised.any()):
        return attention[0][0].sum() * 0.0
    length = targets.shape[1]
    blocked = decoder.self_attn_mask[0, q : q + length, : q + length + 1]  # (L-1, Q + L)
    total = attention[0][0].new_zeros(())
    for layer in POINTER_LAYERS:
        queries, keys = attention[layer]
        scores = torch.einsum("lbd,kbd->blk", queries[:length, :, :head_dim], keys[:, :, :head_dim])
        scores = (scores / head_dim**0.5).masked_fill(blocked, float("-inf"))
        log_probs = scores.log_softmax(-1)[supervised]  # (S, Q + L)
        total = total - log_probs.gather(1, targets[supervised][:, None]).mean()
    return total / len(POINTER_LAYERS)


def retrieval_loss(
    decoder_emb: torch.Tensor, backbone_emb: torch.Tensor, captions: torch.Tensor, negatives: torch.Tensor
) -> torch.Tensor:
    """Symmetric contrastive loss on the retrieval score 0.5 cos(decoder) + 0.5 cos(backbone).

    decoder_emb, backbone_emb (B, D); captions (B, D) EOS features of the true captions; negatives
    (N, D) perturbed captions (image-to-text only)."""
    texts = torch.cat((captions, negatives), dim=0)
    texts = texts / (texts.norm(dim=-1, keepdim=True) + 1e-7)
    dec = decoder_emb / (decoder_emb.norm(dim=-1, keepdim=True) + 1e-7)
    bb = backbone_emb / (backbone_emb.norm(dim=-1, keepdim=True) + 1e-7)
    scores = RETRIEVAL_SCALE * 0.5 * (dec @ texts.T + bb @ texts.T)  # (B, B + N)
    target = torch.arange(dec.shape[0])
    b = dec.shape[0]
    return 0.5 * (F.cross_entropy(scores, target) + F.cross_entropy(scores[:, :b].T, target))


def recipe_losses(
    model: XDecoderModel,
    probes: RegionProbes,
    tokenizer: ClipTokenizer,
    batch: Batch,
    rng: np.random.Generator,
) -> dict[str, torch.Tensor]:
    """Every loss of one batch (see the module docstring)."""
    examples = batch.examples
    features = model.encode_images(batch.images, batch.padded_sizes)
    loss_probe = probe_loss(probes, [*features.multi_scale, features.memory.mask_features], batch)
    memory = features.memory
    q = model.cfg.decoder.num_queries
    text = model.text_encoder

    seg_heads: list[HeadOutput] = []
    last, rows = model.decoder.forward_seg(memory, record=seg_heads, keep_rows=True)
    names = sorted({n for ex in examples for n in ex.vocabulary} | {"background"})
    emb = class_embeddings(model, tokenizer, names, rng)
    index = {n: k for k, n in enumerate(names)}
    vocab = [emb[[index[n] for n in [*ex.vocabulary, "background"]]] for ex in examples]
    loss_seg, matched, place_queries = segmentation_loss(seg_heads, batch, vocab, text.logit_scale)
    loss_probe = loss_probe + query_probe_loss(probes, *matched)

    _, attention, token_feats, phrase_emb = text_features(
        model, tokenizer, [ex.phrase.text for ex in examples]
    )
    tokens = [token_feats[i][attention[i].bool()] for i in range(len(examples))]
    ground_heads: list[HeadOutput] = []
    model.decoder.forward_grounding(memory, tokens, record=ground_heads)
    loss_ground = grounding_loss(ground_heads, batch, phrase_emb, q)

    ids, _, caption_feats, caption_emb = text_features(model, tokenizer, [ex.caption for ex in examples])
    state = model.decoder.caption_state_from_rows(rows, memory)
    loss_caption, loss_pointer = caption_loss(
        model, state, ids, caption_feats, rng, content_token_ids(tokenizer), place_queries, tokenizer
    )

    negatives = [n for ex in examples for n in ex.negatives]
    _, _, _, negative_emb = text_features(model, tokenizer, negatives)
    loss_retrieval = retrieval_loss(
        last.embeds[:, q - 1], model.backbone_embedding(features), caption_emb, negative_emb
    )

    total = (
        loss_seg
        + loss_ground
        + CAPTION_WEIGHT * loss_caption
        + RETRIEVAL_WEIGHT * loss_retrieval
        + PROBE_WEIGHT * loss_probe
        + POINTER_WEIGHT * loss_pointer
    )
    return {
        "loss": total,
        "seg": loss_seg.detach(),
        "ground": loss_ground.detach(),
        "caption": loss_caption.detach(),
        "retrieval": loss_retrieval.detach(),
        "probe": loss_probe.detach(),
        "pointer": loss_pointer.detach(),
    }
