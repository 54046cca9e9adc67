"""Looking at the results: the end-of-run table, and a static HTML report of sampled images with overlays.

The HTML report is one self-contained file: thumbnails and mask overlays are embedded as data URIs, boxes
and labels are inline SVG, and there is no script. Its layout is fixed (thumbnail frames of ``THUMB`` pixels
at known offsets) so that a screenshot can be checked pixel by pixel.
"""

from __future__ import annotations

import base64
import html
import io
import posixpath
import random
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from paligemma_batch.config import InputConfig, StorageOptions
from paligemma_batch.export import RowObject, row_objects
from paligemma_batch.summary import RunSummary
from paligemma_batch.results import SourceImage, read_results, read_source_images, write_beside

# --- the end-of-run table -------------------------------------------------------------------------------

TOP_ERRORS = 5
ERROR_WIDTH = 100  # characters of an error reason shown in the run table


def _root_of(run_uri: str) -> str:
    """The output root of ``ROOT/runs/RUN_ID``."""
    return posixpath.dirname(posixpath.dirname(run_uri.rstrip("/")))


def _task_rows(summary: RunSummary) -> list[tuple[str, int, int, int]]:
    rows = []
    for task, counts in summary.rows_by_task.items():
        ok, error = counts.get("ok", 0), counts.get("error", 0)
        rows.append((task, ok, error, sum(counts.values())))
    return rows


def _short(text: str, width: int = ERROR_WIDTH) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def inspect_command(run_uri: str) -> str:
    """The ``inspect`` command for a run's output root, quoted so that it can be pasted into a shell."""
    return f"paligemma-batch inspect {shlex.quote(_root_of(run_uri))}"


def run_report_text(summary: RunSummary) -> str:
    """The end-of-run report as plain text: rows by task and status, top errors, throughput, locations."""
    out = summary.output.rstrip("/")
    lines = [
        f"run {summary.run_id} {summary.status}: {summary.inputs_seen} images, "
        f"{summary.rows_written} rows ({summary.rows_ok} ok, "
        f"{summary.rows_error} error) in {summary.wall_time_s} s",
    ]
    task_rows = _task_rows(summary)
    width = max([len("task")] + [len(t) for t, *_ in task_rows])
    lines.append(f"  {'task':<{width}}  {'ok':>8}  {'error':>8}  {'total':>8}")
    lines += [f"  {t:<{width}}  {ok:>8}  {err:>8}  {total:>8}" for t, ok, err, total in task_rows]
    reasons = summary.top_error_reasons
    if reasons:
        lines.append("top errors:")
        lines += [f"  {r['rows']:>8}  {_short(r['error'])}" for r in reasons[:TOP_ERRORS]]
    lines.append(f"throughput: {summary.images_per_second} images/s, "
                 f"{summary.output_tokens_per_second} output tokens/s")
    lines.append(f"output:  {out}/")
    lines.append(f"summary: {out}/_SUMMARY.json")
    lines.append(f"inspect: {inspect_command(out)}")
    return "\n".join(lines)


def print_run_report(summary: RunSummary, file: TextIO | None = None) -> None:
    """Print the end-of-run report: a rich table on a terminal, plain text otherwise."""
    file = file or sys.stdout
    if not file.isatty():
        print(run_report_text(summary), file=file)
        return
    from rich.console import Console
    from rich.table import Table

    # The run id is long: it goes on its own line, so the title fits in 80 columns.
    table = Table(title=f"{summary.inputs_seen} images · {summary.wall_time_s} s", title_justify="left")
    table.add_column("task")
    for name in ("ok", "error", "total"):
        table.add_column(name, justify="right")
    for task, ok, error, total in _task_rows(summary):
        table.add_row(task, str(ok), f"[red]{error}[/red]" if error else "0", str(total))
    table.add_row("all", str(summary.rows_ok), str(summary.rows_error),
                  str(summary.rows_written), style="bold")
    console = Console(file=file)
    console.print(f"[bold]run {summary.run_id}[/bold] {summary.status}", highlight=False)
    console.print(table)
    for r in summary.top_error_reasons[:TOP_ERRORS]:
        console.print(f"  [red]{r['rows']:>6}[/red]  {_short(r['error'])}", highlight=False, markup=True)
    out = summary.output.rstrip("/")
    console.print(f"[bold]{summary.images_per_second}[/bold] images/s · "
                  f"[bold]{summary.output_tokens_per_second}[/bold] output tokens/s")
    console.print(f"output:  {out}/\nsummary: {out}/_SUMMARY.json\ninspect: {inspect_command(out)}",
                  highlight=False, markup=False)


