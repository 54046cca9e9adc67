"""The explicit pyarrow schema of the output table; never inferred from the first rows."""

from __future__ import annotations

import pyarrow as pa

from paligemma_batch.parse import LOC_BINS

BOX = pa.list_(pa.float32(), 4)

DETECTION = pa.struct(
    [
        ("label", pa.string()),
        ("box_xyxy", BOX),  # x0, y0, x1, y1 in original-image pixels
        ("box_norm", BOX),  # x0, y0, x1, y1 in [0, 1]
        ("loc_tokens", pa.list_(pa.int16(), 4)),  # ymin, xmin, ymax, xmax bins as emitted
    ]
)

RLE = pa.struct([("size", pa.list_(pa.int32(), 2)), ("counts", pa.string())])

MASK = pa.struct(
    [
        ("label", pa.string()),
        ("box_xyxy", BOX),
        ("seg_tokens", pa.list_(pa.int16(), 16)),
        ("rle", RLE),  # COCO RLE over the original image; null when no mask decoder is configured
        ("area", pa.int64()),  # mask pixels; null without a decoder
    ]
)

COUNTER = {b"default": b"0"}  # field metadata: the column's value before anything is counted


def _counter(name: str) -> pa.Field:
    return pa.field(name, pa.int32(), metadata=COUNTER)


ANNOTATIONS = pa.schema(
    [
        ("image_id", pa.string()),  # stable source key: shard URI + "::" + member key (or the file URI)
        ("source_uri", pa.string()),  # the shard or file the image came from
        ("width", pa.int32()),  # original width after EXIF orientation
        ("height", pa.int32()),
        ("task", pa.string()),  # the task's name in the config
        ("prompt", pa.string()),
        ("text", pa.string()),  # the raw generated text, <loc>/<seg> tokens included
        ("answer", pa.string()),  # answer tasks: the answer text
        ("detections", pa.list_(DETECTION)),
        ("masks", pa.list_(MASK)),
        _counter("invalid_objects"),  # objects in the text that failed validation
        ("status", pa.string()),  # "ok" or "error"
        ("error", pa.string()),  # "kind: message" when status is "error"
        ("model_id", pa.string()),
        ("model_revision", pa.string()),
        ("precision", pa.string()),
        _counter("num_input_tokens"),
        _counter("num_output_tokens"),
        ("run_id", pa.string()),
        ("frame_index", pa.int32()),  # videos: the frame's index in the video (per: frame rows); null for images and clip rows
        ("timestamp_s", pa.float64()),  # videos: the frame's time, seconds from the first frame; null for images and clip rows
        ("num_frames", pa.int32()),  # videos: frames sampled from the video; null for images
    ]
)

def default_row() -> dict:
    """An output row before anything is filled in: counters 0, every other column null."""
    return {f.name: 0 if (f.metadata or {}).get(b"default") == b"0" else None for f in ANNOTATIONS}


FILE_METADATA = {
    b"paligemma_batch.loc_bins": str(LOC_BINS).encode(),
    b"paligemma_batch.box_convention": b"box = bin / loc_bins * original size; x by width, y by height",
}


def with_metadata(extra: dict[str, str]) -> pa.Schema:
    """The annotations schema carrying the file metadata plus ``extra`` key/values."""
    meta = dict(FILE_METADATA)
    meta.update({f"paligemma_batch.{k}".encode(): v.encode() for k, v in extra.items()})
    return ANNOTATIONS.with_metadata(meta)
