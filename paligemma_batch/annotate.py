"""Generated text → the typed output fields of one row: answer, detections, masks.

Masks of a whole batch are decoded in one call of the VQ-VAE decoder, then pasted into their boxes in
original-image pixels and stored as COCO RLE. Knows nothing of Ray; imports torch only to decode masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from paligemma_batch.parse import ParsedObject
from paligemma_batch.rle import encode_rle, paste_mask
from paligemma_batch.schema import default_row
from paligemma_batch.tasks import TASKS

if TYPE_CHECKING:
    from paligemma_batch.masks import MaskDecoder

# Every column some task's parser fills, with its value for rows of the tasks that don't fill it.
PARSED_COLUMNS = {c: default_row()[c] for c in sorted({c for spec in TASKS.values() for c in spec.columns})}


@dataclass(frozen=True)
class Item:
    """One generated output to annotate."""

    task_type: str  # the registry name: caption, detect, segment, ...
    text: str
    width: int  # original image size
    height: int


def annotate(items: list[Item], decoder: MaskDecoder | None) -> list[dict[str, Any]]:
    """The parsed columns (answer, detections, masks, invalid_objects) of each item, its task's spec reading it.

    Masks of the whole batch are decoded in one call of the decoder.
    """
    out: list[dict[str, Any]] = []
    pending: list[tuple[dict, ParsedObject, Item]] = []  # masks waiting for the batched decode
    for item in items:
        parsed = TASKS[item.task_type].parse(item.text, item.width, item.height)
        out.append({**PARSED_COLUMNS, **parsed.columns})
        pending += [(mask, obj, item) for mask, obj in parsed.masks]
    if decoder is not None and pending:
        _decode_masks(pending, decoder)
    return out


def _decode_masks(pending: list[tuple[dict, ParsedObject, Item]], decoder: MaskDecoder) -> None:
    import torch

    device = next(decoder.parameters()).device
    codes = torch.tensor([obj.seg_tokens for _, obj, _ in pending], dtype=torch.long, device=device)
    with torch.inference_mode():
        masks64 = decoder(codes).float().cpu().numpy()
    for (mask, obj, item), m64 in zip(pending, masks64):
        full = paste_mask(m64, obj.box_pixels(item.width, item.height), item.width, item.height)
        mask["rle"] = encode_rle(full)
        mask["area"] = int(np.count_nonzero(full))
