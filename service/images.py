"""Image checks in the gateway (header only, no decoding) and decoding in the workers.

The gateway reads only the image header to learn format and size (cheap, bounded); the pixels are
decoded by PIL in a worker process, under the same pixel limit.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.errors import ApiError

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")


def inspect_image(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the image header; ApiError for an empty, corrupt, unsupported or huge image."""
    if not data:
        raise ApiError(
            400, "invalid_image", "The image is empty; send the bytes of a JPEG, PNG, WebP or BMP."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=None) as image:
                image_format, (width, height) = image.format, image.size
    except Image.DecompressionBombError:
        raise too_many_pixels(max_pixels) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ApiError(400, "invalid_image", f"The image could not be read ({exc}).") from None
    if image_format not in ALLOWED_FORMATS:
        raise ApiError(
            415,
            "unsupported_image_format",
            f"Images in {image_format} format are not supported; send JPEG, PNG, WebP or BMP.",
        )
    if width * height > max_pixels:
        raise too_many_pixels(max_pixels, width, height)
    return width, height


def too_many_pixels(max_pixels: int, width: int = 0, height: int = 0) -> ApiError:
    size = f" ({width}x{height})" if width else ""
    return ApiError(
        413, "too_many_pixels", f"The image{size} has more than {max_pixels} pixels; downscale it and retry."
    )


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """RGB uint8 array (H, W, 3) of the image; raises ValueError for a corrupt or too large image."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
        if image.width * image.height > max_pixels:
            raise ValueError(f"image has more than {max_pixels} pixels")
        return np.asarray(image.convert("RGB"))


def size_bucket(width: int, height: int) -> str:
    """Batching bucket of an image: its shape class (wide, square, tall) and size class (s, m, l).

    Images of one bucket resize to similar padded shapes, so a batch wastes little on padding.
    """
    ratio = width / max(height, 1)
    shape = "wide" if ratio > 1.25 else "tall" if ratio < 0.8 else "square"
    side = max(width, height)
    size = "s" if side <= 512 else "m" if side <= 1024 else "l"
    return f"{shape}-{size}"
