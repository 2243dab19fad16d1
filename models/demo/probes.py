"""Training-only region probes: the shape and size class of each thing, read from its features.

    probes = RegionProbes.for_model(model.cfg)
    loss = probe_loss(probes, [*features.multi_scale, features.memory.mask_features], batch)

Colour alone tells most ShapesWorld classes apart, and without a direct signal the image features
learn colour and hardly any shape: the class embeddings of `red circle` and `red star` then collapse
together, since nothing in the image separates them. Per feature level, each thing's features are
averaged over its true mask (as the decoder's masked attention averages them over a predicted one)
and a linear layer predicts its shape and its size class (small, no size word, large). The object
queries matched to things get the same two probes plus one for the thing's place in the caption (left
to right), what the caption rows need to read from them in order. The probes only shape the features
during training: they are not part of the model and are never saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.configs import XDecoderConfig
from models.demo.data import SIZE_CLASS, Batch
from models.demo.shapesworld import MAX_THINGS, SHAPES


class RegionProbes(nn.Module):
    """Per feature level (of `dims` channels), a linear layer to shape logits and one to size-class
    logits."""

    def __init__(self, dims: list[int], query_dim: int) -> None:
        super().__init__()
        self.shape = nn.ModuleList(nn.Linear(d, len(SHAPES)) for d in dims)
        self.size = nn.ModuleList(nn.Linear(d, len(SIZE_CLASS)) for d in dims)
        self.query_shape = nn.Linear(query_dim, len(SHAPES))
        self.query_size = nn.Linear(query_dim, len(SIZE_CLASS))
        self.query_order = nn.Linear(query_dim, MAX_THINGS)

    @classmethod
    def for_model(cls, cfg: XDecoderConfig) -> RegionProbes:
        """Probes on the pixel decoder's levels and the mask features (what `probe_loss` is given),
        and on the class embeddings of the object queries matched to things (`query_probe_loss`)."""
        levels = cfg.decoder.num_feature_levels
        dims = [cfg.pixel_decoder.conv_dim] * levels + [cfg.pixel_decoder.mask_dim]
        return cls(dims, cfg.text.projection_dim)


def region_features(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """features (D, h, w) of one image, soft masks (T, H, W) at the batch size -> (T, D), each
    thing's features averaged over its mask (area pooled to (h, w))."""
    pooled = F.adaptive_avg_pool2d(masks[None], features.shape[-2:])[0]  # (T, h, w)
    weights = pooled / pooled.sum((1, 2), keepdim=True).clamp_min(1e-6)
    return torch.einsum("thw,dhw->td", weights, features)


def probe_loss(probes: RegionProbes, feature_maps: list[torch.Tensor], batch: Batch) -> torch.Tensor:
    """Shape + size-class cross-entropy of every thing on every level (B, D, h_l, w_l), averaged
    over the things of the batch and summed over the levels."""
    shapes = torch.cat([ex.shapes for ex in batch.examples])
    sizes = torch.cat([ex.size_classes for ex in batch.examples])
    total = feature_maps[0].new_zeros(())
    for level, features in enumerate(feature_maps):
        regions = torch.cat(
            [
                region_features(features[i], ex.masks[: ex.shapes.shape[0]])
                for i, ex in enumerate(batch.examples)
            ]
        )
        total = total + F.cross_entropy(probes.shape[level](regions), shapes)
        total = total + F.cross_entropy(probes.size[level](regions), sizes)
    return total


def query_probe_loss(
    probes: RegionProbes,
    embeds: torch.Tensor,
    shapes: torch.Tensor,
    sizes: torch.Tensor,
    orders: torch.Tensor,
) -> torch.Tensor:
    """Shape + size-class + caption-place cross-entropy of the object queries matched to things:
    embeds (M, D); shapes, size classes and places in the caption (M,)."""
    if embeds.shape[0] == 0:
        return embeds.sum() * 0.0
    shape_ce = F.cross_entropy(probes.query_shape(embeds), shapes)
    size_ce = F.cross_entropy(probes.query_size(embeds), sizes)
    return shape_ce + size_ce + F.cross_entropy(probes.query_order(embeds), orders)
