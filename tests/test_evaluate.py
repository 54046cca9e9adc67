"""The evaluation: its scorer on hand-made rows, and the shipped shapes fixture scored through the Ray job."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from paligemma_batch.config import StorageOptions
from paligemma_batch.evaluate import evaluate, read_ground_truth, score, write_heldout
from paligemma_batch.rle import decode_rle, encode_rle
from paligemma_batch.schema import ANNOTATIONS

IMAGES = 32
# What the fixture reaches on the 32 default held-out scenes (see its CARD.md), less a margin. An x/y swap,
# boxes scaled to the model's square input, or rows joined to the wrong image fall far below these.
FLOORS = {"caption_exact": 0.84, "det_recall50": 0.79, "det_precision50": 0.77, "box_iou": 0.70, "mask_iou": 0.66,
          "vqa_acc": 0.9}


def _rows(truth: dict[str, dict], swap_xy: bool = False, shift_masks: bool = False) -> pa.Table:
    """Output rows that repeat the ground truth, optionally with x/y swapped boxes or shifted masks."""
    rows = []
    for image_id, gt in truth.items():
        detections, masks = [], []
        for obj in gt["objects"]:
            x0, y0, x1, y1 = obj["box"]
            box = [y0, x0, y1, x1] if swap_xy else [x0, y0, x1, y1]
            detections.append({"label": obj["shape"], "box_xyxy": box, "box_norm": [0.0] * 4, "loc_tokens": [0] * 4})
            mask = decode_rle(obj["rle"])
            mask = np.roll(mask, gt["width"] // 2, axis=1) if shift_masks else mask
            masks.append({"label": obj["shape"], "box_xyxy": box, "seg_tokens": [0] * 16, "rle": encode_rle(mask),
                          "area": int(mask.sum())})
        base = {"image_id": image_id, "status": "ok"}
        rows += [{**base, "task": "caption", "text": gt["caption"]},
                 {**base, "task": "answer", "answer": gt["answer"]},
                 {**base, "task": "detect", "detections": detections},
                 {**base, "task": "segment", "masks": masks}]
    return pa.Table.from_pylist(rows, schema=ANNOTATIONS)


def test_score_rewards_the_truth_and_catches_swaps_shifts_and_errors(tmp_path):
    shards = write_heldout(str(tmp_path / "shards"), images=12, per_shard=6)
    truth = read_ground_truth(shards, StorageOptions())
    assert len(truth) == 12 and all("::" in image_id for image_id in truth)

    perfect = score(_rows(truth), truth)
    assert perfect.images == 12
    assert (perfect.caption_exact, perfect.vqa_acc, perfect.det_recall50, perfect.det_precision50) == (1, 1, 1, 1)
    assert perfect.box_iou == 1.0 and perfect.mask_iou == 1.0

    swapped = score(_rows(truth, swap_xy=True, shift_masks=True), truth)
    assert swapped.det_recall50 < 0.6 and swapped.box_iou < 0.7 and swapped.mask_iou < 0.5
    assert swapped.caption_exact == 1.0  # text rows are untouched

    errors = _rows(truth).to_pylist()
    for row in errors:
        if row["task"] == "caption":
            row["status"], row["error"] = "error", "decode: broken"
    failed = score(pa.Table.from_pylist(errors, schema=ANNOTATIONS), truth)
    assert failed.caption_exact == 0.0 and failed.vqa_acc == 1.0


def test_shapes_fixture_through_the_ray_job(ray_local, s3_endpoint, s3_bucket, tmp_path):
    """Fresh held-out shards on S3 → pipeline.run (local Ray, 2 CPUs) → Parquet joined to KEY.json ground truth."""
    _, bucket = s3_bucket
    storage = StorageOptions(endpoint_url=s3_endpoint, key="testing", secret="testing")
    metrics = evaluate(shards=f"s3://{bucket}/heldout", images=IMAGES, output=str(tmp_path / "output"),
                       storage=storage)
    assert metrics.images == IMAGES
    below = {k: (round(getattr(metrics, k), 3), floor) for k, floor in FLOORS.items() if getattr(metrics, k) < floor}
    assert not below, f"below the floors (value, floor): {below}; all: {metrics}"
