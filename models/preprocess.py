"""Image preprocessing of the official X-Decoder evaluation paths.

decode (PIL, EXIF transpose, RGB, uint8 HWC)
-> resize with PIL bilinear by the task's rule (shortest edge 800/1333, 512/1024, or 224x224;
   the demo model: a constant scale)
-> (x - mean) / std on the 0-255 scale, CHW float32
-> zero-pad right/bottom (after normalisation) to a multiple of 32; a batch pads to its largest.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from models.configs import ResizeRule, official_resize

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
SIZE_DIVISIBILITY = 32


# The resize of each task's official evaluation data path (README of the reference data, section 4);
# a config may set its own (`XDecoderConfig.resize`).
TASK_RESIZE = official_resize()


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 (H, W, 3), EXIF orientation applied."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


def load_image(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        return decode_image(f.read())


def resized_shape(h: int, w: int, rule: ResizeRule) -> tuple[int, int]:
    """Output (h, w) of the rule; ResizeShortestEdge rounds with int(x + 0.5)."""
    if rule.fixed is not None:
        return rule.fixed
    assert rule.max_size is not None
    if rule.scale is not None:
        scale = min(rule.scale, rule.max_size / max(h, w))
        return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
    assert rule.short is not None
    scale = rule.short / min(h, w)
    new_h, new_w = (rule.short, scale * w) if h < w else (scale * h, rule.short)
    if max(new_h, new_w) > rule.max_size:
        scale = rule.max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def resize_image(image: np.ndarray, rule: ResizeRule) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (h, w, 3) with PIL bilinear (a no-op when the size is unchanged)."""
    h, w = resized_shape(image.shape[0], image.shape[1], rule)
    if (h, w) == image.shape[:2]:
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def normalize(image: np.ndarray) -> torch.Tensor:
    """uint8 (h, w, 3) -> float32 (3, h, w), (x - mean) / std on the 0-255 scale."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float()
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    return (x - mean) / std


def padded_size(h: int, w: int) -> tuple[int, int]:
    d = SIZE_DIVISIBILITY
    return -(-h // d) * d, -(-w // d) * d


@dataclass
class ImageBatch:
    """A padded batch. tensor (B, 3, H, W); per image: resized (h, w), own padded size (a multiple of
    32) and original (H0, W0)."""

    tensor: torch.Tensor
    image_sizes: list[tuple[int, int]]
    padded_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]


def batch_images(images: list[np.ndarray], rule: ResizeRule) -> ImageBatch:
    """Resize, normalise and zero-pad a list of uint8 (H, W, 3) images of any sizes into one batch."""
    if not images:
        raise ValueError("no images given")
    tensors, sizes, originals = [], [], []
    for image in images:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"images must be uint8 (H, W, 3) arrays, got {image.dtype} {image.shape}")
        originals.append((int(image.shape[0]), int(image.shape[1])))
        x = normalize(resize_image(image, rule))
        tensors.append(x)
        sizes.append((x.shape[1], x.shape[2]))
    padded = [padded_size(h, w) for h, w in sizes]
    big_h = max(p[0] for p in padded)
    big_w = max(p[1] for p in padded)
    batch = torch.zeros(len(images), 3, big_h, big_w)
    for i, x in enumerate(tensors):
        batch[i, :, : x.shape[1], : x.shape[2]] = x
    return ImageBatch(batch, sizes, padded, originals)
