"""Ingest image handling without Ray: decoding, odd modes and sizes, bad bytes, and the config schema."""

import io

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from pipelines.ingest.config import IngestConfig
from pipelines.ingest.images import RejectedImage, decode, image_bytes_to_png, pixels_to_png, png_to_array
from pipelines.ingest.shards import assign_split


def encoded(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_default_config_is_digits_8x8x1_and_unknown_keys_name_their_path():
    config = IngestConfig()
    assert (config.source.kind, config.image.size, config.image.channels) == ("sklearn_digits", 8, 1)
    assert IngestConfig.model_validate({"image": {"size": 8, "channels": 1}}) == config
    for bad, path in [({"image": {"sise": 8}}, "image.sise"), ({"shard": {"samples": 3}}, "shard.samples"),
                      ({"image": {"channels": 2}}, "image.channels"), ({"split": {"val": 0.6, "test": 0.5}}, "split"),
                      ({"source": {"kind": "folder"}}, "source.path is required"), ({"surce": {}}, "surce")]:
        with pytest.raises(ValidationError, match=path.replace(".", r"\.")):
            IngestConfig.model_validate(bad)
    with pytest.raises(ValidationError):
        config.image.size = 16  # frozen


def test_png_in_spec_round_trips_pixel_exact():
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    data = encoded(Image.fromarray(rgb, "RGB"))
    assert image_bytes_to_png(data, 8, 3) == data  # passed through untouched
    webp = encoded(Image.fromarray(rgb), "WEBP", lossless=True)
    assert np.array_equal(png_to_array(image_bytes_to_png(webp, 8, 3)), rgb)
    assert np.array_equal(png_to_array(pixels_to_png(rgb, 8, 3)), rgb)


def test_grayscale_into_rgb_and_back_is_exact():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    as_rgb = png_to_array(image_bytes_to_png(encoded(Image.fromarray(gray, "L")), 8, 3))
    assert as_rgb.shape == (8, 8, 3) and all(np.array_equal(as_rgb[:, :, c], gray) for c in range(3))
    back = png_to_array(image_bytes_to_png(encoded(Image.fromarray(as_rgb, "RGB")), 8, 1))
    assert back.shape == (8, 8, 1) and np.array_equal(back[:, :, 0], gray)


def test_sixteen_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 257 * 100], [65535, 257 * 200]], dtype=np.uint16)
    data = encoded(Image.fromarray(values))
    assert decode(data).mode.startswith("I")
    out = png_to_array(image_bytes_to_png(data, 2, 1))[:, :, 0]
    assert out.tolist() == [[0, 100], [255, 200]]


def test_palette_png_and_its_transparency():
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[:2] = (255, 0, 0)
    rgb[2:] = (0, 0, 255)
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    assert np.array_equal(png_to_array(image_bytes_to_png(encoded(palette), 4, 3)), rgb)
    index_of_blue = palette.getpixel((0, 3))
    transparent_blue = encoded(palette, transparency=index_of_blue)
    out = png_to_array(image_bytes_to_png(transparent_blue, 4, 3))
    assert out[0, 0].tolist() == [255, 0, 0] and out[3, 3].tolist() == [255, 255, 255]  # composited over white


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    out = png_to_array(image_bytes_to_png(encoded(cmyk, "JPEG", quality=95), 8, 3))
    assert out.shape == (8, 8, 3)
    assert out[..., 0].min() > 230 and out[..., 1:].max() < 30


def test_huge_and_tiny_images_reach_the_target_size():
    huge = Image.linear_gradient("L").resize((4000, 3000))
    for mode in ("resize", "center_crop"):
        out = png_to_array(image_bytes_to_png(encoded(huge, compress_level=1), 8, 1, mode))
        assert out.shape == (8, 8, 1)
        assert out[0, 0, 0] < out[-1, 0, 0]  # gradient runs top to bottom
    tiny = png_to_array(image_bytes_to_png(encoded(Image.new("RGB", (1, 1), (10, 20, 30))), 8, 3))
    assert tiny.shape == (8, 8, 3) and (tiny == [10, 20, 30]).all()


def test_center_crop_keeps_the_middle():
    wide = np.zeros((4, 12), dtype=np.uint8)
    wide[:, 4:8] = 200
    assert (png_to_array(image_bytes_to_png(encoded(Image.fromarray(wide)), 4, 1, "center_crop")) == 200).all()


@pytest.mark.parametrize("data, reason", [
    (b"", "zero-byte"),
    (b"just some text, not a picture\n", "not an image"),
    (encoded(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))[:-500],
     "corrupt or truncated"),
    (encoded(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")[:300],
     "corrupt or truncated"),
])
def test_bad_bytes_are_rejected_with_a_reason(data, reason):
    with pytest.raises(RejectedImage, match=reason):
        image_bytes_to_png(data, 8, 1)


def test_split_assignment_is_stable_and_roughly_proportional():
    keys = [f"k{i}" for i in range(4000)]
    splits = [assign_split(k, 0.1, 0.2, 7) for k in keys]
    assert splits == [assign_split(k, 0.1, 0.2, 7) for k in keys]
    assert abs(splits.count("val") / 4000 - 0.1) < 0.02 and abs(splits.count("test") / 4000 - 0.2) < 0.02
    assert splits != [assign_split(k, 0.1, 0.2, 8) for k in keys]
