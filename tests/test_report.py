"""The HTML inspect report (rendered in headless Chromium and checked pixel by pixel) and the end-of-run table."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from conftest import job_config
from paligemma_batch import report
from paligemma_batch.cli import app
from paligemma_batch.rle import decode_rle
from paligemma_batch.summary import RunSummary
from paligemma_batch.pipeline import run
from paligemma_batch.results import read_results
from test_results import ERROR_ROW, scene_truth, truth_rows, write_output

WINDOW = (1200, 900)  # 4 cards in the first row
CARD_RE = re.compile(r'<div class="card" id="card-(\d+)" data-image-id="([^"]*)">(.*?)(?=<div class="card" |</main>)')
THUMB_RE = re.compile(r'class="thumb" width="(\d+)" height="(\d+)" alt="" src="data:image/jpeg;base64,([^"]+)"')


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium; installed with apt-get when missing (root only)."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is missing and apt-get cannot install it here (needs root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return shutil.which("chromium")


def screenshot(chromium: str, page: Path, out: Path) -> np.ndarray:
    """The page as Chromium draws it in a WINDOW-sized viewport, RGB int array."""
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1",
         "--force-color-profile=srgb", f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={out}",
         page.resolve().as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    return np.asarray(Image.open(out).convert("RGB")).astype(int)


def cards(page: str) -> list[tuple[str, str]]:
    """(image_id, inner html) of each card, in page order; checks the ids run 0..N-1."""
    found = CARD_RE.findall(page)
    assert [int(i) for i, _, _ in found] == list(range(len(found)))
    return [(image_id, body) for _, image_id, body in found]


def thumbnail(card_html: str) -> np.ndarray:
    width, height, data = THUMB_RE.search(card_html).groups()
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")).astype(int)
    assert pixels.shape == (int(height), int(width), 3)
    return pixels


def frame(shot: np.ndarray, index: int, size: tuple[int, int]) -> np.ndarray:
    """The screenshot pixels of the thumbnail of card ``index`` (first row of the grid)."""
    x = report.FIRST_FRAME[0] + index * (report.CARD_WIDTH + report.GAP)
    y = report.FIRST_FRAME[1]
    return shot[y: y + size[1], x: x + size[0]]


def _rgb(color: str) -> np.ndarray:
    return np.array([int(color[i: i + 2], 16) for i in (1, 3, 5)])


def _coverage(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Fraction of each thumbnail pixel covered by a full-resolution mask."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.resize(size, Image.Resampling.BOX), np.float32) / 255


def test_report_overlays_in_chromium(tmp_path, scene_shards, chromium):
    """Masks are coloured where the mask is, box outlines are at their coordinates, elsewhere the image is intact."""
    out = tmp_path / "out"
    write_output(str(out), truth_rows(scene_shards))
    result = report.write_report(str(out), str(tmp_path / "report.html"), where=[f"source_uri={scene_shards[0]}"])
    assert (result.images, result.matching_images) == (4, 4)
    page = (tmp_path / "report.html").read_text()
    shot = screenshot(chromium, tmp_path / "report.html", tmp_path / "shot.png")
    truth = scene_truth(scene_shards[0])
    colors = report.label_colors([o["shape"] for t in truth.values() for o in t["objects"]])
    alpha = report.MASK_ALPHA / 255
    telling_pixels = 0
    for index, (image_id, body) in enumerate(cards(page)):
        scene = truth[image_id.split("::")[1]]
        thumb = thumbnail(body)
        size = (thumb.shape[1], thumb.shape[0])
        assert size == report.thumb_size(scene["width"], scene["height"])
        shown = frame(shot, index, size)
        scale = size[0] / scene["width"]
        near_lines = np.zeros(thumb.shape[:2], bool)  # box strokes and labels: not mask or image pixels
        union = np.zeros(thumb.shape[:2], np.float32)
        for obj in scene["objects"]:
            x0, y0, x1, y1 = (round(v * scale) for v in obj["box"])
            near_lines[max(y0 - 3, 0): y1 + 4, max(x0 - 3, 0): x1 + 4] = True
            near_lines[y0 + 4: y1 - 3, x0 + 4: x1 - 3] = False
            near_lines[max(y0 - 17, 0): y0 + 17, max(x0 - 2, 0): x0 + 80] = True
            union += _coverage(decode_rle(obj["rle"]), size)
        for obj in scene["objects"]:
            color = _rgb(colors[obj["shape"]])
            # Mask: inside pixels are the thumbnail blended with the label colour.
            inside = (_coverage(decode_rle(obj["rle"]), size) >= 0.999) & ~near_lines
            assert inside.sum() > 30
            blended = thumb[inside] * (1 - alpha) + color * alpha
            error = np.abs(shown[inside] - blended).max(axis=1)
            assert np.median(error) <= 3 and np.percentile(error, 95) <= 12, (image_id, obj)
            telling = np.abs(blended - thumb[inside]).max(axis=1) > 40  # where the overlay clearly changes the image
            if telling.sum() >= 20:
                closer = np.abs(shown[inside] - blended).sum(1) < np.abs(shown[inside] - thumb[inside]).sum(1)
                assert closer[telling].mean() >= 0.95
                telling_pixels += int(telling.sum())
            # Box: the outline runs along each edge at the box's coordinates, in the label's colour.
            x0, y0, x1, y1 = (round(v * scale) for v in obj["box"])
            for x in (x0, x1):
                column = shown[y0 + 17: y1 - 2, max(x - 2, 0): x + 2]
                assert (np.abs(column - color).max(axis=2).min(axis=1) <= 10).mean() >= 0.95, (image_id, obj, x)
            row = shown[max(y1 - 2, 0): y1 + 2, x0 + 2: x1 - 2]
            assert (np.abs(row - color).max(axis=2).min(axis=0) <= 10).mean() >= 0.95, (image_id, obj)
            outside_left = shown[y0 + 17: y1 - 2, x0 - 6] if x0 >= 6 else None
            if outside_left is not None:
                assert (np.abs(outside_left - color).max(axis=1) > 10).mean() >= 0.95
        # Everywhere else the thumbnail shows unchanged.
        plain = (union == 0) & ~near_lines
        assert np.percentile(np.abs(shown[plain] - thumb[plain]).max(axis=1), 95) <= 4, image_id
    assert telling_pixels > 2000
    # The error row is in the page, on the card of its image, as text.
    assert ERROR_ROW in cards(page)[1][1] and 'class="row error"' in cards(page)[1][1]


def test_report_text_and_filters(tmp_path, scene_shards):
    out = tmp_path / "out"
    rows = truth_rows(scene_shards)
    write_output(str(out), rows)
    page, result = report.build_report(str(out), sample=5, seed=3)
    assert result.images == 5 and result.matching_images == 12
    again, _ = report.build_report(str(out), sample=5, seed=3)
    assert again == page  # deterministic for a seed
    assert "src=\"http" not in page and "<script" not in page  # self-contained, no script

    errors, result = report.build_report(str(out), where=["status=error"])
    assert (result.images, result.rows) == (1, 1)
    (image_id, body), = cards(errors)
    assert ERROR_ROW in body and ">caption<" not in body
    assert image_id == next(r["image_id"] for r in rows if r["status"] == "error")

    captions, result = report.build_report(str(out), task="caption", where=["text~red circle"])
    expected = {r["image_id"] for r in rows if r["task"] == "caption" and "red circle" in r["text"]}
    assert {i for i, _ in cards(captions)} == expected and result.rows == len(expected)
    assert all(">detect<" not in body for _, body in cards(captions))

    not_shard0, _ = report.build_report(str(out), where=[f"source_uri!={scene_shards[0]}"])
    assert {i.split("::")[0] for i, _ in cards(not_shard0)} == {str(s) for s in scene_shards[1:]}

    with pytest.raises(ValueError, match="unknown column 'colour'"):
        report.build_report(str(out), where=["colour=red"])
    with pytest.raises(ValueError, match="no such task; tasks: answer, caption, detect, segment"):
        report.build_report(str(out), task="ocr")


def _broken_shard(path: Path) -> Path:
    """A tar with an undecodable image and a member without any image."""
    with tarfile.open(path, "w") as tar:
        for name, data in (("bad.jpg", b"\xff\xd8 not really a jpeg"), ("lonely.txt", b"no image here")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def demo_output(ray_local, tmp_path_factory, tiny_model_dir, vae_npz, scene_shards) -> Path:
    """A real run of the demo's tasks on the scene shards plus a broken shard."""
    out = tmp_path_factory.mktemp("demo") / "output"
    broken = _broken_shard(tmp_path_factory.mktemp("broken") / "broken-00000.tar")
    uris = [str(s) for s in scene_shards] + [str(broken)]
    tasks = [{"task": "caption", "lang": "en"}, {"task": "answer", "lang": "en", "question_key": "json.question"},
             {"task": "detect", "objects": ["circle", "square", "triangle"]},
             {"task": "segment", "objects": ["circle", "square", "triangle"]}]
    config = job_config(tiny_model_dir, uris, str(out), input={"uri": uris, "format": "webdataset"}, tasks=tasks,
                        model={"source": str(tiny_model_dir), "precision": "float32", "max_new_tokens": 16,
                               "mask_decoder": str(vae_npz)})
    summary = run(config)
    assert summary["rows_error"] > 0 and summary["rows_ok"] == 12 * len(tasks)
    return out


