"""Generated text → the typed output fields of one row: answer, detections, masks.

Masks of a whole batch are decoded in one call of the VQ-VAE decoder, then pasted into their boxes in
original-image pixels and stored as COCO RLE. Knows nothing of Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from paligemma_batch.masks import MaskDecoder
from paligemma_batch.rle import encode_rle, paste_mask
from paligemma_batch.parse import ParsedObject, parse_objects
from paligemma_batch.tasks import output_kind


@dataclass(frozen=True)
class Item:
    """One generated output to annotate."""

    task_type: str  # the registry name: caption, detect, segment, ...
    text: str
    width: int  # original image size
    height: int


def _detection(obj: ParsedObject, width: int, height: int) -> dict[str, Any]:
    return {
        "label": obj.label,
        "box_xyxy": list(obj.box_pixels(width, height)),
        "box_norm": list(obj.box_norm),
        "loc_tokens": list(obj.loc_tokens),
    }


def annotate(items: list[Item], decoder: MaskDecoder | None) -> list[dict[str, Any]]:
    """The ``answer``, ``detections``, ``masks`` and ``invalid_objects`` fields for each item."""
    out: list[dict[str, Any]] = []
    pending: list[tuple[dict, ParsedObject, Item]] = []  # masks waiting for the batched decode
    for item in items:
        kind = output_kind(item.task_type)
        fields: dict[str, Any] = {
            "answer": item.text if item.task_type == "answer" else None,
            "detections": None,
            "masks": None,
            "invalid_objects": 0,
        }
        if kind in ("detect", "segment"):
            parsed = parse_objects(item.text)
            fields["invalid_objects"] = parsed.invalid
            fields["detections"] = [_detection(o, item.width, item.height) for o in parsed.objects]
            if kind == "segment":
                fields["masks"] = []
                for obj in parsed.objects:
                    if obj.seg_tokens is None:
                        continue
                    mask = {
                        "label": obj.label,
                        "box_xyxy": list(obj.box_pixels(item.width, item.height)),
                        "seg_tokens": list(obj.seg_tokens),
                        "rle": None,
                        "area": None,
                    }
                    fields["masks"].append(mask)
                    pending.append((mask, obj, item))
        out.append(fields)
    if decoder is not None and pending:
        _decode_masks(pending, decoder)
    return out


def _decode_masks(pending: list[tuple[dict, ParsedObject, Item]], decoder: MaskDecoder) -> None:
    device = next(decoder.parameters()).device
    codes = torch.tensor([obj.seg_tokens for _, obj, _ in pending], dtype=torch.long, device=device)
    with torch.inference_mode():
        masks64 = decoder(codes).float().cpu().numpy()
    for (mask, obj, item), m64 in zip(pending, masks64):
        full = paste_mask(m64, obj.box_pixels(item.width, item.height), item.width, item.height)
        mask["rle"] = encode_rle(full)
        mask["area"] = int(np.count_nonzero(full))
