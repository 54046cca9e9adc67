"""Tokens/s and GPU memory of each precision on the full-size PaliGemma-3B-224 architecture (random weights).

One prepared GPU run (estimated at 3-4 minutes on an H100; not yet run on one): build SigLIP-So400m/14 +
Gemma-2B with random bf16 weights (nothing is downloaded), save them once, then load that folder through the
pipeline's own ``load_model`` in float32, bfloat16, float16, int8 and int4 (nf4) and time ``Engine.generate``
on one fixed batch. Every prompt gets exactly ``--new-tokens`` tokens (``min_new_tokens`` = ``max_new_tokens``),
so every precision does the same work. Rows print as they finish; a JSON line with every figure comes last.

    .venv/bin/python benchmarks/gpu_precision.py            # on a GPU machine
    .venv/bin/python benchmarks/gpu_precision.py --tiny     # checks the script on CPU with the tiny model
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import numpy as np

PRECISIONS = ("float32", "bfloat16", "float16", "int8", "int4")
GIB = 1024**3


def paligemma_3b_224_config(image_token_index: int):
    """PaliGemma-3B-224: SigLIP-So400m/14 (1152 wide, 27 layers) + Gemma-2B (2048 wide, 18 layers, 8 heads,
    1 KV head of 256), vocabulary 257216."""
    from transformers import GemmaConfig, PaliGemmaConfig, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                num_attention_heads=16, image_size=224, patch_size=14, vision_use_head=False)
    text = GemmaConfig(vocab_size=257216, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                       num_attention_heads=8, num_key_value_heads=1, head_dim=256,
                       hidden_activation="gelu_pytorch_tanh", pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return PaliGemmaConfig(vision_config=vision, text_config=text, projection_dim=2048, hidden_size=2048,
                           image_token_index=image_token_index)


def save_random_paligemma_3b(out: Path) -> None:
    """Random bf16 weights built on the GPU, saved with the fixture tokenizer and a 224 px processor."""
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    from paligemma_batch.fixtures.tiny import build_processor, build_tokenizer

    processor = build_processor(build_tokenizer(), image_size=224, patch_size=14)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = PaliGemmaForConditionalGeneration(paligemma_3b_224_config(processor.image_token_id))
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    del model
    torch.cuda.empty_cache()


def measure(model_dir: Path, precision: str, on_gpu: bool, batch: int, new_tokens: int, repeats: int) -> dict:
    """Load ``model_dir`` in ``precision`` and time greedy generation on one fixed batch."""
    import torch

    from paligemma_batch.config import ModelConfig, StorageOptions
    from paligemma_batch.engines.transformers_engine import TransformersEngine, Request, model_input_size, prompt_ids
    from paligemma_batch.model import load_model, load_processor

    cfg = ModelConfig(source=str(model_dir), precision=precision)
    processor = load_processor(cfg, StorageOptions())
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = load_model(cfg, StorageOptions(), num_gpus=1 if on_gpu else 0)
    load_s = time.perf_counter() - t0
    weights = torch.cuda.memory_allocated() if on_gpu else model.get_memory_footprint()
    engine = TransformersEngine(model, processor, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    rng = np.random.default_rng(0)
    height, width = model_input_size(processor)
    pixels = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(batch)]
    requests = [Request(i, prompt_ids(processor, "caption en")) for i in range(batch)]

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    engine.generate(pixels[:2], requests[:2])  # warm-up: kernels, allocator, bitsandbytes state
    sync()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(repeats):
        generated = engine.generate(pixels, requests)
    sync()
    seconds = time.perf_counter() - t0
    tokens = sum(g.num_output_tokens for g in generated) * repeats
    row = {
        "precision": precision,
        "load_s": round(load_s, 1),
        "weights_gib": round(weights / GIB, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 3) if on_gpu else None,
        "tokens_per_s": round(tokens / seconds, 1),
        "images_per_s": round(batch * repeats / seconds, 2),
        "ms_per_batch": round(1000 * seconds / repeats, 1),
        "output_tokens_per_prompt": tokens / repeats / batch,
    }
    del engine, model
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny model on CPU, small batch: checks the script")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--batch", type=int, default=None, help="images per generate (default 32; tiny 4)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per prompt (default 32; tiny 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed generate calls per precision")
    parser.add_argument("--workdir", type=Path, help="where the random checkpoint is saved (default: a temp dir)")
    args = parser.parse_args(argv)

    import torch

    on_gpu = not args.tiny
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny to check the script on CPU")
    batch = args.batch or (4 if args.tiny else 32)
    new_tokens = args.new_tokens or (8 if args.tiny else 32)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pgb-gpu-precision-"))
    model_dir = workdir / ("tiny" if args.tiny else "paligemma-3b-224-random")

    t0 = time.perf_counter()
    if args.tiny:
        from paligemma_batch.fixtures.tiny import build_tiny_paligemma

        build_tiny_paligemma(model_dir)
    else:
        save_random_paligemma_3b(model_dir)
    device = torch.cuda.get_device_name(0) if on_gpu else "cpu"
    print(f"{device}: checkpoint built and saved in {time.perf_counter() - t0:.1f} s; batch {batch} images x "
          f"1 prompt, {new_tokens} new tokens each, {args.repeats} timed calls per precision", flush=True)

    print(f"{'precision':10s} {'load s':>7s} {'weights GiB':>12s} {'peak GiB':>9s} {'tokens/s':>9s} {'img/s':>7s} "
          f"{'ms/batch':>9s}", flush=True)
    rows = []
    for precision in args.precisions.split(","):
        try:
            row = measure(model_dir, precision, on_gpu, batch, new_tokens, args.repeats)
        except Exception as err:  # one precision failing (e.g. bitsandbytes without CUDA kernels) keeps the others
            row = {"precision": precision, "error": f"{type(err).__name__}: {err}".splitlines()[0]}
            print(f"{precision:10s} error: {row['error']}", flush=True)
        else:
            peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
            print(f"{precision:10s} {row['load_s']:7.1f} {row['weights_gib']:12.2f} {peak:>9s} "
                  f"{row['tokens_per_s']:9.1f} {row['images_per_s']:7.2f} {row['ms_per_batch']:9.1f}", flush=True)
        rows.append(row)
    ok = {r["precision"]: r for r in rows if "error" not in r}
    if "float32" in ok:
        for r in ok.values():
            r["tokens_per_s_vs_float32"] = round(r["tokens_per_s"] / ok["float32"]["tokens_per_s"], 2)
            r["weights_vs_float32"] = round(r["weights_gib"] / ok["float32"]["weights_gib"], 3)
    result = {"benchmark": "gpu_precision", "device": device, "tiny": args.tiny, "batch": batch,
              "new_tokens": new_tokens, "repeats": args.repeats, "total_s": round(time.perf_counter() - t0, 1),
              "rows": rows}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
