"""decode_image on every odd kind of image in the bad-input corpus: pixels, sizes and error kinds."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bad_corpus import (
    BLUE, EPS, GREEN, MAX_PIXELS, ORIENTED_SIZE, OVER_LIMIT_SIDE, RED, WHITE, animated_gif, cmyk_jpeg, encode,
    image_samples, oriented_jpeg, palette_png_with_transparency, png_16bit_gray, png_16bit_rgb, solid,
)
from paligemma_batch.images import ImageDecodeError, decode_image

SAMPLES = image_samples(np.random.default_rng(5))


def _decode(data: bytes, size=(16, 16), **kwargs):
    return decode_image(data, size, Image.Resampling.NEAREST, **kwargs)


def _close(pixel, color, tolerance=40) -> bool:
    return bool(np.abs(np.asarray(pixel, int) - np.asarray(color, int)).max() <= tolerance)


@pytest.mark.parametrize("sample", [s for s in SAMPLES if s.outcome == "ok"], ids=lambda s: s.key)
def test_odd_images_decode_at_model_size_with_original_size(sample):
    image = decode_image(sample.members[0][1], (64, 64), max_pixels=MAX_PIXELS)
    assert image.pixels.shape == (64, 64, 3) and image.pixels.dtype == np.uint8
    assert (image.width, image.height) == sample.size


@pytest.mark.parametrize("sample", [s for s in SAMPLES if s.outcome != "ok"], ids=lambda s: s.key)
def test_bad_images_raise_their_kind(sample):
    with pytest.raises(ImageDecodeError) as err:
        decode_image(sample.members[0][1], (64, 64), max_pixels=MAX_PIXELS)
    assert err.value.kind == sample.outcome
    assert str(err.value).startswith(f"{sample.outcome}: ") and len(str(err.value)) > len(sample.outcome) + 5


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_shows_the_picture_upright(orientation):
    width, height = ORIENTED_SIZE
    image = _decode(oriented_jpeg(orientation), size=(height, width))  # model size = display size: no distortion
    assert (image.width, image.height) == (width, height)
    px = image.pixels
    assert _close(px[height // 4, width // 4], RED), px[height // 4, width // 4]
    assert _close(px[height // 4, 3 * width // 4], GREEN), px[height // 4, 3 * width // 4]
    assert _close(px[3 * height // 4, width // 2], WHITE)


def test_colour_modes_become_the_right_rgb():
    assert _close(_decode(cmyk_jpeg()).pixels[8, 8], RED)
    gradient = _decode(png_16bit_gray(np.tile(np.linspace(0, 65535, 32), (4, 1))), size=(4, 32)).pixels
    assert gradient[0, 0, 0] == 0 and gradient[0, -1, 0] == 255 and np.all(np.diff(gradient[0, :, 0].astype(int)) >= 0)
    # A nearly black 16-bit image stays nearly black (200/65535), it is not read as 8-bit 200.
    assert _decode(png_16bit_gray(np.full((4, 4), 200))).pixels.max() <= 1
    assert _close(_decode(png_16bit_rgb(4, 4, (65535, 0, 32896))).pixels[0, 0], (255, 0, 128), 1)
    palette = _decode(palette_png_with_transparency(), size=(20, 40)).pixels
    assert _close(palette[10, 5], WHITE, 0) and _close(palette[10, 35], RED, 0)  # transparent → white
    half_red = _decode(encode(solid((8, 8), (*RED, 128), "RGBA"), "PNG")).pixels[0, 0]
    assert _close(half_red, (242, 137, 137), 3)
    assert _close(_decode(animated_gif()).pixels[5, 5], BLUE, 10)  # the first frame
    float_tiff = encode(Image.fromarray(np.full((4, 4), 0.5, np.float32), "F"), "TIFF")
    assert _close(_decode(float_tiff).pixels[0, 0], (128, 128, 128), 1)
    assert _close(_decode(encode(solid((4, 4), 1, "1"), "PNG")).pixels[0, 0], WHITE, 0)
    assert _close(_decode(encode(solid((4, 4), (90, 255), "LA"), "PNG")).pixels[0, 0], (90, 90, 90), 0)


def test_max_pixels_is_configurable():
    big = encode(solid((OVER_LIMIT_SIDE, OVER_LIMIT_SIDE), 0, "L"), "PNG")
    with pytest.raises(ImageDecodeError, match=f"too_large: {OVER_LIMIT_SIDE}x{OVER_LIMIT_SIDE} exceeds 4000000"):
        _decode(big, max_pixels=4_000_000)
    assert _decode(big, max_pixels=OVER_LIMIT_SIDE**2).width == OVER_LIMIT_SIDE


def test_a_format_outside_the_allowed_list_is_never_decoded():
    assert Image.open(io.BytesIO(EPS)).format == "EPS"  # Pillow alone would hand it to Ghostscript
    with pytest.raises(ImageDecodeError, match="decode: not an image in an allowed format .* starts with b'%!PS"):
        _decode(EPS)


def test_draft_decoding_of_a_large_jpeg_matches_a_full_decode():
    ramp = np.linspace(0, 255, 2400, dtype=np.float32)
    pixels = np.stack([np.tile(ramp, (1600, 1)), np.tile(ramp[:1600, None], (1, 2400)), np.full((1600, 2400), 90)], -1)
    jpeg = encode(Image.fromarray(pixels.astype(np.uint8)), "JPEG", quality=90)
    fast = decode_image(jpeg, (64, 64), draft=True)
    full = decode_image(jpeg, (64, 64), draft=False)
    assert (fast.width, fast.height) == (full.width, full.height) == (2400, 1600)
    assert np.abs(fast.pixels.astype(int) - full.pixels.astype(int)).mean() < 2
