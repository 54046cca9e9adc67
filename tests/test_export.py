"""COCO export (loaded by pycocotools, scored by COCOeval against the scene ground truth) and supervision."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from typer.testing import CliRunner

from paligemma_batch.cli import app
from paligemma_batch.config import StorageOptions
from paligemma_batch.export import object_tasks, row_objects, to_coco, to_supervision
from paligemma_batch.fixtures.scenes import SHAPES
from paligemma_batch.rle import decode_rle
from paligemma_batch.results import read_results
from paligemma_batch.schema import ANNOTATIONS
from test_results import scene_truth, truth_rows, write_output


def coco_of(data: dict, tmp_path: Path, name: str) -> COCO:
    """Load through a file, as a user would."""
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return COCO(str(path))


def ground_truth(truth: dict[str, dict], image_ids: dict[str, int]) -> dict:
    """COCO ground truth of the scenes (``image_id`` → KEY.json record); ids follow ``image_ids`` where given."""
    ids = dict(image_ids)
    for image_id in sorted(truth):
        ids.setdefault(image_id, len(ids) + 1)
    images, annotations = [], []
    for image_id, scene in sorted(truth.items()):
        images.append({"id": ids[image_id], "file_name": image_id, "width": scene["width"],
                       "height": scene["height"]})
        for obj in scene["objects"]:
            x0, y0, x1, y1 = obj["box"]
            annotations.append({"id": len(annotations) + 1, "image_id": ids[image_id],
                                "category_id": SHAPES.index(obj["shape"]) + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "segmentation": obj["rle"], "area": float(decode_rle(obj["rle"]).sum()),
                                "iscrowd": 0})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": s} for i, s in enumerate(SHAPES)]}


def all_truth(shards: list[Path]) -> dict[str, dict]:
    return {f"{s}::{k}": v for s in shards for k, v in scene_truth(s).items()}


def evaluate(gt: COCO, dt: COCO, iou_type: str) -> COCOeval:
    run = COCOeval(gt, dt, iou_type)
    run.evaluate()
    run.accumulate()
    run.summarize()
    return run


def pooled_recall50(gt: COCO, dt: COCO) -> float:
    """Ground-truth objects matched at IoU 0.5 over all ground-truth objects, from COCOeval's own matching."""
    run = COCOeval(gt, dt, "bbox")
    run.params.iouThrs = np.array([0.5])
    run.evaluate()
    matched = total = 0
    for result in run.evalImgs:
        if result is None or result["aRng"] != run.params.areaRng[0]:
            continue
        counted = ~np.asarray(result["gtIgnore"], bool)
        total += int(counted.sum())
        matched += int((np.asarray(result["gtMatches"])[0][counted] > 0).sum())
    return matched / total


def test_coco_of_the_ground_truth_scores_perfectly(tmp_path, scene_shards):
    table = pa.Table.from_pylist(truth_rows(scene_shards), schema=ANNOTATIONS)
    assert object_tasks(table) == ["segment"]
    coco = to_coco(table, categories=SHAPES)
    dt = coco_of(coco, tmp_path, "coco.json")
    truth = all_truth(scene_shards)
    assert {i["file_name"]: (i["width"], i["height"]) for i in coco["images"]} == {
        k: (v["width"], v["height"]) for k, v in truth.items()}
    assert len(coco["annotations"]) == sum(len(v["objects"]) for v in truth.values())
    assert all(isinstance(a["segmentation"], dict) for a in coco["annotations"])  # RLE from the masks
    gt = coco_of(ground_truth(truth, {i["file_name"]: i["id"] for i in coco["images"]}), tmp_path, "gt.json")
    for iou_type in ("bbox", "segm"):
        stats = evaluate(gt, dt, iou_type).stats
        assert stats[0] == pytest.approx(1.0) and stats[8] == pytest.approx(1.0), iou_type  # AP, AR@100


