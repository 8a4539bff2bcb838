"""Images over HTTP: float [N, C, H, W] in [−1, 1] ⇄ base64 PNG / NPY, and a PNG grid (Pillow + numpy only)."""

from __future__ import annotations

import base64
import binascii
import io
import math

import numpy as np
from PIL import Image, UnidentifiedImageError

from diffusion.images import grid_canvas, to_uint8


class ImageDecodeError(ValueError):
    """An uploaded image that is not a decodable image of the expected shape (the message says which)."""


def _png(pixels: np.ndarray) -> bytes:
    """uint8 [H, W, C] (C = 1 or 3) → PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_list(images: np.ndarray) -> list[str]:
    """[N, C, H, W] in [−1, 1] → N base64 PNGs."""
    return [b64(_png(pixels)) for pixels in to_uint8(images)]


def grid_png(images: np.ndarray, nrow: int | None = None, padding: int = 2, pad_value: int = 255) -> bytes:
    """[N, C, H, W] in [−1, 1] → one PNG with `nrow` images per row (default ⌈√N⌉), framed by `padding` pixels."""
    return _png(grid_canvas(to_uint8(images), nrow or math.ceil(math.sqrt(images.shape[0])), padding, pad_value))


def npy_bytes(images: np.ndarray) -> bytes:
    """The float32 samples [N, C, H, W] in [−1, 1] as an .npy file."""
    buffer = io.BytesIO()
    np.save(buffer, images.astype(np.float32), allow_pickle=False)
    return buffer.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode_image(data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    """PNG/JPEG/... bytes → float32 [C, H, W] in [−1, 1] for a model of image `shape` (C, H, W).

    Grey/colour is converted to C channels; a different size is an error (resizing would change the data whose
    likelihood is asked for).
    """
    channels, height, width = shape
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.size != (width, height):  # checked before decoding, so a decompression bomb costs nothing
                raise ImageDecodeError(f"image is {image.size[0]}x{image.size[1]}, the model takes {width}x{height}")
            image.load()
            converted = image.convert("L" if channels == 1 else "RGB")
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageDecodeError(f"not a decodable image ({type(error).__name__})") from None
    pixels = np.asarray(converted, dtype=np.float32).reshape(height, width, channels)
    return pixels.transpose(2, 0, 1) / 127.5 - 1.0


def decode_b64(text: str) -> bytes:
    try:
        return base64.b64decode(text.split(",", 1)[1] if text.startswith("data:") else text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageDecodeError("not valid base64") from None