def test_inspect_demo_output(demo_output, scene_shards, chromium, tmp_path):
    """The CLI report of a real run: every image, its thumbnail from its shard, its rows, its errors."""
    done = CliRunner().invoke(app, ["inspect", str(demo_output)])
    assert done.exit_code == 0, done.output
    path = demo_output / "report.html"
    assert f"report: {path} (14 of 14 matching images, " in done.output
    page = path.read_text()
    rows = read_results(str(demo_output)).to_pylist()
    by_image: dict[str, list[dict]] = {}
    for r in rows:
        by_image.setdefault(r["image_id"], []).append(r)
    shown = cards(page)
    assert [i for i, _ in shown] == sorted(by_image)
    images = {f"{s}::{k}": v for s in scene_shards for k, v in scene_truth(s).items()}
    for image_id, body in shown:
        for r in by_image[image_id]:
            assert f">{r['task']}<" in body
            if r["status"] == "error":
                assert r["error"].split(":")[0] in body
        if image_id not in images:
            assert "image unavailable" in body and "thumb" not in body
            continue
        thumb = thumbnail(body)
        key = image_id.split("::")[1]
        with tarfile.open(image_id.split("::")[0]) as tar:
            member = next(m for m in tar.getmembers() if m.name.startswith(key + ".") and "json" not in m.name)
            source = Image.open(tar.extractfile(member)).convert("RGB")
        expected = np.asarray(source.resize((thumb.shape[1], thumb.shape[0]), Image.Resampling.BICUBIC)).astype(int)
        assert np.abs(thumb - expected).mean() < 6, image_id

    # Chromium draws the first thumbnail (after the broken shard's two cards) where the layout puts it.
    shot = screenshot(chromium, path, tmp_path / "demo.png")
    first = next(i for i, (image_id, _) in enumerate(shown) if image_id in images)
    assert first < WINDOW[0] // (report.CARD_WIDTH + report.GAP)  # in the first row of the grid
    thumb = thumbnail(shown[first][1])
    drawn = frame(shot, first, (thumb.shape[1], thumb.shape[0]))
    assert (np.abs(drawn - thumb).max(axis=2) <= 4).mean() >= 0.8

    errors = tmp_path / "errors.html"
    done = CliRunner().invoke(app, ["inspect", str(demo_output), "--where", "status=error", "--output", str(errors)])
    assert done.exit_code == 0, done.output
    error_cards = cards(errors.read_text())
    assert {i for i, _ in error_cards} == {r["image_id"] for r in rows if r["status"] == "error"}
    assert all('class="row ok"' not in body for _, body in error_cards)


