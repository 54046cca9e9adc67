"""The five precisions on the CPU: each loads as asked, feeds the vision tower in its own dtype, runs the job end
to end, records itself, and is compared with float32 on the same inputs (the figures are printed: run with -s).

A random model's logits are near ties, so bfloat16 and the quantized models often pick another token than
float32 there; the trained shapes fixture, when present, makes the agreement figures meaningful."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import job_config
from paligemma_batch.config import InputConfig, ModelConfig, StorageOptions
from paligemma_batch.engines.transformers_engine import TransformersEngine, Request, model_input_size, prompt_ids
from paligemma_batch.images import decode_image
from paligemma_batch.model import load_model, load_processor
from paligemma_batch.pipeline import run
from paligemma_batch.store import OutputStore
from paligemma_batch.readers import iter_rows

PRECISIONS = ("float32", "bfloat16", "float16", "int8", "int4")
PROMPTS = ("caption en", "detect circle ; square", "answer en what color is the circle?")
TRAINED = Path(__file__).resolve().parents[1] / "paligemma_batch" / "fixtures" / "assets" / "shapes-paligemma"
# Lowest cosine similarity of first-step logits to float32's, under what the random tiny model measured
# (bf16 0.9998, fp16 0.99999, int8 0.9991, int4 0.85). float32 fed another image reaches 0.96 there, so all but
# the int4 bound would catch wrong pixels; nf4 on 64-wide random layers is that coarse.
LOGIT_COSINE_AT_LEAST = {"bfloat16": 0.999, "float16": 0.9999, "int8": 0.99, "int4": 0.7}
# A trained model's choices are not near ties: it must mostly pick float32's first token in every precision.
# Neighbouring <loc> bins are the exception (the fixture learnt Gaussian targets over bins): within
# LOC_BINS_APART they count as agreeing.
TRAINED_FIRST_TOKEN_AT_LEAST = {"bfloat16": 0.9, "float16": 0.9, "int8": 0.9, "int4": 0.75}
LOC_BINS_APART = 2


def _agree(token: int, reference: int, loc0: int) -> bool:
    """The same token, or ``<loc>`` tokens at most ``LOC_BINS_APART`` bins apart."""
    both_loc = all(loc0 <= t < loc0 + 1024 for t in (token, reference))
    return token == reference or (both_loc and abs(token - reference) <= LOC_BINS_APART)


def _model_dirs(tiny_model_dir: Path) -> dict[str, Path]:
    dirs = {"random-tiny": tiny_model_dir}
    if (TRAINED / "model.safetensors").exists():
        dirs["trained-shapes"] = TRAINED
    return dirs


def _scene_pixels(shard: Path, size: tuple[int, int]) -> list[np.ndarray]:
    rows = iter_rows(str(shard), InputConfig(uri=str(shard)))
    return [decode_image(row.data, size).pixels for row in rows]


def _run_precision(model_dir: Path, precision: str, pixels: list[np.ndarray]):
    """Generate for every (prompt, image), prompt-major, and take the first-step logits of each."""
    cfg = ModelConfig(source=str(model_dir), precision=precision)
    processor = load_processor(cfg, StorageOptions())
    model = load_model(cfg, StorageOptions())
    engine = TransformersEngine(model, processor, max_new_tokens=8)
    ids = [prompt_ids(processor, p) for p in PROMPTS]
    generated = engine.generate(pixels, [Request(i, prompt) for prompt in ids for i in range(len(pixels))])
    with torch.inference_mode():  # one forward per prompt over all images: same length, so no padding
        logits = torch.stack([
            model(input_ids=torch.tensor([prompt] * len(pixels)), pixel_values=engine.pixel_values(pixels),
                  token_type_ids=torch.zeros(len(pixels), len(prompt), dtype=torch.long)).logits[:, -1].float()
            for prompt in ids
        ])  # [prompts, images, vocab]
    return model, engine, generated, logits


def _check_loaded_as_asked(model, engine: TransformersEngine, precision: str) -> None:
    import bitsandbytes as bnb

    decoder_linear = model.model.language_model.layers[0].mlp.down_proj
    if precision in ("float32", "bfloat16", "float16"):
        dtype = getattr(torch, precision)
        assert {p.dtype for p in model.parameters()} == {dtype}
        assert type(decoder_linear) is torch.nn.Linear
    elif precision == "int8":
        assert isinstance(decoder_linear, bnb.nn.Linear8bitLt) and decoder_linear.weight.dtype == torch.int8
        dtype = torch.float32
    else:
        assert isinstance(decoder_linear, bnb.nn.Linear4bit)
        assert decoder_linear.weight.quant_type == "nf4" and decoder_linear.compute_dtype == torch.float32
        dtype = torch.float32
    assert type(model.lm_head) is torch.nn.Linear  # the output embedding is never quantized
    assert engine.pixel_dtype == dtype and engine.pixel_values([np.zeros((*model_input_size(engine.processor), 3),
                                                                         np.uint8)]).dtype == dtype
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("which", ["random-tiny", "trained-shapes"])
def test_precisions_agree_with_float32(which, tiny_model_dir, scene_shards):
    model_dir = _model_dirs(tiny_model_dir).get(which)
    if model_dir is None:
        pytest.skip(f"the trained fixture is not at {TRAINED} yet")
    size = model_input_size(load_processor(ModelConfig(source=str(model_dir)), StorageOptions()))
    pixels = [p for shard in scene_shards for p in _scene_pixels(shard, size)]
    results = {p: _run_precision(model_dir, p, pixels) for p in PRECISIONS}
    _, _, reference, reference_logits = results["float32"]
    footprint = {p: results[p][0].get_memory_footprint() for p in PRECISIONS}
    other_image = reference_logits.roll(1, dims=1)  # the same prompt about another image
    unrelated = torch.nn.functional.cosine_similarity(other_image, reference_logits, dim=-1).max().item()
    distinct, empty = len({g.text for g in reference}), sum(not g.text for g in reference)
    print(f"\n{which}: {len(reference)} requests ({len(pixels)} images x {len(PROMPTS)} prompts), vs float32 "
          f"({distinct} distinct texts, {empty} empty); float32 logits for another image reach cosine {unrelated:.5f}")
    loc0 = results["float32"][1].processor.tokenizer.convert_tokens_to_ids("<loc0000>")
    for precision, (model, engine, generated, logits) in results.items():
        _check_loaded_as_asked(model, engine, precision)
        assert len(generated) == len(reference) and all(g.num_output_tokens >= 1 for g in generated)
        first = np.mean([_agree(g.token_ids[0], r.token_ids[0], loc0) for g, r in zip(generated, reference)])
        same = np.mean([g.token_ids == r.token_ids for g, r in zip(generated, reference)])
        cosine = torch.nn.functional.cosine_similarity(logits, reference_logits, dim=-1).min().item()
        top1 = (logits.argmax(-1) == reference_logits.argmax(-1)).float().mean().item()
        print(f"  {precision:9s} first token {first:.2f}  identical text {same:.2f}  logit top-1 {top1:.2f}  "
              f"min logit cosine {cosine:.5f}  memory {footprint[precision] / footprint['float32']:.2f}x")
        if precision != "float32":
            assert cosine >= LOGIT_COSINE_AT_LEAST[precision], (precision, cosine)
            if which == "trained-shapes":
                assert first >= TRAINED_FIRST_TOKEN_AT_LEAST[precision], (precision, first)
    assert footprint["bfloat16"] == footprint["float16"] == pytest.approx(footprint["float32"] / 2, rel=0.01)
    assert footprint["int4"] < footprint["int8"] < footprint["float32"]


@pytest.fixture(scope="module")
def job_rows(ray_local, tmp_path_factory, tiny_model_dir, scene_shards):
    """Run the job once per precision (on demand) on one shard; {precision: (summary, rows, file metadata)}."""
    done: dict[str, tuple[dict, list[dict], dict]] = {}

    def rows_for(precision: str):
        if precision not in done:
            out = tmp_path_factory.mktemp(f"out-{precision}")
            config = job_config(
                tiny_model_dir, str(scene_shards[0]), str(out),
                tasks=[{"task": "caption"}, {"task": "detect", "objects": ["circle", "square"]}],
                model={"source": str(tiny_model_dir), "precision": precision, "max_new_tokens": 6},
            )
            summary = run(config)
            store = OutputStore(str(out), StorageOptions())
            metadata = pq.read_schema(store.data_files(summary["run_id"])[0]).metadata
            done[precision] = summary, store.read_run(summary["run_id"]).to_pylist(), metadata
        return done[precision]

    return rows_for


@pytest.mark.parametrize("precision", PRECISIONS)
def test_job_end_to_end_in_each_precision(precision, job_rows):
    summary, rows, metadata = job_rows(precision)
    assert summary["rows_written"] == 4 * 2 and summary["rows_error"] == 0
    assert summary["model"]["precision"] == precision
    assert metadata[b"paligemma_batch.precision"] == precision.encode()
    assert {r["precision"] for r in rows} == {precision} and {r["status"] for r in rows} == {"ok"}
    assert all(r["num_output_tokens"] >= 1 and r["text"] is not None for r in rows)
    _, reference, _ = job_rows("float32")
    texts = {(r["image_id"], r["task"]): r["text"] for r in reference}
    assert {(r["image_id"], r["task"]) for r in rows} == set(texts)
    same = np.mean([r["text"] == texts[(r["image_id"], r["task"])] for r in rows])
    print(f"\nend to end, {precision}: identical text to float32 on {same:.2f} of {len(rows)} rows")


def test_int4_on_cpu_keeps_unpackable_layers_unquantized(tmp_path, tiny_model_dir, scene_shards):
    """SigLIP-So400m's MLP is 4304 wide, which bitsandbytes' CPU 4-bit kernel can't pack (blocks of 32 outputs,
    64 inputs): such Linears stay unquantized, so a real PaliGemma runs in int4 on the CPU."""
    import bitsandbytes as bnb
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    folder = tmp_path / "siglip-like-mlp"
    shutil.copytree(tiny_model_dir, folder)
    config = PaliGemmaConfig.from_pretrained(folder)
    config.vision_config.intermediate_size = 100  # like 4304: neither a multiple of 32 nor of 64
    torch.manual_seed(0)
    PaliGemmaForConditionalGeneration(config).save_pretrained(folder)

    cfg = ModelConfig(source=str(folder), precision="int4")
    processor, model = load_processor(cfg, StorageOptions()), load_model(cfg, StorageOptions())
    mlp = model.model.vision_tower.encoder.layers[0].mlp
    assert type(mlp.fc1) is torch.nn.Linear and type(mlp.fc2) is torch.nn.Linear
    assert isinstance(model.model.vision_tower.encoder.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert isinstance(model.model.language_model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    pixels = _scene_pixels(scene_shards[0], model_input_size(processor))
    generated = TransformersEngine(model, processor, max_new_tokens=3).generate(
        pixels, [Request(i, prompt_ids(processor, "caption en")) for i in range(len(pixels))])
    assert len(generated) == len(pixels) and all(g.num_output_tokens >= 1 for g in generated)
