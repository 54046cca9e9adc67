"""Score a model end to end: seeded held-out scene shards → the full Ray job → its Parquet, joined to ground truth.

The job is :func:`paligemma_batch.pipeline.run` with four tasks (``caption en``, ``answer`` with the per-image
question of each ``KEY.json``, ``detect`` and ``segment`` of every shape). Output rows join to the ground truth
in each shard's ``KEY.json`` by ``image_id`` (shard URI + ``::`` + member key), read independently of the
job's own reader. Metrics:

- ``caption_exact``: generated caption equals the ground-truth caption;
- ``det_recall50`` / ``det_precision50``: detections and ground-truth objects with the same label are paired
  one to one, highest box IoU first (IoU > 0); a pair with IoU >= 0.5 is a hit;
- ``box_iou``: mean IoU of those pairs, in original-image pixels;
- ``mask_iou``: per ground-truth object, the IoU of the same-label segment mask (pasted in original pixels,
  decoded from its RLE), 0 when there is none, averaged;
- ``vqa_acc``: the answer equals the ground-truth colour.
"""

from __future__ import annotations

import json
import posixpath
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from paligemma_batch.config import (InferenceConfig, InputConfig, JobConfig, ModelConfig, OutputConfig,
                                    PreprocessConfig, RayConfig, StorageOptions, TaskConfig)
from paligemma_batch.fixtures.scenes import SHAPES, write_scene_shards
from paligemma_batch.rle import decode_rle
from paligemma_batch.readers import iter_rows, list_shards
from paligemma_batch.storage import filesystem

FIXTURE_MODEL = Path(__file__).parent / "fixtures" / "assets" / "shapes-paligemma"
HELDOUT_SEED = 20261127  # not a seed the fixture was trained on (training streams are seeded by name)
TASKS = [
    TaskConfig(task="caption", lang="en"),
    TaskConfig(task="answer", lang="en", question_key="json.question"),
    TaskConfig(task="detect", objects=list(SHAPES)),
    TaskConfig(task="segment", objects=list(SHAPES)),
]


@dataclass(frozen=True)
class Metrics:
    caption_exact: float
    det_recall50: float
    det_precision50: float
    box_iou: float
    mask_iou: float
    vqa_acc: float
    images: int

    def table(self) -> str:
        """The metrics as an aligned two-column table."""
        rows = [("metric", "value")] + [(k, f"{v:.4f}" if isinstance(v, float) else str(v))
                                        for k, v in asdict(self).items()]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v:>8}" for k, v in rows)

    def json_line(self) -> str:
        return json.dumps(asdict(self))