def test_inspect_s3_output_with_config(s3_bucket, s3_endpoint, scene_shards, tmp_path, tiny_model_dir):
    """Output and shards in a bucket: --config supplies the endpoint and keys; the report lands beside the output."""
    fs, bucket = s3_bucket
    for shard in scene_shards:
        fs.put(str(shard), f"{bucket}/shards/{shard.name}")
    storage = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    config = job_config(tiny_model_dir, f"s3://{bucket}/shards/*.tar", f"s3://{bucket}/out",
                        input={"uri": f"s3://{bucket}/shards/*.tar", "format": "webdataset",
                               "storage_options": storage})
    write_output(f"s3://{bucket}/out", truth_rows(scene_shards, lambda p: f"s3://{bucket}/shards/{p.name}"),
                 storage=config.output_storage)
    config_file = tmp_path / "job.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json") | {"input": {
        "uri": f"s3://{bucket}/shards/*.tar", "format": "webdataset", "storage_options": storage}}))
    done = CliRunner().invoke(app, ["inspect", f"s3://{bucket}/out", "--config", str(config_file), "--sample", "3"])
    assert done.exit_code == 0, done.output
    page = fs.cat(f"{bucket}/out/report.html").decode()
    assert len(cards(page)) == 3 and page.count('class="thumb"') == 3 and "image unavailable" not in page