# --- selecting rows -------------------------------------------------------------------------------------

FILTER_COLUMNS = ("image_id", "source_uri", "width", "height", "task", "prompt", "text", "answer",
                  "invalid_objects", "status", "error", "model_id", "precision", "run_id")
OPERATORS = ("!=", "=", "~")  # "!=" before "=": the longer operator wins


@dataclass(frozen=True)
class Where:
    """One ``COLUMN=VALUE`` (equal), ``COLUMN!=VALUE`` or ``COLUMN~TEXT`` (contains) condition."""

    column: str
    op: str
    value: str

    @classmethod
    def parse(cls, expr: str) -> Where:
        for op in OPERATORS:
            column, sep, value = expr.partition(op)
            if sep and column.strip():
                column = column.strip()
                if column not in FILTER_COLUMNS:
                    raise ValueError(f"--where {expr}: unknown column {column!r}; one of {', '.join(FILTER_COLUMNS)}")
                return cls(column, op, value)
        raise ValueError(f"--where {expr}: expected COLUMN=VALUE, COLUMN!=VALUE or COLUMN~TEXT")

    def mask(self, table: pa.Table) -> pa.Array:
        values = pc.fill_null(pc.cast(table[self.column], pa.string()), "")
        if self.op == "~":
            return pc.match_substring(values, self.value)
        equal = pc.equal(values, self.value)
        return pc.invert(equal) if self.op == "!=" else equal


def select_rows(table: pa.Table, task: str | None = None, where: Sequence[Where] = ()) -> pa.Table:
    """The rows of ``task`` (a task name) meeting every condition."""
    if task is not None and table.num_rows and task not in set(table["task"].to_pylist()):
        raise ValueError(f"--task {task}: no such task; tasks: {', '.join(sorted(set(table['task'].to_pylist())))}")
    keep = pa.array(np.ones(table.num_rows, bool))
    if task is not None:
        keep = pc.and_(keep, pc.equal(table["task"], task))
    for condition in where:
        keep = pc.and_(keep, condition.mask(table))
    return table.filter(keep)


def sample_image_ids(table: pa.Table, n: int, seed: int = 0) -> list[str]:
    """Up to ``n`` distinct image ids, drawn with ``seed``, in image-id order."""
    ids = sorted(set(table["image_id"].to_pylist()))
    return sorted(random.Random(seed).sample(ids, n)) if len(ids) > n else ids


# --- the HTML report ------------------------------------------------------------------------------------

THUMB = 256  # thumbnails fit in THUMB x THUMB pixels, drawn at the frame's top-left corner
PAGE_PAD = 16
HEADER_HEIGHT = 72
CARD_PAD = 8
CARD_BORDER = 1
GAP = 16
CARD_WIDTH = THUMB + 2 * CARD_PAD + 2 * CARD_BORDER
FIRST_FRAME = (PAGE_PAD + CARD_BORDER + CARD_PAD, HEADER_HEIGHT + PAGE_PAD + CARD_BORDER + CARD_PAD)
"""Page coordinates of the first card's thumbnail frame; the next card of a row is ``CARD_WIDTH + GAP`` right."""
MASK_ALPHA = 115  # of 255
BOX_STROKE = 2
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324",
           "#808000", "#000075")
THUMB_QUALITY = 88
REPORT_FILE = "report.html"

