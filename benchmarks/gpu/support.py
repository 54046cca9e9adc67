"""Pieces of the GPU check: the results file, section budgets, samplers, inputs and random full-size models.

Nothing here imports torch, transformers or ray at module level, so spawned input writers start fast.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import tarfile
import threading
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PEAK_BF16_TFLOPS = 790.0  # measured on the H200 here: random 8192^3 bf16 matmuls (device KINDS.md)


# ------------------------------------------------------------------------------------------ results


class Results:
    """One JSON line per result in ``out_dir/results.jsonl``, flushed as it is written (a timeout keeps it).

    ``at_s`` counts from ``t0`` (a ``perf_counter`` time, which every process on the machine shares), so the
    lines a section's own process appends to the same file keep the check's clock.
    """

    def __init__(self, out_dir: Path, t0: float | None = None):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "results.jsonl"
        self._file = self.path.open("a")
        self.t0 = time.perf_counter() if t0 is None else t0

    def emit(self, name: str, value, unit: str | None = None, **details) -> None:
        line = {"name": name, "value": _rounded(value), "unit": unit,
                **{k: _rounded(v) for k, v in details.items()}, "at_s": round(time.perf_counter() - self.t0, 1)}
        text = json.dumps(line, default=str)
        self._file.write(text + "\n")
        self._file.flush()
        print("RESULT " + text, flush=True)

    def skipped(self, name: str, reason: str) -> None:
        self.emit(name, None, None, skipped=reason)

    def error(self, name: str, err: BaseException) -> None:
        where = traceback.extract_tb(err.__traceback__)[-3:]
        lines = [line.strip() for line in f"{type(err).__name__}: {err}".splitlines() if line.strip()]
        self.emit(name, None, None, error=lines[0][:300], cause=lines[-1][:500] if len(lines) > 1 else None,
                  where=[f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in where])


def _rounded(value):
    if isinstance(value, float):
        return round(value, 4) if abs(value) < 100 else round(value, 1)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------------------------ budgets


class SectionTimeout(BaseException):
    """A section ran past its time budget (a BaseException, so that per-item ``except Exception`` lets it pass)."""


@contextmanager
def hard_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`SectionTimeout` in the main thread once ``seconds`` have passed."""

    def _expire(signum, frame):
        raise SectionTimeout(f"past its budget of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def wait_unreaped(pid: int, timeout_s: float | None = None) -> bool:
    """Wait until child ``pid`` has exited, without reaping it (its pid, and so its session id, stays taken);
    False if ``timeout_s`` passed first."""
    end = None if timeout_s is None else time.monotonic() + timeout_s
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
        if end is not None and time.monotonic() >= end:
            return False
        time.sleep(0.1)
    return True


def kill_session(sid: int, timeout_s: float = 10.0) -> list[str]:
    """SIGKILL every live process in session ``sid`` until none is left; the names of those killed.

    A child started with ``start_new_session`` leads a session that all it starts keeps, Ray's daemons and
    workers included (the workers take process groups of their own, and rename themselves ``ray::...``).
    Call it while that child is still unreaped, so that no other process can hold ``sid``.
    """
    killed: dict[int, str] = {}
    end = time.monotonic() + timeout_s
    while (alive := _session_members(sid)) and time.monotonic() < end:
        for pid, name in alive.items():
            try:
                os.kill(pid, signal.SIGKILL)
                killed[pid] = name
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    return sorted(killed.values())


def _session_members(sid: int) -> dict[int, str]:
    """The processes of session ``sid`` that are not zombies, pid -> name, read from ``/proc/PID/stat``."""
    members = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone since the listing
            continue
        head, tail = stat.rsplit(")", 1)  # the name may hold spaces and ")"
        state, _ppid, _pgrp, session = tail.split()[:4]
        if int(session) == sid and state not in "ZX":
            members[int(entry.name)] = head.split("(", 1)[1]
    return members


class Deadline:
    """A soft deadline: loops stop adding timed repeats once it has passed."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    @property
    def left(self) -> float:
        return self.end - time.perf_counter()

    def passed(self) -> bool:
        return self.left <= 0


# ------------------------------------------------------------------------------------------ samplers


class GpuSampler:
    """``nvidia-smi`` utilisation and memory every ``interval_ms``, with the time each sample was read."""

    def __init__(self, interval_ms: int = 200):
        self.interval_ms = interval_ms
        self.samples: list[tuple[float, float, float]] = []  # (perf_counter, utilisation %, memory MiB)

    def __enter__(self) -> GpuSampler:
        self._proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
             f"--loop-ms={self.interval_ms}", "--id=0"], stdout=subprocess.PIPE, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            fields = [x.strip() for x in line.split(",")]
            try:
                self.samples.append((time.perf_counter(), float(fields[0]), float(fields[1])))
            except (ValueError, IndexError):  # "[N/A]" and the like
                continue

    def __exit__(self, *exc) -> None:
        self._proc.terminate()
        self._proc.wait()
        self._thread.join(timeout=2)

    def utilisation(self, start: float, end: float) -> tuple[float | None, int]:
        """Mean utilisation of the samples read between two ``perf_counter`` times, and their number."""
        inside = [u for t, u, _ in self.samples if start <= t <= end]
        return (sum(inside) / len(inside) if inside else None), len(inside)

    def busy_window(self) -> tuple[float, float] | None:
        busy = [t for t, u, _ in self.samples if u > 0]
        return (busy[0], busy[-1]) if busy else None

    @property
    def max_memory_mib(self) -> float | None:
        return max((m for _, _, m in self.samples), default=None)


class PartFileWatcher:
    """Watches a job's output for committed part files: when each appeared and how many rows it holds.

    Part files appear whole (atomic rename), so their timeline is the job's committed progress; the rate
    between the first and the last file is the steady state, without actor start and model load.
    """

    def __init__(self, output_root: Path, interval_s: float = 0.1):
        self.output_root = output_root
        self.interval_s = interval_s
        self.seen: dict[Path, tuple[float, int]] = {}  # path -> (perf_counter when seen, rows)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _poll(self) -> None:
        import pyarrow.parquet as pq

        for path in self.output_root.glob("runs/*/part-*.parquet"):
            if path not in self.seen:
                try:
                    self.seen[path] = (time.perf_counter(), pq.read_metadata(path).num_rows)
                except OSError:  # removed between listing and reading (an uncommitted leftover)
                    continue

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._poll()

    def __enter__(self) -> PartFileWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def steady(self, min_files: int = 3, min_window_s: float = 1.0) -> tuple[float, float, float] | None:
        """(rows per second after the first file, time of the first file, time of the last); None when fewer
        than ``min_files`` files came, or all within ``min_window_s`` (a job whose work is all start-up)."""
        timeline = sorted(self.seen.values())
        if len(timeline) < min_files or timeline[-1][0] - timeline[0][0] < min_window_s:
            return None
        rows_after_first = sum(rows for _, rows in timeline[1:])
        return rows_after_first / (timeline[-1][0] - timeline[0][0]), timeline[0][0], timeline[-1][0]


# ------------------------------------------------------------------------------------------ inputs


def _write_jpeg_tar(job: tuple[str, int, int, int, int]) -> int:
    path, seed, count, width, height = job
    rng = np.random.default_rng(seed)
    stem = Path(path).stem
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
            x, y = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
            side = int(rng.integers(height // 6, height // 2))
            ImageDraw.Draw(image).ellipse((x, y, x + side, y + side), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
            buf = io.BytesIO()
            image.save(buf, "JPEG", quality=85)
            info = tarfile.TarInfo(f"{stem}-{i:05d}.jpg")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)
    return count


def write_jpeg_shards(out_dir: Path, images: int, shards: int, width: int = 640, height: int = 480,
                      workers: int | None = None) -> list[Path]:
    """``images`` synthetic ``width``x``height`` JPEGs (smooth colour fields and a disc) in ``shards`` tars,
    written by every core; member keys are unique across the tars."""
    out_dir.mkdir(parents=True, exist_ok=True)
    per_shard = math.ceil(images / shards)
    jobs = [(str(out_dir / f"shard-{s:04d}.tar"), s, min(per_shard, images - s * per_shard), width, height)
            for s in range(shards) if images - s * per_shard > 0]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        written = sum(pool.map(_write_jpeg_tar, jobs))
    assert written == images, (written, images)
    return [Path(j[0]) for j in jobs]


def expected_keys(shards: list[Path]) -> set[str]:
    keys = set()
    for shard in shards:
        with tarfile.open(shard) as tar:
            keys |= {m.name.rsplit(".", 1)[0] for m in tar if m.isfile()}
    return keys


# ------------------------------------------------------------------------------------------ models


def paligemma_3b_224_config():
    """PaliGemma-3B-224: SigLIP-So400m/14 (27 layers, 1152 wide) + Gemma-2B (18 layers, 2048 wide, MQA),
    vocabulary 257216."""
    from transformers import GemmaConfig, PaliGemmaConfig, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                                image_size=224, patch_size=14, projection_dim=2048, vision_use_head=False)
    text = GemmaConfig(vocab_size=257216, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                       num_attention_heads=8, num_key_value_heads=1, head_dim=256, max_position_embeddings=8192,
                       pad_token_id=0, eos_token_id=1, bos_token_id=2, hidden_activation="gelu_pytorch_tanh")
    return PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=4, projection_dim=2048,
                           hidden_size=2048)


def paligemma2_3b_448_config():
    """PaliGemma 2 3B at 448 px: SigLIP-So400m/14 on 1024 patches + Gemma 2 2B (26 layers, 2304 wide, 8 heads,
    4 KV heads, soft-capped attention and logits)."""
    from transformers import Gemma2Config, PaliGemmaConfig, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                                image_size=448, patch_size=14, projection_dim=2304, vision_use_head=False)
    text = Gemma2Config(vocab_size=257216, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                        sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                        query_pre_attn_scalar=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                        hidden_activation="gelu_pytorch_tanh")
    return PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=4, projection_dim=2304,
                           hidden_size=2304)


def build_random(config, device: str, seed: int = 0):
    """A PaliGemma with random bf16 weights allocated and initialised on ``device`` (nothing on the CPU first)."""
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = PaliGemmaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default)
    return model


def prompt_ids(processor, prompt: str) -> list[int]:
    """The ids PaliGemmaProcessor builds for one image and one prompt: <image>xN, <bos>, prompt, newline."""
    text_ids = processor.tokenizer(prompt + "\n", add_special_tokens=False)["input_ids"]
    return [processor.image_token_id] * processor.image_seq_length + [processor.tokenizer.bos_token_id] + text_ids


def prefill_flops(config, prefix_tokens: int) -> float:
    """FLOPs of one image's prefill: the vision tower on its patches, the projector, the decoder over the whole
    prefix (bidirectional: every token attends to all), and the output head on the last position."""
    v, t = config.vision_config, config.text_config
    patches = (v.image_size // v.patch_size) ** 2
    d, m = v.hidden_size, v.intermediate_size
    vision = patches * (2 * 3 * v.patch_size**2 * d + v.num_hidden_layers * (2 * (4 * d * d + 2 * d * m) + 4 * patches * d))
    projector = patches * 2 * d * t.hidden_size
    h, q, kv = t.hidden_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    per_token = t.num_hidden_layers * (2 * (2 * h * q + 2 * h * kv + 3 * h * t.intermediate_size) + 4 * prefix_tokens * q)
    return float(vision + projector + prefix_tokens * per_token + 2 * h * t.vocab_size)