def test_coco_fields_boxes_and_categories(scene_shards):
    rows = truth_rows(scene_shards[:1])
    table = pa.Table.from_pylist(rows, schema=ANNOTATIONS)
    boxes = to_coco(table, tasks=["detect"])
    assert [c["name"] for c in boxes["categories"]] == sorted({o["shape"] for t in scene_truth(scene_shards[0])
                                                              .values() for o in t["objects"]})
    first = next(r for r in rows if r["task"] == "detect")
    det = first["detections"][0]
    x0, y0, x1, y1 = det["box_xyxy"]
    ann = boxes["annotations"][0]
    assert boxes["images"][0]["file_name"] == first["image_id"] and ann["image_id"] == 1
    assert ann["bbox"] == [x0, y0, x1 - x0, y1 - y0] and ann["area"] == (x1 - x0) * (y1 - y0)
    assert ann["segmentation"] == [[x0, y0, x1, y0, x1, y1, x0, y1]]  # no mask: the box polygon
    assert boxes["categories"][ann["category_id"] - 1]["name"] == det["label"]
    assert (ann["score"], ann["iscrowd"], ann["task"]) == (1.0, 0, "detect")

    only_circles = to_coco(table, categories=["circle"])
    assert {a["category_id"] for a in only_circles["annotations"]} == {1}
    assert only_circles["info"]["objects_left_out"] == sum(
        o["shape"] != "circle" for t in scene_truth(scene_shards[0]).values() for o in t["objects"])

    failed = [dict(r, status="error", error="decode: x", detections=None, masks=None, width=None, height=None)
              if r["image_id"] == first["image_id"] else r for r in rows]
    without = to_coco(pa.Table.from_pylist(failed, schema=ANNOTATIONS))
    assert first["image_id"] not in {i["file_name"] for i in without["images"]}


def test_row_objects_pairs_masks_with_their_detections():
    box_a, box_b = [1.0, 2.0, 10.0, 12.0], [20.0, 20.0, 30.0, 28.0]
    rle = {"size": [40, 40], "counts": "0"}
    row = {"detections": [{"label": "cat", "box_xyxy": box_a}, {"label": "cat", "box_xyxy": box_b},
                          {"label": "dog", "box_xyxy": box_a}],
           "masks": [{"label": "cat", "box_xyxy": box_b, "rle": rle, "area": 7},
                     {"label": "dog", "box_xyxy": box_a, "rle": None, "area": None}]}
    got = [(o.label, list(o.box_xyxy), o.rle is not None) for o in row_objects(row)]
    assert got == [("cat", box_b, True), ("cat", box_a, False), ("dog", box_a, False)]


def test_export_cli_writes_coco_beside_the_output(tmp_path, scene_shards):
    out = tmp_path / "out"
    write_output(str(out), truth_rows(scene_shards))
    done = CliRunner().invoke(app, ["export", str(out), "--format", "coco"])
    assert done.exit_code == 0, done.output
    coco = COCO(str(out / "coco.json"))
    objects = sum(len(v["objects"]) for v in all_truth(scene_shards).values())
    assert len(coco.getImgIds()) == 12 and len(coco.getAnnIds()) == objects
    assert f"({12} images, 3 categories, {objects} annotations from segment)" in done.output

    target = tmp_path / "exports" / "boxes.json"
    done = CliRunner().invoke(app, ["export", str(out), "--output", str(target), "--task", "detect",
                                    "--categories", "square,circle"])
    assert done.exit_code == 0, done.output
    coco = json.loads(target.read_text())
    assert [c["name"] for c in coco["categories"]] == ["square", "circle"]
    assert {a["task"] for a in coco["annotations"]} == {"detect"}

    assert CliRunner().invoke(app, ["export", str(out), "--format", "yolo"]).exit_code == 2
    done = CliRunner().invoke(app, ["export", str(tmp_path / "none")])
    assert done.exit_code == 2 and "no _RUNS.json" in done.output


def _perturbed(rows: list[dict]) -> list[dict]:
    """Detections with known misses: every 3rd object shifted off its box, every 5th relabelled, one image lost."""
    out, count = [], 0
    lost = next(r["image_id"] for r in rows if r["task"] == "detect")
    for row in copy.deepcopy(rows):
        if row["task"] == "detect":
            if row["image_id"] == lost:
                row.update(status="error", error="engine: lost", detections=None)
            for det in row["detections"] or []:
                count += 1
                if count % 3 == 0:
                    x0, y0, x1, y1 = det["box_xyxy"]
                    shift = (x1 - x0) * 0.6
                    det["box_xyxy"] = [x0 + shift, y0, x1 + shift, y1]
                if count % 5 == 0:
                    det["label"] = next(s for s in SHAPES if s != det["label"])
        out.append(row)
    return out


