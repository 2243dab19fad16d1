"""Precision options: float32 islands under autocast, the TF32 switches, bf16 class embeddings, every
Predictor task in bf16."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from models.language.text_encoder import LanguageEncoder, TextEncoderConfig
from models.language.tokenizer import ClipTokenizer
from models.precision import precision_context, prepare_model, run_in_float32
from models.predictor import Predictor


def test_unknown_precision_is_an_error() -> None:
    with pytest.raises(ValueError, match="fp32, tf32, bf16, fp16"), precision_context("int8", "cpu"):
        pass
    with pytest.raises(ValueError, match="unknown precision"):
        prepare_model(nn.Linear(2, 2), "fp64")


def test_float32_islands_under_bf16_autocast() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8))
    keys = list(model.state_dict())
    x = torch.randn(4, 8)
    with precision_context("bf16", "cpu"):
        assert model[1](model[0](x)).dtype == torch.bfloat16  # plain autocast on CPU: bf16 norm
    prepare_model(model, "bf16")
    with precision_context("bf16", "cpu"):
        hidden = model[0](x)
        normed = model[1](hidden)
        out = model[2](normed)
    assert hidden.dtype == torch.bfloat16 and normed.dtype == torch.float32 and out.dtype == torch.bfloat16
    torch.testing.assert_close(normed, model[1](hidden.float()))
    assert list(model.state_dict()) == keys


def test_run_in_float32_casts_keyword_inputs() -> None:
    norm = nn.LayerNorm(4)
    run_in_float32(norm)
    with precision_context("bf16", "cpu"):
        assert norm(input=torch.randn(2, 4, dtype=torch.bfloat16)).dtype == torch.float32


def test_tf32_switches_are_restored() -> None:
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with precision_context("tf32", "cpu"):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_bf16_class_embeddings_stay_close_to_fp32() -> None:
    torch.manual_seed(0)
    encoder = LanguageEncoder(TextEncoderConfig(width=64, layers=2, heads=4, projection_dim=32)).eval()
    tokenizer = ClipTokenizer()
    names = ["cat", "traffic light"]
    with torch.inference_mode():
        reference = encoder.encode_class_names(names, tokenizer)
        prepare_model(encoder, "bf16")
        with precision_context("bf16", "cpu"):
            low = encoder.encode_class_names(names, tokenizer)
    assert low.dtype == torch.float32
    assert not torch.equal(low, reference)  # really ran in bf16
    assert torch.nn.functional.cosine_similarity(low, reference).min() > 0.99


@pytest.mark.slow
def test_predictor_bf16_runs_every_task() -> None:
    fp32 = Predictor.from_config("demo")
    bf16 = Predictor.from_config("demo", precision="bf16")
    assert bf16.info["precision"] == "bf16" and fp32.info["precision"] == "fp32"
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (100, 120, 3), dtype=np.uint8),
        rng.integers(0, 256, (80, 60, 3), np.uint8),
    ]
    vocab = bf16.encode_texts(["cat", "sky"])
    assert vocab.dtype == torch.float32
    for result, image in zip(bf16.segment(images, [vocab, vocab], "semantic"), images, strict=True):
        covered = np.zeros(image.shape[:2], dtype=bool)
        for segment in result.segments:
            assert segment.mask.shape == image.shape[:2]
            covered |= segment.mask
        assert covered.all()
    assert all(len(r.matches) == 1 for r in bf16.refer(images, ["a cat", "the sky"]))
    assert isinstance(bf16.caption(images[:1])[0], str)
    low, reference = bf16.embed_images(images), fp32.embed_images(images)
    assert low.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(low, reference).min() > 0.95
    with pytest.raises(ValueError, match="unknown precision"):
        Predictor.from_config("demo", precision="int8")
