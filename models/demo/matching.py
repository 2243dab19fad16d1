"""Set matching of predicted masks to ground-truth segments (Mask2Former's Hungarian matcher).

Cost of pairing query q with segment n = w_class * class cost + w_bce * BCE + w_dice * dice, with the
mask terms averaged over pixels. Matching runs without gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


def pairwise_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel BCE of every prediction with every target: (Q, P), (N, P) -> (Q, N)."""
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / logits.shape[1]


def pairwise_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - dice coefficient of every prediction with every target: (Q, P), (N, P) -> (Q, N)."""
    probs = logits.sigmoid()
    numerator = 2 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


@torch.no_grad()
def hungarian_match(
    mask_logits: torch.Tensor,
    targets: torch.Tensor,
    class_cost: torch.Tensor | None = None,
    weights: tuple[float, float, float] = (2.0, 5.0, 5.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal one-to-one pairs of queries and segments.

    mask_logits (Q, P), targets (N, P) with N <= Q, class_cost (Q, N) or None.
    Returns (query indices, target indices), each (N,) int64.
    """
    if targets.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    cost = weights[1] * pairwise_bce(mask_logits, targets) + weights[2] * pairwise_dice(mask_logits, targets)
    if class_cost is not None:
        cost = cost + weights[0] * class_cost
    rows, cols = linear_sum_assignment(cost.float().cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)