CSS = f"""
body {{ margin: 0; font: 12px/1.35 system-ui, sans-serif; color: #222; background: #f4f4f4; }}
header {{ box-sizing: border-box; height: {HEADER_HEIGHT}px; overflow: hidden; padding: 10px {PAGE_PAD}px;
  background: #fff; border-bottom: 1px solid #ddd; white-space: nowrap; }}
header h1 {{ font-size: 16px; margin: 0 0 4px; overflow: hidden; text-overflow: ellipsis; }}
header p {{ margin: 0; overflow: hidden; text-overflow: ellipsis; color: #555; }}
main {{ display: grid; grid-template-columns: repeat(auto-fill, {CARD_WIDTH}px); gap: {GAP}px;
  padding: {PAGE_PAD}px; align-items: start; }}
.card {{ box-sizing: border-box; width: {CARD_WIDTH}px; padding: {CARD_PAD}px; border: {CARD_BORDER}px solid #ccc;
  background: #fff; }}
.frame {{ position: relative; width: {THUMB}px; height: {THUMB}px; background: #e8e8e8; overflow: hidden; }}
.frame > img, .frame > svg {{ position: absolute; left: 0; top: 0; display: block; }}
.frame .missing {{ padding: 8px; color: #a00; word-break: break-all; }}
.meta {{ margin: 6px 0 2px; color: #555; word-break: break-all; }}
.row {{ margin-top: 4px; word-break: break-word; max-height: 12em; overflow: auto; }}
.row b {{ color: #000; }}
.row.error {{ color: #b00; }}
details code {{ display: block; white-space: pre-wrap; word-break: break-all; font-size: 11px; color: #444; }}
svg text {{ font: bold 11px sans-serif; paint-order: stroke; stroke: #fff; stroke-width: 3px; }}
"""


@dataclass
class Card:
    """One sampled image: its rows (after filtering) and its source bytes."""

    image_id: str
    rows: list[dict[str, Any]]
    source: SourceImage
    notes: list[str] = field(default_factory=list)


def label_colors(labels: Sequence[str]) -> dict[str, str]:
    """A palette colour per label, assigned in sorted order (the same label gets the same colour everywhere)."""
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(sorted(set(labels)))}


def thumb_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) of the thumbnail: the image scaled to fit THUMB x THUMB, aspect kept."""
    scale = THUMB / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _data_uri(image: Image.Image, fmt: str) -> str:
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": THUMB_QUALITY} if fmt == "JPEG" else {}))
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def _hex_rgb(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


def _mask_overlay(objects: list[RowObject], colors: dict[str, str], size: tuple[int, int]) -> Image.Image | None:
    """One RGBA image of thumbnail size: each mask in its label's colour at MASK_ALPHA, transparent elsewhere."""
    from paligemma_batch.rle import decode_rle

    overlay = np.zeros((size[1], size[0], 4), np.uint8)
    drawn = False
    for obj in objects:
        if obj.rle is None:
            continue
        full = Image.fromarray(decode_rle(obj.rle).astype(np.uint8) * 255)
        inside = np.asarray(full.resize(size, Image.Resampling.BILINEAR)) >= 128
        overlay[inside] = (*_hex_rgb(colors[obj.label]), MASK_ALPHA)
        drawn = True
    return Image.fromarray(overlay, "RGBA") if drawn else None


def _svg_boxes(objects: list[RowObject], colors: dict[str, str], scale: tuple[float, float],
               size: tuple[int, int]) -> str:
    parts = []
    for obj in objects:
        x0, y0, x1, y1 = obj.box_xyxy
        x, y = round(x0 * scale[0]), round(y0 * scale[1])
        w, h = max(1, round(x1 * scale[0]) - x), max(1, round(y1 * scale[1]) - y)
        color, label = colors[obj.label], html.escape(obj.label)
        text_y = y - 4 if y >= 14 else y + 13
        parts.append(
            f'<g><title>{label}</title><rect x="{x}" y="{y}" width="{w}" height="{h}" fill="none" '
            f'stroke="{color}" stroke-width="{BOX_STROKE}" shape-rendering="crispEdges"/>'
            f'<text x="{x + 2}" y="{text_y}" fill="{color}">{label}</text></g>'
        )
    return (f'<svg width="{size[0]}" height="{size[1]}" viewBox="0 0 {size[0]} {size[1]}" '
            f'xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>')


def _sized_row(card: Card) -> dict[str, Any] | None:
    """A row of the card that knows the image's original size (rows of unreadable images do not)."""
    return next((r for r in card.rows if r["width"] is not None), None)


def _is_video(card: Card) -> bool:
    return any(r.get("num_frames") is not None for r in card.rows)


