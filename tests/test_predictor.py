"""The Predictor API on the small `demo` model: every task runs, batches equal single images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.configs import ResizeRule, get_config
from models.predictor import Predictor, ReferringResult, SegmentationResult, seeded_model
from models.preprocess import batch_images, resized_shape


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.from_config("demo")


@pytest.fixture(scope="module", params=["transformer_encoder_fpn", "transformer_encoder_deform"])
def padded_predictor(request: pytest.FixtureRequest) -> Predictor:
    """The demo architecture with shortest-edge resizing, so images of different shapes are padded
    differently in a batch; both pixel decoders."""
    cfg = get_config("demo")
    cfg.pixel_decoder.name = request.param
    edge = ResizeRule(short=128, max_size=256)
    cfg.resize = {**cfg.resize, "segmentation": edge, "grounding": edge}
    return Predictor(seeded_model(cfg), "demo", f"test-{request.param}", "cpu", "torch")


def smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth colour pattern (not noise), so masks have some structure."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    channels = [
        np.sin(6 * x * rng.uniform(0.5, 2) + rng.uniform(0, 6)) + np.cos(5 * y * rng.uniform(0.5, 2))
        for _ in range(3)
    ]
    return ((np.stack(channels, axis=-1) + 2) * 63).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [smooth_image(200, 256, 0), smooth_image(150, 120, 1)]


def test_resize_rounding_and_padding() -> None:
    rule = ResizeRule(short=800, max_size=1333)
    assert resized_shape(300, 451, rule) == (800, 1203)
    assert resized_shape(100, 1000, rule) == (133, 1333)
    image = np.zeros((300, 451, 3), dtype=np.uint8)
    batch = batch_images([image, np.zeros((100, 80, 3), dtype=np.uint8)], rule)
    assert batch.image_sizes[0] == (800, 1203) and batch.padded_sizes[0] == (800, 1216)
    assert batch.tensor.shape == (2, 3, 1024, 1216)  # 100x80 -> 1000x800 -> padded 1024x800
    # normalised before padding: the image area holds -mean/std, the padding zeros
    assert batch.tensor[0, 0, 0, 0] == pytest.approx(-123.675 / 58.395)
    assert torch.all(batch.tensor[0, :, :, 1203:] == 0)


def test_scale_rule_keeps_sizes_in_pixels_up_to_the_cap() -> None:
    rule = ResizeRule(scale=0.5, max_size=224)
    assert resized_shape(192, 448, rule) == (96, 224)
    assert resized_shape(301, 250, rule) == (151, 125)  # int(x + 0.5), as the shortest-edge rule
    assert resized_shape(1000, 500, rule) == (224, 112)  # past the cap: the long side is 224
    assert resized_shape(1, 3, rule) == (1, 2)
    assert rule.nominal_size() == (224, 224)
    batch = batch_images([np.zeros((192, 448, 3), dtype=np.uint8), np.zeros((300, 250, 3), np.uint8)], rule)
    assert batch.padded_sizes == [(96, 224), (160, 128)] and batch.tensor.shape == (2, 3, 160, 224)


def test_from_config_errors() -> None:
    with pytest.raises(KeyError, match="known configs: xdecoder-focalt, xdecoder-focall, demo"):
        get_config("nope")
    with pytest.raises(ValueError, match="OPENSET_CHECKPOINT"):
        Predictor.from_config("xdecoder-focalt")
    with pytest.raises(ValueError, match="runtime"):
        Predictor.from_config("demo", runtime="tensorrt")


def test_identity_and_info(predictor: Predictor) -> None:
    assert predictor.model_id.startswith("demo@")
    assert Predictor.from_config("demo").model_id == predictor.model_id
    info = predictor.info
    assert info["name"] == "demo" and info["runtime"] == "torch" and info["device"] == "cpu"
    assert {"semantic", "panoptic", "instance", "refer", "caption", "retrieve"} <= set(info["tasks"])
    rule = get_config("demo").resize["segmentation"]
    assert info["input_sizes"]["segmentation"] == {"scale": rule.scale, "max": rule.max_size}


def test_demo_init_is_deterministic(predictor: Predictor) -> None:
    other = Predictor.from_config("demo")
    for (key, a), b in zip(
        predictor.model.state_dict().items(), other.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), key


def test_encode_texts(predictor: Predictor) -> None:
    emb = predictor.encode_texts(["cat", "dog", "traffic light"])
    assert emb.shape == (3, get_config("demo").text.projection_dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(predictor.encode_texts(["dog"])[0], emb[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("task", ["semantic", "panoptic", "instance"])
def test_segment_batched_equals_single(
    padded_predictor: Predictor, images: list[np.ndarray], task: str
) -> None:
    predictor = padded_predictor
    vocab_a = predictor.encode_texts(["cat", "dog", "sky"])
    vocab_b = predictor.encode_texts(["car", "road"])
    flags = [[True, True, False], [True, False]]
    threshold = 0.0 if task == "panoptic" else None  # untrained weights: keep low-confidence queries
    batched = predictor.segment(images, [vocab_a, vocab_b], task, thing_flags=flags, threshold=threshold)
    single = [
        predictor.segment([images[0]], [vocab_a], task, thing_flags=flags[:1], threshold=threshold)[0],
        predictor.segment([images[1]], [vocab_b], task, thing_flags=flags[1:], threshold=threshold)[0],
    ]
    if task != "panoptic":  # untrained weights: no panoptic query may pass the overlap rule
        assert all(len(r.segments) > 0 for r in batched)
    for image, vocab, b, s in zip(images, [vocab_a, vocab_b], batched, single, strict=True):
        assert isinstance(b, SegmentationResult) and b.task == task
        assert b.image_size == image.shape[:2]
        assert len(b.segments) == len(s.segments)
        for x, y in zip(b.segments, s.segments, strict=True):
            assert (x.id, x.label_index, x.isthing) == (y.id, y.label_index, y.isthing)
            assert 0 <= x.label_index < vocab.shape[0]
            assert x.score == pytest.approx(y.score, abs=1e-5)
            assert x.mask.dtype == bool and x.mask.shape == image.shape[:2]
            assert (x.mask != y.mask).mean() <= 1e-3


def test_semantic_covers_the_image_and_flags_thing(predictor: Predictor, images: list[np.ndarray]) -> None:
    vocab = predictor.encode_texts(["cat", "dog"])
    result = predictor.segment(images[:1], [vocab], "semantic", thing_flags=[[False, True]])[0]
    total = sum(s.mask.astype(int) for s in result.segments)
    assert np.all(total == 1)  # one label per pixel
    assert all(s.isthing == (s.label_index == 1) for s in result.segments)


def test_refer_batched_equals_single(padded_predictor: Predictor, images: list[np.ndarray]) -> None:
    predictor = padded_predictor
    batch = batch_images(images, predictor.model.cfg.resize["grounding"])
    assert batch.padded_sizes[0] != batch.padded_sizes[1]  # the batch really pads
    phrases = ["the red ball", "a dog on the left of the picture"]
    batched = predictor.refer(images, phrases)
    single = [predictor.refer([im], [ph])[0] for im, ph in zip(images, phrases, strict=True)]
    for image, phrase, b, s in zip(images, phrases, batched, single, strict=True):
        assert isinstance(b, ReferringResult) and b.phrase == phrase
        assert len(b.matches) == 1 and len(s.matches) == 1
        assert b.matches[0].score == pytest.approx(s.matches[0].score, abs=1e-5)
        assert b.matches[0].mask.shape == image.shape[:2]
        assert (b.matches[0].mask != s.matches[0].mask).mean() <= 1e-3


def test_refer_multi_threshold(predictor: Predictor, images: list[np.ndarray]) -> None:
    best = predictor.refer(images[:1], ["the red ball"])[0].matches[0]
    everything = predictor.refer(images[:1], ["the red ball"], multi=True, threshold=-1.0)[0].matches
    nothing = predictor.refer(images[:1], ["the red ball"], multi=True, threshold=1.0)[0].matches
    assert nothing == []
    num_grounding = get_config("demo").decoder.num_queries - 1
    assert len(everything) == num_grounding
    scores = [m.score for m in everything]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == pytest.approx(best.score, abs=1e-6)
    above = predictor.refer(images[:1], ["the red ball"], multi=True, threshold=float(np.median(scores)))[0]
    assert 0 < len(above.matches) < num_grounding


@pytest.mark.slow
def test_caption_batched_and_early_stop(predictor: Predictor, images: list[np.ndarray]) -> None:
    captions = predictor.caption(images)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    assert captions == [predictor.caption([im])[0] for im in images]
    full = predictor.caption_tokens(images, early_stop=False)
    assert full.shape == (2, 77)
    assert torch.all(full[:, 51:] == 49406)  # positions after step 50 keep the start token


@pytest.mark.slow
def test_caption_early_stop_keeps_text(predictor: Predictor, images: list[np.ndarray]) -> None:
    """Make the model emit end-of-text at a known step by swapping that step's greedy token with it in
    the (tied) vocabulary, then compare the early-stopped and the full 50-step decoding."""
    bos, eos = 49406, 49407
    before = predictor.caption_tokens(images[:1], early_stop=False)[0]
    step = next(s for s in range(1, 20) if int(before[s + 1]) not in before[: s + 1].tolist())
    token = int(before[step + 1])
    vocab = predictor.model.text_encoder.lang_encoder.token_embedding.weight
    saved = vocab.detach().clone()
    with torch.no_grad():
        vocab[[token, eos]] = saved[[eos, token]]
    try:
        early = predictor.caption_tokens(images[:1], early_stop=True)[0]
        full = predictor.caption_tokens(images[:1], early_stop=False)[0]
    finally:
        with torch.no_grad():
            vocab.copy_(saved)
    assert torch.equal(full[: step + 1], before[: step + 1])
    assert int(full[step + 1]) == eos and int(early[step + 1]) == eos
    assert torch.all(early[step + 2 :] == bos)  # stopped right after end-of-text
    assert not torch.all(full[step + 2 : 51] == bos)  # the full run went on
    decode = predictor.tokenizer.decode
    assert decode(early).split("<|endoftext|>")[0] == decode(full).split("<|endoftext|>")[0]


def test_retrieval(predictor: Predictor, images: list[np.ndarray]) -> None:
    texts = ["a cat", "a bowl of fruit on a table", "two dogs"]
    scores = predictor.retrieve(images, texts)
    assert scores.shape == (2, 3)
    assert scores.abs().max() <= 1.0
    combined = predictor.embed_images(images) @ predictor.embed_texts(texts).T
    torch.testing.assert_close(scores, combined, atol=1e-6, rtol=0)
    single = torch.cat([predictor.retrieve([im], texts) for im in images])
    torch.testing.assert_close(scores, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(predictor.embed_texts(texts).norm(dim=-1), torch.ones(3))


def test_segment_input_errors(predictor: Predictor, images: list[np.ndarray]) -> None:
    vocab = predictor.encode_texts(["cat", "dog"])
    with pytest.raises(ValueError, match="one"):
        predictor.segment(images, [vocab], "semantic")
    with pytest.raises(ValueError, match="thing_flags"):
        predictor.segment(images[:1], [vocab], "panoptic", thing_flags=[[True]])
    with pytest.raises(ValueError, match="C >= 1"):
        predictor.segment(images[:1], [vocab[:0]], "semantic")
    with pytest.raises(ValueError, match="unknown segmentation task"):
        predictor.segment(images[:1], [vocab], "depth")
