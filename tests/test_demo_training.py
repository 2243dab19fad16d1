"""The demo training recipe: a few steps lower the loss; a run writes weights the Predictor loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.configs import get_config
from models.demo.data import Example, ExampleStream, make_batch
from models.demo.losses import (
    content_token_ids,
    pointer_loss,
    pointer_targets,
    recipe_losses,
    segmentation_loss,
)
from models.demo.msda_grad import enable_msda_gradients
from models.demo.probes import RegionProbes, region_features
from models.demo.shapesworld import SHAPES, THING_COLOURS
from models.demo.train import TrainSettings, build_optimizer, train, training_rule
from models.language.tokenizer import ClipTokenizer
from models.ops import MSDeformAttn, ms_deform_attn_reference
from models.predictor import Predictor
from models.xdecoder import XDecoderModel


def test_msda_gradients_equal_the_reference() -> None:
    enable_msda_gradients()
    torch.manual_seed(0)
    attn = MSDeformAttn(16, 2, 2, 2)
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.5)
    shapes, starts = torch.tensor([[3, 4], [6, 8]]), torch.tensor([0, 12])
    x = torch.randn(2, 60, 16, requires_grad=True)
    query = torch.randn(2, 5, 16, requires_grad=True)
    ref = torch.rand(2, 5, 2, 2)
    grads = []
    for fn in ("op", "reference"):
        if fn == "reference":  # the same module computed through the differentiable reference
            value = attn.value_proj(x).view(2, 60, 2, 8)
            off = attn.sampling_offsets(query).view(2, 5, 2, 2, 2, 2)
            w = attn.attention_weights(query).view(2, 5, 2, 4).softmax(-1).view(2, 5, 2, 2, 2)
            norm = torch.stack([shapes[:, 1], shapes[:, 0]], -1)
            loc = ref[:, :, None, :, None] + off / norm[None, None, None, :, None]
            out = attn.output_proj(ms_deform_attn_reference(value, shapes, starts, loc, w))
        else:
            out = attn(query, ref, x, shapes, starts)
        grads.append(torch.autograd.grad(out.square().sum(), (x, query, attn.sampling_offsets.weight)))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_a_few_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    enable_msda_gradients()
    model = XDecoderModel(get_config("demo")).train()
    tokenizer = ClipTokenizer()
    batch = make_batch(np.random.default_rng(0), 2, training_rule(model))
    probes = RegionProbes.for_model(model.cfg)
    optimizer = build_optimizer(model, TrainSettings(lr=2e-3), probes)

    def loss() -> dict[str, torch.Tensor]:
        return recipe_losses(model, probes, tokenizer, batch, np.random.default_rng(1))

    first = loss()
    for _ in range(6):
        optimizer.zero_grad()
        loss()["loss"].backward()
        optimizer.step()
    last = loss()
    assert float(last["loss"].detach()) < 0.8 * float(first["loss"].detach())
    for task in ("seg", "ground", "caption", "probe"):
        assert float(last[task]) < float(first[task]), task


@pytest.mark.slow
def test_train_writes_loadable_fp16_weights(tmp_path: Path) -> None:
    out = tmp_path / "demo.safetensors"
    torch.set_num_threads(2)
    history = train(
        TrainSettings(max_steps=2, batch_size=1, out=out, log_every=1, threads=1), log=lambda _: None
    )
    assert torch.get_num_threads() == 2, "train() must give the caller its thread count back"
    assert [row["step"] for row in history] == [1, 2]
    assert all(np.isfinite(row["loss"]) for row in history)
    assert out.stat().st_size < 20 * 2**20
    predictor = Predictor.from_config("demo", checkpoint=out)
    assert predictor.model.backbone_proj.dtype == torch.float32
    image = np.zeros((200, 300, 3), dtype=np.uint8)
    assert isinstance(predictor.caption([image])[0], str)


@pytest.mark.slow
def test_two_workers_share_the_steps_and_stay_identical(tmp_path: Path) -> None:
    """Two spawned worker processes, gloo all-reduce: the run logs every step from rank 0, ends with
    the copies bit-identical (the run checks it and would raise) and writes loadable weights."""
    out = tmp_path / "demo.safetensors"
    lines: list[str] = []
    history = train(
        TrainSettings(max_steps=3, batch_size=2, workers=2, out=out, log_every=1), log=lines.append
    )
    assert [row["step"] for row in history] == [1, 2, 3]
    assert all(np.isfinite(row["loss"]) for row in history)
    assert lines[-1].startswith(f"wrote {out} after 3 steps")
    reloaded = Predictor.from_config("demo", checkpoint=out)
    assert isinstance(reloaded.caption([np.zeros((200, 300, 3), dtype=np.uint8)])[0], str)


def test_a_failing_worker_stops_the_run_with_its_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(RuntimeError, match=r"worker \d:\n"):
        train(TrainSettings(max_steps=1, batch_size=2, workers=2, out=None, init=missing), log=lambda _: None)


def test_the_batch_must_split_over_the_workers() -> None:
    with pytest.raises(ValueError, match="does not split over 3 workers"):
        train(TrainSettings(max_steps=1, batch_size=8, workers=3, out=None), log=lambda _: None)


def test_example_stream_uses_every_example_once_oldest_first() -> None:
    rule = get_config("demo").resize["segmentation"]
    stream = ExampleStream(np.random.default_rng(5), rule, batch_size=4, pool_size=12)
    seen: list[Example] = []  # kept alive, so that no two of them can share an id()
    for _ in range(6):
        if stream.pool:
            oldest = stream.pool[0]
        batch = stream.next_batch()
        if seen:
            assert any(ex is oldest for ex in batch.examples)  # nobody waits forever
        seen += batch.examples
        big = tuple(batch.images.shape[-2:])
        for i, ex in enumerate(batch.examples):
            assert ex.masks.shape[-2:] == big and ex.phrase_masks.shape[-2:] == big
            h, w = ex.size
            assert torch.all(batch.images[i, :, h:] == 0) and torch.all(ex.masks[:, :, w:] == 0)
        if batch.padded_sizes is not None:
            assert max(batch.padded_sizes) <= big and len(set(batch.padded_sizes)) > 1
    assert len({id(ex) for ex in seen}) == len(seen) == 24


def test_region_features_average_each_things_own_pixels() -> None:
    batch = make_batch(np.random.default_rng(6), 2, get_config("demo").resize["segmentation"])
    for ex in batch.examples:
        things = ex.masks[: ex.shapes.shape[0]]
        h, w = ex.size
        # a feature map that is 1 inside the image and 0 in the padding, plus a ramp along x
        ones = torch.zeros(things.shape[-2:])
        ones[:h, :w] = 1
        ramp = torch.arange(things.shape[-1], dtype=torch.float32).expand_as(ones)
        regions = region_features(torch.stack((ones, ramp)), things)
        assert regions.shape == (things.shape[0], 2)
        torch.testing.assert_close(regions[:, 0], torch.ones(things.shape[0]))
        centres = (things * ramp).sum((1, 2)) / things.sum((1, 2))  # each mask's mean x
        torch.testing.assert_close(regions[:, 1], centres, atol=1e-3, rtol=1e-4)
    cfg = get_config("demo")
    probes = RegionProbes.for_model(cfg)
    levels = cfg.decoder.num_feature_levels + 1  # pixel-decoder levels and the mask features
    assert len(probes.shape) == len(probes.size) == levels


def test_segmentation_loss_hands_back_every_thing_matched_once() -> None:
    torch.manual_seed(0)
    model = XDecoderModel(get_config("demo")).train()
    batch = make_batch(np.random.default_rng(7), 2, training_rule(model))
    features = model.encode_images(batch.images, batch.padded_sizes)
    heads: list = []
    model.decoder.forward_seg(features.memory, record=heads)
    dim = model.cfg.text.projection_dim
    vocab = [
        torch.nn.functional.normalize(torch.randn(len(ex.vocabulary) + 1, dim), dim=-1)
        for ex in batch.examples
    ]
    loss, (embeds, shapes, sizes, orders), place_queries = segmentation_loss(
        heads, batch, vocab, model.text_encoder.logit_scale
    )
    assert torch.isfinite(loss)
    things = sum(ex.shapes.shape[0] for ex in batch.examples)
    assert embeds.shape == (things, dim)
    # the matched things are each image's things, each once (matching order within an image)
    start = 0
    for ex in batch.examples:
        n = ex.shapes.shape[0]
        for got, want in ((shapes, ex.shapes), (sizes, ex.size_classes), (orders, ex.caption_order)):
            torch.testing.assert_close(got[start : start + n].sort().values, want.sort().values)
        start += n
    # per image, caption place p -> the last head's query matched to that thing (distinct queries)
    q = model.decoder.num_queries
    start = 0
    for i, (ex, queries) in enumerate(zip(batch.examples, place_queries, strict=True)):
        n = ex.shapes.shape[0]
        assert queries.shape == (n,) and len(set(queries.tolist())) == n
        assert int(queries.min()) >= 0 and int(queries.max()) < q - 1
        for k in range(n):
            place = int(orders[start + k])
            torch.testing.assert_close(embeds[start + k], heads[-1].embeds[i, queries[place]])
        start += n


def test_pointer_targets_name_the_query_of_each_mention_word() -> None:
    tokenizer = ClipTokenizer()
    caption = "a small red circle, a blue square and a large white star on grass under sky"
    ids, _ = tokenizer.encode([caption], context_length=77)
    places = [torch.tensor([9, 4, 12])]  # the queries of the things at caption places 0, 1, 2
    targets = pointer_targets(ids, places, content_token_ids(tokenizer), tokenizer)
    assert targets.shape == (1, 76)
    # row s is supervised when token s+1 is a size, colour or shape word of a mention
    pointed = [(tokenizer.decode([int(ids[0, s + 1])]), int(t)) for s, t in enumerate(targets[0]) if t >= 0]
    assert pointed == [
        ("small", 9), ("red", 9), ("circle", 9),
        ("blue", 4), ("square", 4),
        ("large", 12), ("white", 12), ("star", 12),
    ]  # fmt: skip


def test_pointer_loss_is_low_only_when_the_first_head_attends_to_the_target() -> None:
    model = XDecoderModel(get_config("demo"))
    q, d = model.decoder.num_queries, model.cfg.decoder.hidden_dim
    length = 6  # caption positions: rows 0..4 predict positions 1..5
    keys = torch.zeros(q + length, 1, d)
    keys[3, 0, 0] = 100.0  # only query 3's key lies along the first axis of head 0
    queries = torch.zeros(length, 1, d)
    queries[:, 0, 0] = 1.0
    attention = [(queries, keys)] * model.decoder.num_layers
    assert pointer_loss(model, attention, torch.tensor([[-1, 3, 3, -1, -1]])) < 1e-3
    assert pointer_loss(model, attention, torch.tensor([[-1, 7, 7, -1, -1]])) > 5
    assert pointer_loss(model, attention, torch.full((1, 5), -1)) == 0


def test_caption_content_tokens_are_the_mention_words() -> None:
    tokenizer = ClipTokenizer()
    words = {tokenizer.decode([int(i)]).strip() for i in content_token_ids(tokenizer)}
    assert words == {"small", "large", *THING_COLOURS, *SHAPES}
