"""Handing the labels on: COCO detection + segmentation JSON, and supervision ``Detections``.

An output row of a detect task holds boxes; a row of a segment task holds the same boxes plus, for each
object that came with mask codes, a mask. Both exports read a row as one list of :class:`RowObject`: a mask
where one was decoded, else the box alone.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from paligemma_batch.config import StorageOptions


@dataclass(frozen=True)
class RowObject:
    """One detected object of an output row, in original-image pixels."""

    label: str
    box_xyxy: tuple[float, float, float, float]
    rle: dict | None  # COCO RLE over the whole image, when a mask was decoded
    mask_area: int | None


def row_objects(row: Mapping[str, Any]) -> list[RowObject]:
    """The objects of one row: each mask with its box, then each detection that has no mask."""
    masks = [m for m in row.get("masks") or [] if m.get("rle") is not None]
    with_mask = Counter((m["label"], tuple(m["box_xyxy"])) for m in masks)
    objects = [RowObject(m["label"], tuple(m["box_xyxy"]), m["rle"], m["area"]) for m in masks]
    for det in row.get("detections") or []:
        key = (det["label"], tuple(det["box_xyxy"]))
        if with_mask[key]:
            with_mask[key] -= 1
            continue
        objects.append(RowObject(det["label"], key[1], None, None))
    return objects


def object_tasks(table: pa.Table) -> list[str]:
    """The tasks to export by default: those that produced masks, else those that produced boxes.

    Taking only one kind avoids counting an object twice when both detect and segment tasks ran on an image.
    """
    tasks = table["task"].to_pylist()
    for column in ("masks", "detections"):
        found = sorted({t for t, v in zip(tasks, table[column].is_valid().to_pylist()) if v})
        if found:
            return found
    return []


def _box_polygon(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


FRAME_COLUMNS = ("frame_index", "timestamp_s")


def coco_file_name(image_id: str, frame_index: int | None) -> str:
    """An image's id, or for a video's frame the video's id and the frame: ``IMAGE_ID#frame=N``."""
    return image_id if frame_index is None else f"{image_id}#frame={frame_index}"


