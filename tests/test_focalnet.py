"""The FocalNet backbone's absolute position table (the demo config has one; released FocalNets do not)."""

from __future__ import annotations

import pytest
import torch

from models.backbones.focalnet import FocalNet
from models.configs import get_config


def test_position_table_gives_an_image_the_same_features_alone_and_in_a_padded_batch() -> None:
    cfg = get_config("demo").backbone
    assert cfg.position_table == 64
    torch.manual_seed(0)
    net = FocalNet(cfg).eval()
    small, large = torch.randn(1, 3, 96, 128), torch.randn(1, 3, 160, 192)
    batch = torch.zeros(2, 3, 160, 192)
    batch[0, :, :96, :128], batch[1] = small[0], large[0]
    valid = torch.zeros(2, 1, 160, 192)
    valid[0, :, :96, :128], valid[1] = 1.0, 1.0
    with torch.no_grad():
        alone, batched = net(small), net(batch, valid)
        without_table = FocalNet(cfg).eval()
        without_table.load_state_dict(net.state_dict())
        assert without_table.absolute_pos_embed is not None
        without_table.absolute_pos_embed.zero_()
        plain = without_table(small)
    for name, features in alone.items():
        h, w = features.shape[-2:]
        torch.testing.assert_close(batched[name][:1, :, :h, :w], features, atol=1e-5, rtol=1e-5)
    # the table does reach the features
    assert (alone["res2"] - plain["res2"]).abs().max() > 1e-3


def test_an_input_larger_than_the_position_table_is_a_clear_error() -> None:
    net = FocalNet(get_config("demo").backbone).eval()
    with torch.no_grad(), pytest.raises(ValueError, match=r"288x64 pixels has more patches \(72x16\)"):
        net(torch.zeros(1, 3, 288, 64))
    assert FocalNet(get_config("xdecoder-focalt").backbone).absolute_pos_embed is None
