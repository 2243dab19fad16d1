"""The demo training recipe: a few steps lower the loss; a run writes weights the Predictor loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.configs import get_config
from models.demo.data import make_batch
from models.demo.losses import recipe_losses
from models.demo.msda_grad import enable_msda_gradients
from models.demo.train import TrainSettings, build_optimizer, input_size, train
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
    examples = make_batch(np.random.default_rng(0), 2, input_size(model))
    optimizer = build_optimizer(model, TrainSettings(lr=2e-3))

    def loss() -> dict[str, torch.Tensor]:
        return recipe_losses(model, tokenizer, examples, np.random.default_rng(1))

    first = loss()
    for _ in range(6):
        optimizer.zero_grad()
        loss()["loss"].backward()
        optimizer.step()
    last = loss()
    assert float(last["loss"].detach()) < 0.8 * float(first["loss"].detach())
    for task in ("seg", "ground", "caption"):
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