SUMMARY = RunSummary(**{
    "run_id": "20260101T000000Z-abc123", "status": "finished", "output": "s3://b/out/runs/20260101T000000Z-abc123",
    "inputs_seen": 10, "rows_written": 20, "rows_ok": 17, "rows_error": 3,
    "rows_by_task": {"caption": {"ok": 10}, "detect": {"ok": 7, "error": 3}},
    "top_error_reasons": [{"error": "decode: UnidentifiedImageError: cannot identify image file", "rows": 2},
                          {"error": "read: no image member (found: txt)", "rows": 1}],
    "images_per_second": 12.5, "output_tokens_per_second": 480.2, "wall_time_s": 1.6,
})


def test_run_report_plain_text():
    text = report.run_report_text(SUMMARY)
    lines = text.splitlines()
    assert lines[0] == "run 20260101T000000Z-abc123 finished: 10 images, 20 rows (17 ok, 3 error) in 1.6 s"
    assert re.search(r"^\s+caption\s+10\s+0\s+10$", text, re.M)
    assert re.search(r"^\s+detect\s+7\s+3\s+10$", text, re.M)
    assert re.search(r"^\s+2\s+decode: UnidentifiedImageError: cannot identify image file$", text, re.M)
    assert "throughput: 12.5 images/s, 480.2 output tokens/s" in lines
    assert "output:  s3://b/out/runs/20260101T000000Z-abc123/" in lines
    assert "summary: s3://b/out/runs/20260101T000000Z-abc123/_SUMMARY.json" in lines
    assert "inspect: paligemma-batch inspect s3://b/out" in lines

    piped = io.StringIO()
    report.print_run_report(SUMMARY, piped)
    assert piped.getvalue() == text + "\n"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_run_report_rich_on_a_terminal():
    terminal = _Terminal()
    report.print_run_report(SUMMARY, terminal)
    shown = re.sub(r"\x1b\[[0-9;]*m", "", terminal.getvalue())
    assert "│" in shown or "┃" in shown  # a rich table, not the plain lines
    assert re.search(r"detect\s+│\s+7\s+│\s+3\s+│\s+10", shown)
    assert re.search(r"all\s+│\s+17\s+│\s+3\s+│\s+20", shown)
    assert "decode: UnidentifiedImageError" in shown and "480.2" in shown
    assert "s3://b/out/runs/20260101T000000Z-abc123/_SUMMARY.json" in shown
