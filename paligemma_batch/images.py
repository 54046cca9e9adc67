"""Image bytes → RGB pixels at the model's resolution.

Decodes every format Pillow reads itself (no external programs), applies the EXIF orientation, flattens
transparency onto white, maps 16-bit and float images to 8 bits, guards against decompression bombs, and lets JPEG decode at a reduced scale (draft mode)
when the image is far larger than the model input. Knows nothing of Ray or models.
"""

from __future__ import annotations

import functools
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Draft decoding keeps at least this multiple of the target size, so the final resize still antialiases.
DRAFT_HEADROOM = 2
# Pillow formats never decoded, whatever the file is named: EPS hands the file to Ghostscript; the others are
# stubs that only identify a file (MPEG, the scientific formats without a registered handler) or need Windows.
NEVER_DECODED = frozenset({"EPS", "MPEG", "BUFR", "GRIB", "HDF5", "WMF"})


@functools.cache
def decoded_formats() -> tuple[str, ...]:
    """Every format this Pillow opens with its own decoders (AVIF, JPEG 2000, QOI, PPM, TGA, ... besides the usual).

    Computed on first use: registering every Pillow plugin takes a noticeable part of a second.
    """
    Image.init()
    return tuple(sorted(f for f in Image.OPEN if f not in NEVER_DECODED))


@functools.cache
def image_extensions() -> tuple[str, ...]:
    """The file extensions of :func:`decoded_formats` (lower case, no dot), as Pillow registers them."""
    formats = set(decoded_formats())
    return tuple(sorted({ext.lstrip(".").lower() for ext, fmt in Image.registered_extensions().items()
                         if fmt in formats}))

class ImageDecodeError(ValueError):
    """An image that cannot become model input; ``kind`` is a short machine-readable reason."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # uint8 [height, width, 3] at the model resolution
    width: int  # original width, after the EXIF orientation
    height: int  # original height, after the EXIF orientation


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I;16"):
        img = Image.fromarray((np.asarray(img, dtype=np.uint32) // 257).astype(np.uint8), "L")
    elif img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = arr.max(initial=0)
        scale = 255.0 if img.mode == "F" and peak <= 1.0 else (1 / 257 if peak > 255 else 1.0)
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def to_model_input(img: Image.Image, size: tuple[int, int], resample: int) -> np.ndarray:
    """``img`` as RGB, resized to ``size`` = (height, width): how every image and video frame becomes model input."""
    return np.asarray(_to_rgb(img).resize((size[1], size[0]), resample=resample), dtype=np.uint8)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Read the header only, in an allowed format, and refuse more than ``max_pixels`` before any decoding."""
    try:
        img = Image.open(io.BytesIO(data), formats=decoded_formats())
    except UnidentifiedImageError:
        raise ImageDecodeError(
            "decode", f"not an image in an allowed format ({', '.join(decoded_formats())}); starts with {data[:12]!r}"
        ) from None
    if img.width * img.height > max_pixels:
        raise ImageDecodeError("too_large", f"{img.width}x{img.height} exceeds {max_pixels} pixels")
    return img


def decode_image(
    data: bytes | None,
    size: tuple[int, int],
    resample: int = Image.Resampling.BICUBIC,
    max_pixels: int = 89_478_485,
    draft: bool = True,
) -> DecodedImage:
    """Decode ``data`` and resize it to ``size`` = (height, width); raise :class:`ImageDecodeError` on bad input.

    ``max_pixels`` is checked on the header, before decoding. Pillow's own hard stop (twice
    ``PIL.Image.MAX_IMAGE_PIXELS``) still applies above it.
    """
    if not data:
        raise ImageDecodeError("empty", "zero-byte image")
    try:
        with warnings.catch_warnings():
            # The max_pixels check replaces Pillow's bomb warning; its warnings about odd metadata change nothing.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)
            img = _open(data, max_pixels)
            orientation = img.getexif().get(0x0112, 1)
            swapped = orientation in (5, 6, 7, 8)
            width, height = (img.height, img.width) if swapped else (img.width, img.height)
            target_h, target_w = size
            if draft and img.format == "JPEG":
                img.draft("RGB", (target_w * DRAFT_HEADROOM, target_h * DRAFT_HEADROOM))
            img.seek(0)  # first frame of animations
            img.load()
            img = ImageOps.exif_transpose(img) if orientation != 1 else img
            pixels = to_model_input(img, size, resample)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageDecodeError("too_large", str(err)) from None
    except Exception as err:  # PIL raises many types for corrupt data; all mean "cannot decode"
        raise ImageDecodeError("decode", f"{type(err).__name__}: {err}") from None
    return DecodedImage(pixels, width, height)


def normalize(pixels: np.ndarray, mean: list[float], std: list[float], rescale: float = 1 / 255) -> np.ndarray:
    """uint8 [N, H, W, 3] → float32 [N, 3, H, W], the processor's rescale and normalization."""
    x = pixels.astype(np.float32) * np.float32(rescale)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