def write_heldout(uri: str, images: int, seed: int = HELDOUT_SEED, per_shard: int = 16,
                  storage: StorageOptions | None = None) -> list[str]:
    """Write about ``images`` fresh seeded scenes (whole shards of equal size) into the folder ``uri``.

    ``uri`` is a local folder or an fsspec URI (``s3://bucket/prefix``); returns the shard URIs.
    """
    storage = storage or StorageOptions()
    shards = max(1, -(-images // per_shard))
    fs, root = filesystem(uri, storage)
    with tempfile.TemporaryDirectory() as tmp:
        local = write_scene_shards(tmp, shards=shards, per_shard=-(-images // shards), seed=seed, prefix="heldout")
        fs.makedirs(root, exist_ok=True)
        for path in local:
            fs.put_file(str(path), posixpath.join(root, path.name))
    return list_shards(InputConfig(uri=uri, storage_options=storage))


def read_ground_truth(shards: list[str], storage: StorageOptions) -> dict[str, dict]:
    """``image_id`` → the scene's ``KEY.json`` record, for every sample of every shard."""
    cfg = InputConfig(uri=shards, format="webdataset", storage_options=storage)
    return {row.image_id: json.loads(row.fields["json"]) for uri in shards for row in iter_rows(uri, cfg, ["json"])
            if "json" in row.fields}


def job_config(shards_uri: str | list[str], model: str, mask_decoder: str | None, output_uri: str,
               storage: StorageOptions, batch_size: int = 16) -> JobConfig:
    """The evaluation job: local Ray on 2 CPUs, one half-CPU actor, float32."""
    return JobConfig(
        input=InputConfig(uri=shards_uri, format="webdataset", storage_options=storage),
        tasks=TASKS,
        model=ModelConfig(source=model, precision="float32", max_new_tokens=80, mask_decoder=mask_decoder),
        inference=InferenceConfig(batch_size=batch_size, num_cpus=0.5),
        preprocess=PreprocessConfig(num_cpus=0.5, batch_size=batch_size),
        output=OutputConfig(uri=output_uri),
        ray=RayConfig(num_cpus=2, progress_bars=False),
    )


def _box_iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def _pair(truth: list[dict], predicted: list[dict], iou) -> list[float]:
    """IoUs of one-to-one same-label pairs, highest IoU first, IoU > 0; ``truth`` objects carry a ``shape``."""
    candidates = sorted(((iou(t, p), i, j) for i, t in enumerate(truth) for j, p in enumerate(predicted)
                         if p["label"] == t["shape"]), reverse=True)
    used_t, used_p, ious = set(), set(), []
    for value, i, j in candidates:
        if value > 0 and i not in used_t and j not in used_p:
            used_t.add(i)
            used_p.add(j)
            ious.append(value)
    return ious


def score(table: pa.Table, truth: dict[str, dict]) -> Metrics:
    """Metrics of a run's rows against the ground truth; a missing or error row counts as a miss."""
    rows: dict[tuple[str, str], dict] = {(r["image_id"], r["task"]): r for r in table.to_pylist()
                                         if r["status"] == "ok"}
    caption, vqa, hits, ious, mask_ious = [], [], 0, [], []
    gt_objects = predicted_boxes = 0
    for image_id, gt in truth.items():
        objects = gt["objects"]
        gt_objects += len(objects)
        caption.append(float((rows.get((image_id, "caption")) or {}).get("text") == gt["caption"]))
        answer = (rows.get((image_id, "answer")) or {}).get("answer") or ""
        vqa.append(float(answer.strip().lower() == gt["answer"]))
        detections = (rows.get((image_id, "detect")) or {}).get("detections") or []
        predicted_boxes += len(detections)
        pairs = _pair(objects, detections, lambda t, p: _box_iou(t["box"], p["box_xyxy"]))
        hits += sum(v >= 0.5 for v in pairs)
        ious += pairs
        masks = [{**m, "mask": decode_rle(m["rle"])} for m in (rows.get((image_id, "segment")) or {}).get("masks")
                 or [] if m["rle"] is not None]
        truth_masks = [{**o, "mask": decode_rle(o["rle"])} for o in objects]
        pairs = _pair(truth_masks, masks, lambda t, p: _mask_iou(t["mask"], p["mask"]))
        mask_ious += pairs + [0.0] * (len(objects) - len(pairs))
    return Metrics(
        caption_exact=float(np.mean(caption)) if caption else 0.0,
        det_recall50=hits / gt_objects if gt_objects else 0.0,
        det_precision50=hits / predicted_boxes if predicted_boxes else 0.0,
        box_iou=float(np.mean(ious)) if ious else 0.0,
        mask_iou=float(np.mean(mask_ious)) if mask_ious else 0.0,
        vqa_acc=float(np.mean(vqa)) if vqa else 0.0,
        images=len({image_id for image_id, _ in rows} & set(truth)),
    )


def evaluate(model: str | Path = FIXTURE_MODEL, mask_decoder: str | None = None, shards: str | None = None,
             generate: bool = True, images: int = 64, seed: int = HELDOUT_SEED, output: str | None = None,
             storage: StorageOptions | None = None, batch_size: int = 16) -> Metrics:
    """Run the job on held-out scenes and score it.

    ``shards``: a folder (local or ``s3://``) for the shards, default a temporary folder; with
    ``generate=False`` its existing shards are used as they are. ``mask_decoder`` defaults to the model
    folder's ``vae-oid.npz``. ``output`` must not hold a finished run (default: a temporary folder).
    """
    from paligemma_batch.pipeline import run
    from paligemma_batch.store import OutputStore

    storage = storage or StorageOptions()
    model = str(model)
    if mask_decoder is None and Path(model, "vae-oid.npz").exists():
        mask_decoder = str(Path(model, "vae-oid.npz"))
    with tempfile.TemporaryDirectory(prefix="paligemma-eval-") as tmp:
        shards = shards or str(Path(tmp, "shards"))
        if generate:
            shard_uris = write_heldout(shards, images, seed, storage=storage)
        else:
            shard_uris = list_shards(InputConfig(uri=shards, storage_options=storage))
        output = output or str(Path(tmp, "output"))
        summary = run(job_config(shard_uris, model, mask_decoder, output, storage, batch_size))
        table = OutputStore(output, storage).read_run(summary.run_id)
        return score(table, read_ground_truth(shard_uris, storage))