def to_coco(
    table: pa.Table,
    tasks: Sequence[str] | None = None,
    categories: Sequence[str] | None = None,
    file_names: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """COCO JSON (images, categories, annotations) from output rows.

    - images: every image with an ``ok`` row of the exported ``tasks`` (default :func:`object_tasks`), ids
      1..N in ``image_id`` order, ``file_name`` = ``file_names[image_id]`` (the file written by
      :func:`write_source_images`), else the ``image_id``; the ``image_id`` also in ``paligemma_image_id``;
      original ``width``/``height``; a video gives one image per annotated frame, ``file_name`` =
      ``IMAGE_ID#frame=N`` (see :func:`coco_file_name`), with its ``frame_index`` and ``timestamp_s``;
    - categories: ``categories`` in the order given (ids 1..K; objects with other labels are left out and
      counted in ``info.objects_left_out``), or every label found, sorted;
    - annotations: ``bbox`` xywh, ``segmentation`` as RLE where a mask was decoded (else the box polygon),
      ``area`` (mask pixels, else box area), ``iscrowd`` 0 and ``score`` 1.0 (PaliGemma gives no scores),
      plus the ``task`` it came from.
    """
    wanted = set(object_tasks(table) if tasks is None else tasks)
    columns = ["image_id", "width", "height", "task", "status", "detections", "masks",
               *(c for c in FRAME_COLUMNS if c in table.column_names)]
    rows = [{"frame_index": None, "timestamp_s": None, **r} for r in table.select(columns).to_pylist()
            if r["task"] in wanted and r["status"] == "ok"]
    rows.sort(key=lambda r: (r["image_id"], r["frame_index"] is not None, r["frame_index"] or 0, r["task"]))
    objects = [(r, o) for r in rows for o in row_objects(r)]
    names = list(categories) if categories is not None else sorted({o.label for _, o in objects})
    category_ids = {name: i for i, name in enumerate(names, start=1)}
    image_ids: dict[str, int] = {}
    images = []
    for r in rows:
        key = coco_file_name(r["image_id"], r["frame_index"])
        if key not in image_ids:
            image_ids[key] = len(image_ids) + 1
            name = file_names.get(r["image_id"], key) if file_names and r["frame_index"] is None else key
            image = {"id": image_ids[key], "file_name": name, "paligemma_image_id": r["image_id"],
                     "width": r["width"], "height": r["height"]}
            if r["frame_index"] is not None:
                image.update(frame_index=r["frame_index"], timestamp_s=r["timestamp_s"])
            images.append(image)
    annotations = []
    for r, o in objects:
        if o.label not in category_ids:
            continue
        x0, y0, x1, y1 = (float(v) for v in o.box_xyxy)
        annotations.append({
            "id": len(annotations) + 1,
            "image_id": image_ids[coco_file_name(r["image_id"], r["frame_index"])],
            "category_id": category_ids[o.label],
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "segmentation": dict(o.rle) if o.rle is not None else _box_polygon(x0, y0, x1, y1),
            "area": float(o.mask_area if o.mask_area is not None else (x1 - x0) * (y1 - y0)),
            "iscrowd": 0,
            "score": 1.0,
            "task": r["task"],
        })
    return {
        "info": {"description": "paligemma-batch export", "tasks": sorted(wanted),
                 "objects_left_out": len(objects) - len(annotations)},
        "images": images,
        "categories": [{"id": i, "name": n, "supercategory": ""} for n, i in category_ids.items()],
        "annotations": annotations,
    }


def to_supervision(row: Mapping[str, Any], class_names: Sequence[str] | None = None):
    """A ``supervision.Detections`` for one output row (a dict from ``Table.to_pylist()`` or a DataFrame row).

    ``xyxy`` holds the boxes in original pixels, ``data["class_name"]`` the labels, and ``mask`` a bool
    ``[N, height, width]`` array when the row has decoded masks (objects without one get their filled box).
    With ``class_names``, ``class_id`` is each label's index there and objects with other labels are left out.
    """
    try:
        import supervision as sv
    except ImportError:
        raise ImportError("pip install supervision to use paligemma_batch.export.to_supervision") from None
    from paligemma_batch.rle import decode_rle

    objects = row_objects(row)
    if class_names is not None:
        objects = [o for o in objects if o.label in class_names]
    xyxy = np.array([o.box_xyxy for o in objects], np.float32).reshape(-1, 4)
    mask = None
    if any(o.rle is not None for o in objects):
        height, width = int(row["height"]), int(row["width"])
        mask = np.zeros((len(objects), height, width), bool)
        for i, o in enumerate(objects):
            if o.rle is not None:
                mask[i] = decode_rle(o.rle)
            else:
                x0, y0, x1, y1 = (int(round(v)) for v in o.box_xyxy)
                mask[i, max(y0, 0):y1, max(x0, 0):x1] = True
    class_id = None if class_names is None else np.array([list(class_names).index(o.label) for o in objects], int)
    return sv.Detections(xyxy=xyxy, mask=mask, class_id=class_id,
                         data={"class_name": np.array([o.label for o in objects], dtype=str)})


COCO_FILE = "coco.json"
# File extensions of written source images, for the formats whose first registered one is not the usual one.
USUAL_EXTS = {"JPEG": ".jpg", "TIFF": ".tif", "JPEG2000": ".jp2", "PNG": ".png"}


def image_file_name(number: int, data: bytes) -> str:
    """``000001.jpg``: the COCO image id, and the extension of the format the bytes' header names."""
    import io

    from PIL import Image

    try:
        fmt = Image.open(io.BytesIO(data)).format
    except Exception:  # not an image Pillow knows: the bytes are still written, without an extension
        fmt = None
    ext = USUAL_EXTS.get(fmt) or next((e for e, f in Image.registered_extensions().items() if f == fmt), "")
    return f"{number:06d}{ext}"


def write_source_images(
    table: pa.Table,
    directory: str,
    input_config: Any | None = None,
    storage_options: StorageOptions | None = None,
) -> tuple[dict[str, str], list[str]]:
    """Write the source image of every ``ok`` row's image to ``directory`` (local or fsspec), read back through the
    readers; the file name of each image (``image_id`` -> name) and the ids whose source could not be read."""
    from paligemma_batch.results import read_source_images
    from paligemma_batch.storage import write_uri

    rows = table.select(["image_id", "source_uri", "status"]).to_pylist()
    pairs = sorted({(r["image_id"], r["source_uri"]) for r in rows if r["status"] == "ok"})
    sources = read_source_images(pairs, input_config, storage_options)
    names, missing = {}, []
    for number, (image_id, _) in enumerate(pairs, start=1):
        source = sources.get(image_id)
        if source is None or source.data is None:
            missing.append(image_id)
            continue
        names[image_id] = image_file_name(number, source.data)
        write_uri(f"{directory.rstrip('/')}/{names[image_id]}", source.data, storage_options)
    return names, missing


def write_coco(
    uri: str,
    output: str | None = None,
    tasks: Sequence[str] | None = None,
    categories: Sequence[str] | None = None,
    run_id: str | None = None,
    storage_options: StorageOptions | None = None,
    images_dir: str | None = None,
    input_config: Any | None = None,
) -> tuple[str, dict[str, Any]]:
    """Export the output at ``uri`` as COCO JSON to ``output`` (default ``coco.json`` in the output root).

    With ``images_dir``, the source images are written there too (read back through the readers, with
    ``input_config``'s options when given), and each ``file_name`` is the written file's name, so a COCO tool
    opens them with ``images_dir`` as its image folder. Returns the path written and the COCO dict.
    """
    from paligemma_batch.results import read_results, write_beside

    columns = ["image_id", "source_uri", "width", "height", "task", "status", "detections", "masks", *FRAME_COLUMNS]
    table = read_results(uri, run_id, columns=columns, storage_options=storage_options)
    names, missing = None, []
    if images_dir is not None:
        exported = set(object_tasks(table) if tasks is None else tasks)
        table = table.filter(pa.array([t in exported for t in table["task"].to_pylist()], pa.bool_()))
        names, missing = write_source_images(table, images_dir, input_config, storage_options)
    coco = to_coco(table, tasks, categories, names)
    if images_dir is not None:
        coco["info"]["images_dir"] = images_dir
        coco["info"]["images_unreadable"] = missing
    path = write_beside(uri, output, COCO_FILE, json.dumps(coco).encode(), storage_options)
    return path, coco