def test_coco_recall_equals_evaluate_score(tmp_path, scene_shards):
    """COCOeval's matching at IoU 0.5 on the export gives the recall that paligemma_batch.evaluate computes."""
    from paligemma_batch.evaluate import score

    truth = all_truth(scene_shards)
    table = pa.Table.from_pylist(_perturbed(truth_rows(scene_shards)), schema=ANNOTATIONS)
    coco = to_coco(table, tasks=["detect"], categories=SHAPES)
    gt = coco_of(ground_truth(truth, {i["file_name"]: i["id"] for i in coco["images"]}), tmp_path, "gt.json")
    recall = pooled_recall50(gt, coco_of(coco, tmp_path, "dt.json"))
    assert 0.3 < recall < 0.9  # the perturbation really misses objects
    assert recall == pytest.approx(score(table, truth).det_recall50)


def test_coco_recall_equals_evaluate_on_the_fixture_model(tmp_path):
    """On held-out shards, the fixture model's run exported to COCO has the recall `evaluate` reports."""
    from paligemma_batch import evaluate as ev

    if not (ev.FIXTURE_MODEL / "config.json").exists():
        pytest.skip(f"the trained fixture model is not in {ev.FIXTURE_MODEL} yet")
    metrics = ev.evaluate(images=16, shards=str(tmp_path / "shards"), output=str(tmp_path / "out"))
    truth = ev.read_ground_truth(sorted(str(p) for p in (tmp_path / "shards").glob("*.tar")), StorageOptions())
    coco = to_coco(read_results(str(tmp_path / "out")), tasks=["detect"], categories=SHAPES)
    gt = coco_of(ground_truth(truth, {i["file_name"]: i["id"] for i in coco["images"]}), tmp_path, "gt.json")
    assert pooled_recall50(gt, coco_of(coco, tmp_path, "dt.json")) == pytest.approx(metrics.det_recall50)


def test_to_supervision(tmp_path, scene_shards):
    sv = pytest.importorskip("supervision")  # in the test extra; skipped only where it cannot be installed
    rows = truth_rows(scene_shards[:1])
    segment = next(r for r in rows if r["task"] == "segment")
    detections = to_supervision(segment)
    assert isinstance(detections, sv.Detections)
    np.testing.assert_array_equal(detections.xyxy, np.array([d["box_xyxy"] for d in segment["detections"]],
                                                            np.float32))
    assert list(detections.data["class_name"]) == [d["label"] for d in segment["detections"]]
    assert detections.mask.shape == (len(segment["masks"]), segment["height"], segment["width"])
    for mask, expected in zip(detections.mask, segment["masks"]):
        np.testing.assert_array_equal(mask, decode_rle(expected["rle"]))
    assert detections.class_id is None

    named = to_supervision(segment, class_names=["square", "circle"])
    keep = [d["label"] in ("square", "circle") for d in segment["detections"]]
    assert list(named.class_id) == [["square", "circle"].index(d["label"])
                                    for d, k in zip(segment["detections"], keep) if k]
    assert len(named) == sum(keep)

    detect = next(r for r in rows if r["task"] == "detect")
    assert to_supervision(detect).mask is None and len(to_supervision(detect)) == len(detect["detections"])
    caption = next(r for r in rows if r["task"] == "caption")
    assert len(to_supervision(caption)) == 0

    write_output(str(tmp_path), rows)
    frame = read_results(str(tmp_path), as_pandas=True)
    from_pandas = to_supervision(frame[(frame.task == "segment") & (frame.image_id == segment["image_id"])].iloc[0])
    np.testing.assert_array_equal(from_pandas.xyxy, detections.xyxy)
    np.testing.assert_array_equal(from_pandas.mask, detections.mask)


def test_to_supervision_without_supervision(monkeypatch):
    monkeypatch.setitem(sys.modules, "supervision", None)
    with pytest.raises(ImportError, match="pip install supervision to use"):
        to_supervision({"detections": [], "masks": None, "width": 1, "height": 1})