def _video_strip(card: Card, colors: dict[str, str], sized: dict[str, Any]) -> str:
    """A video's annotated frames side by side, each with its own frame rows' boxes and masks.

    The frames are decoded again by uniform sampling over as many frames as the output annotated; a frame
    whose index the output lacks (another sampling config) is shown without overlays.
    """
    from paligemma_batch.video import VideoDecodeError, VideoSampling, decode_clip

    by_frame: dict[int, list[dict[str, Any]]] = {}
    for row in card.rows:
        if row.get("frame_index") is not None:
            by_frame.setdefault(row["frame_index"], []).append(row)
    width, height = sized["width"], sized["height"]
    full = thumb_size(width, height)
    size = (max(1, full[0] // 2), max(1, full[1] // 2))
    count = len(by_frame) or sized["num_frames"] or 1
    try:
        clip = decode_clip(card.source.data, VideoSampling(frames=count), (size[1], size[0]))
    except (VideoDecodeError, ImportError) as err:
        return f'<div class="frame"><div class="missing">video unavailable: {html.escape(str(err))}</div></div>'
    cells = []
    for pixels, index, t in zip(clip.frames, clip.frame_indices, clip.timestamps_s):
        objects = [o for row in by_frame.get(index, []) if row["status"] == "ok" for o in row_objects(row)]
        layers = _layers(pixels, objects, colors, size, (size[0] / width, size[1] / height), f"frame {index}")
        cells.append(f'<div class="frame" title="frame {index} at {t:.2f} s">{layers}</div>')
    return f'<div class="strip" style="display:flex;flex-wrap:wrap;gap:2px">{"".join(cells)}</div>'


def _layers(pixels: np.ndarray, objects: list[RowObject], colors: dict[str, str], size: tuple[int, int],
            scale: tuple[float, float], alt: str = "") -> str:
    """A thumbnail with its mask overlay and boxes (boxes that detect and segment rows agree on are drawn once)."""
    parts = [f'<img class="thumb" width="{size[0]}" height="{size[1]}" alt="{alt}" '
             f'src="{_data_uri(Image.fromarray(pixels), "JPEG")}">']
    overlay = _mask_overlay(objects, colors, size)
    if overlay is not None:
        parts.append(f'<img class="masks" width="{size[0]}" height="{size[1]}" alt="" '
                     f'src="{_data_uri(overlay, "PNG")}">')
    if objects:
        boxes = list({(o.label, o.box_xyxy): o for o in objects}.values())
        parts.append(_svg_boxes(boxes, colors, scale, size))
    return "".join(parts)


def _frame(card: Card, colors: dict[str, str]) -> str:
    sized = _sized_row(card)
    if card.source.data is not None and sized is not None and _is_video(card):
        return _video_strip(card, colors, sized)
    if card.source.data is None or sized is None:
        reason = card.source.error or card.rows[0]["error"] or "no image"
        return f'<div class="frame"><div class="missing">image unavailable: {html.escape(reason)}</div></div>'
    from paligemma_batch.images import ImageDecodeError, decode_image

    width, height = sized["width"], sized["height"]
    size = thumb_size(width, height)
    try:
        decoded = decode_image(card.source.data, (size[1], size[0]))
    except ImageDecodeError as err:
        return f'<div class="frame"><div class="missing">image unavailable: {html.escape(str(err))}</div></div>'
    if (decoded.width, decoded.height) != (width, height):
        card.notes.append(f"source is {decoded.width}x{decoded.height} now, {width}x{height} in the output")
    objects = [o for row in card.rows if row["status"] == "ok" for o in row_objects(row)]
    layers = _layers(decoded.pixels, objects, colors, size, (size[0] / width, size[1] / height))
    return f'<div class="frame">{layers}</div>'


def _row_html(row: dict[str, Any]) -> str:
    frame = f' <small>frame {row["frame_index"]}</small>' if row.get("frame_index") is not None else ""
    task = f'<b title="{html.escape(row["prompt"] or "")}">{html.escape(row["task"])}</b>{frame}'
    if row["status"] != "ok":
        return f'<div class="row error">{task} {html.escape(row["error"] or "error")}</div>'
    if row["detections"] is not None:
        objects = row_objects(row)
        labels = ", ".join(sorted({o.label or "(no label)" for o in objects})) or "nothing found"
        invalid = f", {row['invalid_objects']} invalid" if row["invalid_objects"] else ""
        body = (f"{len(objects)} object(s){invalid}: {html.escape(labels)}"
                f"<details><summary>text</summary><code>{html.escape(row['text'] or '')}</code></details>")
    else:
        body = html.escape(row["answer"] if row["answer"] is not None else row["text"] or "")
    return f'<div class="row ok">{task} {body}</div>'


def _card_html(index: int, card: Card, colors: dict[str, str]) -> str:
    frame = _frame(card, colors)
    sized = _sized_row(card)
    key = card.image_id.rsplit("::", 1)[-1]
    size = f" · {sized['width']}x{sized['height']}" if sized is not None else ""
    notes = "".join(f'<div class="row error">{html.escape(n)}</div>' for n in card.notes)
    rows = "".join(_row_html(r) for r in card.rows)
    return (f'<div class="card" id="card-{index}" data-image-id="{html.escape(card.image_id)}">{frame}'
            f'<div class="meta" title="{html.escape(card.image_id)}">{html.escape(key)}{size}</div>'
            f"{notes}{rows}</div>")


def render_html(cards: list[Card], title: str, subtitle: str) -> str:
    """The whole report page: a fixed header, then one card per image in a grid."""
    labels = [o.label for c in cards for r in c.rows if r["status"] == "ok" for o in row_objects(r)]
    colors = label_colors(labels)
    body = "".join(_card_html(i, c, colors) for i, c in enumerate(cards))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body><header><h1>{html.escape(title)}</h1>"
            f"<p>{html.escape(subtitle)}</p></header><main>{body}</main></body></html>")


def _status_counts(table: pa.Table) -> str:
    counts: dict[str, dict[str, int]] = {}
    for task, status in zip(table["task"].to_pylist(), table["status"].to_pylist()):
        counts.setdefault(task, {}).setdefault(status, 0)
        counts[task][status] += 1
    return "; ".join(f"{t} " + ", ".join(f"{n} {s}" for s, n in sorted(c.items())) for t, c in sorted(counts.items()))


@dataclass(frozen=True)
class ReportResult:
    """Where the report went and what it shows."""

    path: str
    images: int  # cards in the report
    matching_images: int  # images meeting the filters, before sampling
    rows: int  # rows shown


def build_report(
    uri: str,
    sample: int = 48,
    task: str | None = None,
    where: Sequence[str] = (),
    run_id: str | None = None,
    seed: int = 0,
    input_config: InputConfig | None = None,
    storage_options: StorageOptions | None = None,
) -> tuple[str, ReportResult]:
    """The HTML of a report on the output at ``uri`` and what it holds (its ``path`` left empty).

    Reads the light columns of every row to filter and sample, then the full rows of the sampled images
    only, then each sampled image from its shard (``input_config`` or the shard's extension tells how).
    """
    conditions = [Where.parse(w) for w in where]
    light = ["image_id", "source_uri", "task", "status"] + sorted({c.column for c in conditions} - {
        "image_id", "source_uri", "task", "status"})
    every = read_results(uri, run_id, columns=light, storage_options=storage_options)
    matching = select_rows(every, task, conditions)
    sampled = sample_image_ids(matching, sample, seed)
    rows = []
    if sampled:
        full = read_results(uri, run_id, filters=[("image_id", "in", sampled)], storage_options=storage_options)
        rows = select_rows(full, task, conditions).to_pylist()
    rows.sort(key=lambda r: (r["image_id"], r["task"]))
    by_image: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_image.setdefault(row["image_id"], []).append(row)
    sources = read_source_images(((i, r[0]["source_uri"]) for i, r in by_image.items()), input_config,
                                 storage_options if input_config is None else None)
    cards = [Card(i, r, sources[i]) for i, r in by_image.items()]
    matching_images = len(set(matching["image_id"].to_pylist()))
    filters = " and ".join(([f"task={task}"] if task else []) + list(where)) or "none"
    subtitle = (f"{len(cards)} of {matching_images} matching images (seed {seed}) · filters: {filters} · "
                f"all rows: {_status_counts(every)}")
    title = f"paligemma-batch · {uri}" + (f" · run {run_id}" if run_id else "")
    return render_html(cards, title, subtitle), ReportResult("", len(cards), matching_images, len(rows))


def write_report(uri: str, output: str | None = None, **options: Any) -> ReportResult:
    """Build the report (``options`` as in :func:`build_report`) and write it to ``output``.

    The default ``output`` is ``report.html`` in the output root, on whatever filesystem that is.
    """
    page, result = build_report(uri, **options)
    path = write_beside(uri, output, REPORT_FILE, page.encode("utf-8"), options.get("storage_options"))
    return replace(result, path=path)
