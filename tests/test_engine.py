"""The engine against the processor and ``model.generate``: same inputs, same tokens, batched or not."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from paligemma_batch.engines.base import rows_that_fit, sub_batches
from paligemma_batch.engines.transformers_engine import TransformersEngine, Request, left_pad, model_input_size, prompt_ids
from paligemma_batch.images import decode_image

# Prompts of different lengths, so left padding is exercised.
PROMPTS = ["caption en", "detect circle ; square ; triangle", "answer en what color is the big shape on the left?",
           "ocr"]


def _png(seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(coarse).resize(size, Image.Resampling.BILINEAR).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def images(loaded) -> list[bytes]:
    return [_png(seed, size) for seed, size in enumerate([(90, 130), (64, 64), (300, 120)])]


def _pixels(processor, data: bytes) -> np.ndarray:
    return decode_image(data, model_input_size(processor), processor.image_processor.resample, draft=False).pixels


def test_prompt_ids_and_pixel_values_match_the_processor(loaded, images):
    model, processor = loaded
    engine = TransformersEngine(model, processor, max_new_tokens=4)
    for data in images:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        for prompt in PROMPTS:
            expected = processor(text=prompt, images=image, return_tensors="pt")
            assert prompt_ids(processor, prompt) == expected["input_ids"][0].tolist()
        ours = engine.pixel_values([_pixels(processor, data)])
        torch.testing.assert_close(ours, expected["pixel_values"], atol=1e-6, rtol=0)


def test_left_pad_aligns_sequences_on_the_right():
    ids, attention = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert attention.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_batched_generation_equals_batch_size_one_token_for_token(loaded, images):
    model, processor = loaded
    engine = TransformersEngine(model, processor, max_new_tokens=12)
    pixels = [_pixels(processor, data) for data in images]
    requests = [Request(i, prompt_ids(processor, p)) for i in range(len(pixels)) for p in PROMPTS]
    batched = engine.generate(pixels, requests)
    single = [engine.generate([pixels[r.image_index]], [Request(0, r.input_ids)])[0] for r in requests]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert [g.text for g in batched] == [g.text for g in single]
    # A random model's rows differ from one another, so the comparison above is not between constants.
    assert len({tuple(g.token_ids) for g in batched}) > len(requests) // 2


def test_vision_once_equals_plain_generate_on_processor_inputs(loaded, images):
    model, processor = loaded
    engine = TransformersEngine(model, processor, max_new_tokens=12)
    pairs = [(i, p) for i in range(len(images)) for p in PROMPTS]
    ours = engine.generate([_pixels(processor, data) for data in images],
                           [Request(i, prompt_ids(processor, p)) for i, p in pairs])
    for (i, prompt), got in zip(pairs, ours):
        image = Image.open(io.BytesIO(images[i])).convert("RGB")
        inputs = processor(text=prompt, images=image, return_tensors="pt")
        inputs.pop("labels", None)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        assert got.token_ids == out[0, inputs["input_ids"].shape[1]:].tolist()
        assert got.num_input_tokens == inputs["input_ids"].shape[1]


def test_generate_from_features_on_any_subset_matches_the_whole_batch(loaded, images):
    model, processor = loaded
    engine = TransformersEngine(model, processor, max_new_tokens=10)
    pixels = [_pixels(processor, data) for data in images]
    requests = [Request(i, prompt_ids(processor, p)) for i in range(len(pixels)) for p in PROMPTS]
    features = engine.image_features(pixels)
    before = features.clone()
    whole = engine.generate(pixels, requests)
    short, long = requests[::2], requests[1::2]
    parts = engine.generate_from_features(features, long) + engine.generate_from_features(features, short)
    by_request = {id(r): g for r, g in zip(long + short, parts)}
    assert [by_request[id(r)].token_ids for r in requests] == [g.token_ids for g in whole]
    torch.testing.assert_close(features, before, atol=0, rtol=0)


def test_min_new_tokens_forces_the_length(loaded, images):
    model, processor = loaded
    eos = processor.tokenizer.eos_token_id

    def eos_first(module, inputs, logits):  # make end-of-sequence the likeliest token at every step
        logits = logits.clone()
        logits[..., eos] = logits.max() + 100.0
        return logits

    pixels, request = [_pixels(processor, images[0])], [Request(0, prompt_ids(processor, "caption en"))]
    hook = model.lm_head.register_forward_hook(eos_first)
    try:
        free = TransformersEngine(model, processor, max_new_tokens=9).generate(pixels, request)
        forced = TransformersEngine(model, processor, max_new_tokens=9, min_new_tokens=9).generate(pixels, request)
    finally:
        hook.remove()
    assert free[0].token_ids == [eos] and free[0].num_output_tokens == 1
    assert forced[0].num_output_tokens == 9 and eos not in forced[0].token_ids


def test_static_cache_gives_the_same_tokens(loaded, images):
    model, processor = loaded
    pixels = [_pixels(processor, data) for data in images]
    requests = [Request(i, prompt_ids(processor, p)) for i in range(len(pixels)) for p in PROMPTS[:2]]
    dynamic = TransformersEngine(model, processor, max_new_tokens=8).generate(pixels, requests)
    static = TransformersEngine(model, processor, max_new_tokens=8, cache_implementation="static").generate(pixels, requests)
    assert [g.token_ids for g in static] == [g.token_ids for g in dynamic]


def test_no_requests_generate_nothing(loaded):
    model, processor = loaded
    assert TransformersEngine(model, processor, max_new_tokens=4).generate([], []) == []


def test_pixels_normalized_on_the_device_equal_the_processors_normalization(loaded, images):
    from paligemma_batch.images import normalize

    model, processor = loaded
    engine = TransformersEngine(model, processor, max_new_tokens=4)
    pixels = [_pixels(processor, data) for data in images[:2]]
    ip = processor.image_processor
    expected = torch.from_numpy(normalize(np.stack(pixels), ip.image_mean, ip.image_std, ip.rescale_factor))
    assert torch.equal(engine.pixel_values(pixels), expected)


def _mixed_batch(which, loaded, images, scene_shards):
    """(model, processor, pixels, prompts) of a mixed-task batch: the random tiny model, or the shipped fixture."""
    from paligemma_batch.config import InputConfig
    from paligemma_batch.fixtures.demo import SHAPES_MODEL
    from paligemma_batch.readers import iter_rows

    model, processor = loaded
    data = images
    if which == "shapes fixture":
        from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

        processor = AutoProcessor.from_pretrained(SHAPES_MODEL)
        model = PaliGemmaForConditionalGeneration.from_pretrained(SHAPES_MODEL, dtype=torch.float32).eval()
        shard = str(scene_shards[0])
        data = [row.data for row in iter_rows(shard, InputConfig(uri=shard))][:3]
    prompts = PROMPTS if which == "tiny" else ["caption en", "detect circle ; square ; triangle",
                                               "segment circle", "answer en what color is the shape?"]
    return model, processor, [_pixels(processor, d) for d in data], prompts


@pytest.mark.parametrize("which", ["tiny", "shapes fixture"])
def test_static_kv_cache_gives_the_same_tokens_as_the_dynamic_cache(which, loaded, images, scene_shards):
    """The static cache (the CUDA default) must not change greedy output over a mixed-task batch (fp32)."""
    model, processor, pixels, prompts = _mixed_batch(which, loaded, images, scene_shards)
    requests = [Request(i % len(pixels), prompt_ids(processor, p)) for i, p in enumerate(prompts * 2)]
    dynamic = TransformersEngine(model, processor, max_new_tokens=24).generate(pixels, requests)
    static = TransformersEngine(model, processor, max_new_tokens=24, cache_implementation="static").generate(
        pixels, requests)
    assert sum(g.num_output_tokens for g in dynamic) > 2 * len(requests)
    assert [g.token_ids for g in static] == [g.token_ids for g in dynamic]


def test_sub_batches_keep_one_kind_and_limit_each_in_order():
    requests = [Request(0, [1], kind="caption"), Request(0, [1], max_new_tokens=3, kind="answer"),
                Request(1, [1], kind="caption"), Request(1, [1], max_new_tokens=3, kind="answer"),
                Request(2, [1], kind="caption"), Request(2, [1], max_new_tokens=5, kind="answer")]
    assert sub_batches(requests) == [[0, 2, 4], [1, 3], [5]]
    assert sub_batches(requests, max_rows=2) == [[0, 2], [4], [1, 3], [5]]
    assert sub_batches([]) == []


def test_rows_that_fit_the_free_memory():
    assert rows_that_fit(free_bytes=100 << 30, bytes_per_row=200 << 20) == 435  # 85% of 100 GiB at 200 MiB
    assert rows_that_fit(free_bytes=1 << 20, bytes_per_row=1 << 30) == 1
    assert rows_that_fit(free_bytes=1 << 40, bytes_per_row=1, most=512) == 512


@pytest.mark.parametrize("which", ["tiny", "shapes fixture"])
def test_each_kind_stops_at_its_own_limit_with_the_tokens_of_batch_size_one(which, loaded, images, scene_shards):
    """Mixed tasks in one batch, each task its own sub-batch and limit (fp32): every request's tokens equal
    plain ``model.generate`` on that request alone with its limit, with or without a cap on rows per call."""
    model, processor, pixels, prompts = _mixed_batch(which, loaded, images, scene_shards)
    limits = dict(zip(prompts, [14, 3, 20, 6]))
    requests = [Request(i, prompt_ids(processor, p), max_new_tokens=limits[p], kind=p)
                for i in range(len(pixels)) for p in prompts]
    engine = TransformersEngine(model, processor, max_new_tokens=24)
    calls = []
    plain_generate = model.generate
    model.generate = lambda **kw: calls.append(kw["input_ids"].shape[0]) or plain_generate(**kw)
    try:
        grouped = engine.generate(pixels, requests)
    finally:
        del model.generate
    assert sorted(calls) == [len(pixels)] * len(prompts)  # one call per task, each of every image
    assert TransformersEngine(model, processor, max_new_tokens=24, max_rows=2).generate(pixels, requests) == grouped
    for r, got in zip(requests, grouped):
        alone = TransformersEngine(model, processor, max_new_tokens=r.max_new_tokens).generate(
            [pixels[r.image_index]], [Request(0, r.input_ids)])[0]
        assert got.token_ids == alone.token_ids and got.num_output_tokens <= r.max_new_tokens
    assert max(g.num_output_tokens for r, g in zip(requests, grouped) if r.max_new_tokens == 3) <= 3
    assert max(g.num_output_tokens for g in grouped) > 6


def test_static_cache_calls_take_few_shapes_and_the_same_tokens(loaded, images):
    """Rows round up to 8 and the prompt width to 64 under the static cache (a compiled step is then reused);
    the padding rows are dropped and the tokens stay those of the dynamic cache."""
    model, processor = loaded
    pixels = [_pixels(processor, data) for data in images]
    requests = [Request(i % len(pixels), prompt_ids(processor, p)) for i, p in enumerate(PROMPTS + PROMPTS[:1])]
    shapes = []
    plain_generate = model.generate
    model.generate = lambda **kw: shapes.append(tuple(kw["input_ids"].shape)) or plain_generate(**kw)
    try:
        static = TransformersEngine(model, processor, max_new_tokens=8, cache_implementation="static").generate(
            pixels, requests)
    finally:
        del model.generate
    dynamic = TransformersEngine(model, processor, max_new_tokens=8).generate(pixels, requests)
    assert [(rows % 8, width % 64) for rows, width in shapes] == [(0, 0)] and len(static) == len(requests) == 5
    assert [g.token_ids for g in static] == [g.token_ids for g in dynamic]
    assert [g.num_input_tokens for g in static] == [len(r.input_ids) for r in requests]


def test_the_batch_size_probe_runs_a_forced_trial_call_and_has_no_probe_on_cpu(loaded):
    """``inference.batch_size: auto`` measures a trial call's memory on CUDA; the call itself runs anywhere."""
    model, processor = loaded
    engine = TransformersEngine(model, processor, max_new_tokens=4)
    prefix = processor.image_seq_length + 30
    trial = engine.trial_call(prefix_tokens=prefix, new_tokens=6, rows=3)
    assert [(g.num_input_tokens, g.num_output_tokens) for g in trial] == [(prefix, 6)] * 3
    assert engine.probe_max_rows(prefix, 6) is None and engine.max_rows is None
