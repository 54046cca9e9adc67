"""Masks in original-image pixels: pasting a decoded 64x64 mask into its box, and COCO RLE. No torch."""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
from pycocotools import mask as coco_mask


def paste_mask(
    mask64: np.ndarray, box_xyxy: tuple[float, float, float, float], width: int, height: int
) -> np.ndarray:
    """Place a decoded mask into a ``[height, width]`` bool image of the original size.

    The box (x0, y0, x1, y1, original pixels) is rounded to whole pixels; the 64x64
    values are resized to it with PIL bilinear on float32 (as big_vision does), kept
    where ``> 0`` and cropped to the image. Everything outside the box is False.
    """
    out = np.zeros((height, width), dtype=bool)
    x0, y0, x1, y1 = (math.floor(v + 0.5) for v in box_xyxy)  # round half up
    if x1 <= x0 or y1 <= y0:
        return out
    resized = PIL.Image.fromarray(np.asarray(mask64, np.float32)).resize(
        (x1 - x0, y1 - y0), resample=PIL.Image.BILINEAR
    )
    inside = np.asarray(resized) > 0
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if cx1 > cx0 and cy1 > cy0:
        out[cy0:cy1, cx0:cx1] = inside[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    return out


def encode_rle(mask: np.ndarray) -> dict:
    """COCO RLE of a 2-D mask via pycocotools: ``{"size": [h, w], "counts": str}``."""
    rle = coco_mask.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("utf-8")}


def decode_rle(rle: dict) -> np.ndarray:
    """Decode :func:`encode_rle` output into a bool ``[h, w]`` mask."""
    coco = {"size": list(rle["size"]), "counts": rle["counts"].encode("utf-8")}
    return coco_mask.decode(coco).astype(bool)
