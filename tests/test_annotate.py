"""Generated text → typed fields: answers, pixel boxes, masks decoded in one batch and stored as RLE."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from paligemma_batch.annotate import Item, annotate
from paligemma_batch.fixtures.vae import random_vae_arrays
from paligemma_batch.masks import MaskDecoder
from paligemma_batch.rle import decode_rle, paste_mask
from paligemma_batch.schema import ANNOTATIONS


def _loc(*bins: int) -> str:
    return "".join(f"<loc{b:04d}>" for b in bins)


def _seg(*codes: int) -> str:
    return "".join(f"<seg{c:03d}>" for c in codes)


def test_detect_boxes_are_in_original_pixels():
    text = _loc(256, 128, 768, 512) + " red circle ; " + _loc(0, 0, 1023, 1023) + " sky ; " + _loc(5, 5, 5)
    (fields,) = annotate([Item("detect", text, width=500, height=300)], decoder=None)
    first, second = fields["detections"]
    assert first["label"] == "red circle"
    # x scaled by the width (500), y by the height (300); bins divided by 1024.
    assert first["box_xyxy"] == [128 / 1024 * 500, 256 / 1024 * 300, 512 / 1024 * 500, 768 / 1024 * 300]
    assert first["box_norm"] == [0.125, 0.25, 0.5, 0.75]
    assert first["loc_tokens"] == [256, 128, 768, 512]
    assert second["label"] == "sky"
    assert fields["invalid_objects"] == 1 and fields["masks"] is None and fields["answer"] is None


def test_segment_masks_decode_in_one_batch_and_land_in_their_boxes():
    decoder = MaskDecoder.from_arrays(random_vae_arrays(seed=3, embedding_dim=16, channels=32)).eval()
    codes_a, codes_b = list(range(16)), list(range(100, 116))
    items = [
        Item("segment", _loc(100, 200, 600, 900) + _seg(*codes_a) + " cat", width=640, height=360),
        Item("segment", _loc(0, 0, 512, 512) + " no codes ; " + _loc(10, 10, 900, 300) + _seg(*codes_b) + " dog",
             width=200, height=400),
        Item("answer", "blue", width=10, height=10),
    ]
    cat, dog, answer = annotate(items, decoder)
    assert answer["answer"] == "blue"
    assert [m["label"] for m in cat["masks"]] == ["cat"] and [m["label"] for m in dog["masks"]] == ["dog"]
    assert len(dog["detections"]) == 2  # the object without codes is a detection, not a mask
    import torch

    with torch.inference_mode():
        single = decoder(torch.tensor([codes_a])).numpy()[0]
    expected = paste_mask(single, tuple(cat["masks"][0]["box_xyxy"]), 640, 360)
    got = decode_rle(cat["masks"][0]["rle"])
    assert got.shape == (360, 640) and np.array_equal(got, expected)
    assert cat["masks"][0]["area"] == int(expected.sum())
    ys, xs = np.nonzero(got)
    x0, y0, x1, y1 = cat["masks"][0]["box_xyxy"]
    if len(xs):
        assert xs.min() >= np.floor(x0) and xs.max() < np.ceil(x1) and ys.min() >= np.floor(y0) and ys.max() < np.ceil(y1)
    assert cat["masks"][0]["seg_tokens"] == codes_a


def test_without_a_decoder_masks_keep_boxes_and_codes():
    (fields,) = annotate([Item("segment", _loc(1, 2, 300, 400) + _seg(*[7] * 16) + " x", 100, 100)], decoder=None)
    (mask,) = fields["masks"]
    assert mask["rle"] is None and mask["area"] is None and mask["seg_tokens"] == [7] * 16
    assert mask["box_xyxy"] == fields["detections"][0]["box_xyxy"]


def test_fields_fit_the_output_schema():
    decoder = MaskDecoder.from_arrays(random_vae_arrays(seed=0, embedding_dim=16, channels=32)).eval()
    items = [Item("segment", _loc(1, 2, 300, 400) + _seg(*range(16)) + " ünïcode lábel's", 90, 60),
             Item("detect", "", 90, 60), Item("caption", "a cat", 90, 60)]
    base = {f.name: None for f in ANNOTATIONS}
    rows = [{**base, **f} for f in annotate(items, decoder)]
    table = pa.Table.from_pylist(rows, schema=ANNOTATIONS)
    assert table.column("masks")[0].as_py()[0]["label"] == "ünïcode lábel's"
    assert table.column("detections")[1].as_py() == []
