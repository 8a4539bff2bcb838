"""Decode, validate and convert one image to the configured spec; encode it as PNG.

Every failure is a `RejectedImage` whose message is the reason recorded in the manifest. Nothing here knows
about Ray or shards, so the same functions serve the Ray Data stage and the single-process benchmark baseline.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_RESAMPLE = Image.Resampling.BICUBIC


class RejectedImage(ValueError):
    """An input that cannot become a sample; str(exc) is the reason."""


def decode(data: bytes) -> Image.Image:
    """Bytes of any PIL-readable format → fully loaded PIL image (truncation is detected here, not later)."""
    if len(data) == 0:
        raise RejectedImage("zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. DecompressionBombWarning, odd EXIF/ICC chunks
            image = Image.open(io.BytesIO(data))
            image.load()
    except UnidentifiedImageError:
        raise RejectedImage("not an image: format not recognised") from None
    except Image.DecompressionBombError as exc:
        raise RejectedImage(f"image too large: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # PIL signals truncation and corruption this way
        raise RejectedImage(f"corrupt or truncated image: {exc}") from None
    if image.width < 1 or image.height < 1:
        raise RejectedImage(f"empty image {image.width}x{image.height}")
    return image


def _to_8bit(image: Image.Image) -> Image.Image:
    """Any mode → L, RGB or RGBA with 8 bits per channel (16-bit and float data scaled, not clipped)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        array = np.asarray(image, dtype=np.float64)
        scale = 257.0 if image.mode != "F" or array.max(initial=0) > 255 else 1.0  # 16-bit range → 8-bit
        return Image.fromarray(np.clip(np.rint(array / scale), 0, 255).astype(np.uint8), "L")
    if image.mode in ("L", "RGB"):
        return image
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        return image.convert("RGBA")
    if image.mode == "CMYK" or image.mode == "YCbCr" or image.mode == "LAB" or image.mode == "HSV":
        return image.convert("RGB")
    if image.mode == "1":
        return image.convert("L")
    return image.convert("RGB")  # P without transparency, I;16 variants PIL handles itself, …


def convert(image: Image.Image, size: int, channels: int, mode: str = "resize") -> Image.Image:
    """PIL image (any mode, any size) → `size` x `size`, mode "L" (channels=1) or "RGB" (channels=3).

    Transparent pixels are composited over white. `mode` "resize" scales the whole image to the square
    (aspect ratio not kept); "center_crop" takes the largest central square first. An image already at the
    target size and mode is returned unchanged (pixel-exact).
    """
    if image.format == "JPEG" or "exif" in image.info:
        image = ImageOps.exif_transpose(image)
    image = _to_8bit(image)
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image).convert("RGB")
    target = "L" if channels == 1 else "RGB"
    if image.mode != target:
        image = image.convert(target)
    if image.size != (size, size):
        if mode == "center_crop" and image.width != image.height:
            side = min(image.width, image.height)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side))
        image = image.resize((size, size), _RESAMPLE, reducing_gap=3.0)
    return image


def encode_png(image: Image.Image) -> bytes:
    """PIL image (L or RGB) → PNG bytes (deterministic for equal pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def image_bytes_to_png(data: bytes, size: int, channels: int, mode: str = "resize") -> bytes:
    """Encoded image bytes → PNG bytes of the target spec. A PNG already in spec is passed through untouched.

    Raises RejectedImage with the reason for anything unusable.
    """
    image = decode(data)
    target = "L" if channels == 1 else "RGB"
    if (image.format == "PNG" and image.mode == target and image.size == (size, size)
            and "transparency" not in image.info):
        return bytes(data)
    return encode_png(convert(image, size, channels, mode))


def pixels_to_png(pixels: np.ndarray, size: int, channels: int, mode: str = "resize") -> bytes:
    """uint8 array (H, W) or (H, W, C) with C in {1, 3} → PNG bytes of the target spec."""
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (1, 3)):
        raise RejectedImage(f"pixel array must be uint8 (H, W[, 1|3]), got {pixels.dtype} {pixels.shape}")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    image = Image.fromarray(np.ascontiguousarray(pixels), "L" if pixels.ndim == 2 else "RGB")
    return encode_png(convert(image, size, channels, mode))


def png_to_array(data: bytes) -> np.ndarray:
    """PNG bytes from a shard → uint8 array (H, W, C)."""
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image)
    return array[:, :, None] if array.ndim == 2 else array
