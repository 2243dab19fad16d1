"""Cached greedy captioning: one-position steps of the text encoder (`token_features_step`) and of the
caption rows (`caption_rows` with `start`/`cache`) equal the official full passes
(models.decoders.caption_reference), and give the same greedy tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.configs import ResizeRule
from models.decoders.caption_reference import caption_logits_full_pass, greedy_caption_full_passes
from models.language.text_encoder import LanguageEncoder, TextEncoderConfig
from models.language.tokenizer import BOS_ID
from models.predictor import Predictor
from models.preprocess import batch_images


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.from_config("demo")


def noise_images() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [
        rng.integers(0, 256, (120, 150, 3), dtype=np.uint8),
        rng.integers(0, 256, (90, 60, 3), dtype=np.uint8),
    ]


def test_text_steps_equal_prefix_features() -> None:
    torch.manual_seed(0)
    encoder = LanguageEncoder(TextEncoderConfig(width=32, layers=2, heads=4, projection_dim=16)).eval()
    ids = torch.randint(0, 49408, (3, 12))
    with torch.inference_mode():
        cache = encoder.new_cache(3)
        steps = [encoder.token_features_step(ids[:, i : i + 1], cache) for i in range(12)]
        full = encoder.token_features(ids)
    assert cache.length == 12
    assert steps[0].shape == (3, 1, 16)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_caption_steps_equal_full_pass_on_padded_batch(predictor: Predictor) -> None:
    """Padded images (aspect kept) exercise the blocked padding keys of the caption rows."""
    model = predictor.model
    tokens = torch.randint(0, 49408, (2, 10))
    tokens[:, 0] = BOS_ID
    with torch.inference_mode():
        batch = batch_images(noise_images(), ResizeRule(short=128, max_size=256))
        features = model.encode_images(batch.tensor, batch.padded_sizes)
        assert features.memory.regions is not None  # the second image is padded
        expected = caption_logits_full_pass(model, features.memory, tokens)
        state = model.decoder.caption_state(features.memory)
        text_cache = model.text_encoder.new_cache(2)
        vocab = model.text_encoder.lang_encoder.token_embedding.weight
        for p in range(tokens.shape[1]):
            features_p = model.text_encoder.token_features_step(tokens[:, p : p + 1], text_cache)
            rows = model.decoder.caption_rows(state, features_p, start=p, cache=True)
            logits = rows[:, 0] @ vocab.transpose(0, 1)
            torch.testing.assert_close(logits, expected[:, p], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_greedy_tokens_equal_official_full_passes(predictor: Predictor) -> None:
    model = predictor.model
    with torch.inference_mode():
        _, features = predictor._encode(noise_images(), "captioning")
        official = greedy_caption_full_passes(model, features.memory, steps=20)
        cached = model.greedy_caption(features, steps=20, early_stop=False)
    assert official.shape == cached.shape == (2, 77)
    assert (official[:, 1:21] != BOS_ID).all()  # every step wrote a token
    assert torch.equal(cached, official)


def test_step_weights_are_contiguous_along_their_longer_side_with_unchanged_values(
    predictor: Predictor,
) -> None:
    """On a CPU the Predictor stores the caption step's expanding matrices column-major and keeps the
    contracting ones row-major; the values, the state dict and the greedy tokens stay those of the
    plain layout."""
    served = predictor.model
    text_layer = served.text_encoder.lang_encoder.resblocks[0]
    ffn = served.decoder.transformer_ffn_layers[0]
    expanding = (
        served.text_encoder.lang_encoder.token_embedding.weight,
        text_layer.mlp.c_fc.weight,
        ffn.linear1.weight,
        served.decoder.transformer_self_attention_layers[0].self_attn.in_proj_weight,
    )
    for weight in expanding:
        assert weight.shape[0] > weight.shape[1]
        assert weight.stride() == (1, weight.shape[0])
    for weight in (text_layer.mlp.c_proj.weight, ffn.linear2.weight):
        assert weight.shape[0] < weight.shape[1]
        assert weight.is_contiguous()
    plain = Predictor.from_config("demo").model
    for weight in plain.parameters():
        weight.data = weight.data.contiguous()
    assert plain.text_encoder.lang_encoder.token_embedding.weight.is_contiguous()
    served_state, plain_state = served.state_dict(), plain.state_dict()
    assert list(served_state) == list(plain_state)
    assert all(torch.equal(served_state[k], plain_state[k]) for k in plain_state)
    with torch.inference_mode():
        _, features = predictor._encode(noise_images(), "captioning")
        tokens = served.greedy_caption(features, steps=12, early_stop=False)
        assert torch.equal(tokens, plain.greedy_caption(features, steps=12, early_stop=False))
