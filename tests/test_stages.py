"""Each Ray Data stage called directly on a pyarrow table, and the same stage inside Ray Data."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from conftest import job_config
from paligemma_batch.config import TaskConfig
from paligemma_batch.model import load_processor
from paligemma_batch.prompts import load_prompt_encoder
from paligemma_batch.schema import ANNOTATIONS
from paligemma_batch.distributed.stages import PREPARED_SCHEMA, SOURCE_SCHEMA, InferenceStage, PreprocessPlan, preprocess, read_shards


@pytest.fixture(scope="module")
def config(tiny_model_dir, scene_shards, tmp_path_factory):
    tasks = [{"task": "caption"}, {"task": "answer", "question_key": "json.question"},
             {"task": "detect", "objects": ["circle"]}]
    return job_config(tiny_model_dir, [str(s) for s in scene_shards], str(tmp_path_factory.mktemp("o")), tasks=tasks)


@pytest.fixture(scope="module")
def processor(config):
    return load_processor(config.model, config.model_storage)


@pytest.fixture(scope="module")
def encoder(config):
    return load_prompt_encoder(config.model, config.model_storage)


def _shards_table(config) -> pa.Table:
    return pa.table({"shard_uri": list(config.input.uri)})


def _sources(config) -> pa.Table:
    return pa.concat_tables(list(read_shards(_shards_table(config), config.input, ["json.question"])))


def test_read_shards_direct_and_in_ray(ray_local, config):
    direct = _sources(config)
    assert direct.schema == SOURCE_SCHEMA and direct.num_rows == 12
    assert all("what color is the" in f for f in direct["fields"].to_pylist())
    ds = ray_local.data.from_arrow(_shards_table(config)).map_batches(
        read_shards, batch_size=1, batch_format="pyarrow", num_cpus=0.5,
        fn_kwargs={"input_cfg": config.input, "fields": ["json.question"]})
    in_ray = ds.to_arrow_refs()
    table = pa.concat_tables(ray_local.get(in_ray))
    assert table.sort_by("image_id").equals(direct.sort_by("image_id"))


def test_preprocess_direct_and_in_ray(ray_local, config, processor, encoder):
    sources = _sources(config)
    plan = PreprocessPlan.create(config, encoder)
    direct = preprocess(sources, plan)
    assert direct.schema == PREPARED_SCHEMA and direct.num_rows == 12
    row = direct.to_pylist()[0]
    assert row["error"] is None and len(row["pixels"]) == 64 * 64 * 3
    assert row["tasks"] == ["caption", "answer", "detect"]
    assert row["prompts"][1].startswith("answer en what color is the ")
    # Token ids are exactly what PaliGemmaProcessor builds for the prompt.
    expected = processor(text=[row["prompts"][1]], images=[np.zeros((8, 8, 3), np.uint8)])["input_ids"][0]
    assert row["input_ids"][1] == list(expected)
    in_ray = ray_local.data.from_arrow(sources).map_batches(
        preprocess, batch_size=5, batch_format="pyarrow", num_cpus=0.5, fn_kwargs={"plan": plan}).to_arrow_refs()
    table = pa.concat_tables(ray_local.get(in_ray)).sort_by("image_id")
    assert table.equals(direct.sort_by("image_id"))


def test_preprocess_skips_committed_pairs_and_keeps_errors(config, encoder):
    sources = _sources(config)
    first = sources["image_id"][0].as_py()
    done = {f"{first}\t{t}" for t in ("caption", "answer")} | {f"{sources['image_id'][1].as_py()}\t{t}"
                                                                for t in ("caption", "answer", "detect")}
    broken = pa.Table.from_pylist([{"image_id": "x::bad", "source_uri": "x", "data": b"junk", "fields": "{}",
                                    "error": None}], schema=SOURCE_SCHEMA)
    out = preprocess(pa.concat_tables([sources, broken]), PreprocessPlan.create(config, encoder, done))
    rows = {r["image_id"]: r for r in out.to_pylist()}
    assert rows[first]["tasks"] == ["detect"]
    assert sources["image_id"][1].as_py() not in rows
    assert rows["x::bad"]["error"].startswith("decode:") and rows["x::bad"]["tasks"] == ["caption", "answer", "detect"]


def test_inference_stage_direct_and_in_ray(ray_local, config, encoder):
    prepared = preprocess(_sources(config), PreprocessPlan.create(config, encoder))
    stage = InferenceStage(config, run_id="r1")
    direct = stage(prepared)
    assert direct.schema == ANNOTATIONS and direct.num_rows == 12 * 3
    assert set(direct["status"].to_pylist()) == {"ok"} and set(direct["run_id"].to_pylist()) == {"r1"}
    assert all(n > 0 for n in direct["num_output_tokens"].to_pylist())
    answers = [r for r in direct.to_pylist() if r["task"] == "answer"]
    assert all(r["answer"] == r["text"] for r in answers)
    assert all(r["detections"] is not None for r in direct.to_pylist() if r["task"] == "detect")

    from ray.data import ActorPoolStrategy

    in_ray = ray_local.data.from_arrow(prepared).map_batches(
        InferenceStage, batch_size=4, batch_format="pyarrow", compute=ActorPoolStrategy(size=1), num_cpus=0.5,
        fn_constructor_kwargs={"config": config, "run_id": "r1"}).to_arrow_refs()
    table = pa.concat_tables(ray_local.get(in_ray))
    key = lambda t: t.sort_by([("image_id", "ascending"), ("task", "ascending")])  # noqa: E731
    # Batching differs (12 images at once vs batches of 4): greedy left-padded output must not change.
    assert key(table).select(["image_id", "task", "text"]).equals(key(direct).select(["image_id", "task", "text"]))


def test_each_task_stops_at_its_own_limit(config, encoder):
    """The random tiny model rarely ends early, so each task's rows run to its limit: the cap (8) for caption, 3
    for a prompt that sets its own (with batch_size auto, which on CPU caps nothing). Inside Ray Data the stage
    runs the same code (test_inference_stage_direct_and_in_ray)."""
    limited = config.model_copy(update={
        "tasks": [config.tasks[0], TaskConfig(task="prompt", prompt="colours", max_new_tokens=3)],
        "inference": config.inference.model_copy(update={"batch_size": "auto"})})
    prepared = preprocess(_sources(limited), PreprocessPlan.create(limited, encoder))
    lengths = {}
    for row in InferenceStage(limited, run_id="r", encoder=encoder)(prepared).to_pylist():
        lengths.setdefault(row["task"], []).append(row["num_output_tokens"])
    assert max(lengths["caption"]) == 8 and max(lengths["prompt"]) == 3 and min(lengths["prompt"]) >= 1


def test_inference_stage_turns_error_rows_into_one_row_per_task(config, encoder):
    broken = pa.Table.from_pylist([{"image_id": "x::bad", "source_uri": "x", "data": b"", "fields": "{}",
                                    "error": None}], schema=SOURCE_SCHEMA)
    prepared = preprocess(broken, PreprocessPlan.create(config, encoder))
    out = InferenceStage(config, run_id="r").__call__(prepared).to_pylist()
    assert [r["task"] for r in out] == ["caption", "answer", "detect"]
    assert {(r["status"], r["error"]) for r in out} == {("error", "empty: zero-byte image")}


def test_a_sample_lacking_its_question_fails_only_its_answer_row(ray_local, config, encoder, tmp_path):
    """Direct, inside Ray Data, and through the job: the other tasks of that image stay ok."""
    import io
    import json
    import tarfile

    from ray.data import ActorPoolStrategy

    from bad_corpus import encode, solid
    from paligemma_batch.pipeline import run
    from paligemma_batch.results import read_results

    sources = _sources(config).slice(0, 2).to_pylist()
    sources[1]["fields"] = json.dumps({})  # the second sample has no json.question
    table = pa.Table.from_pylist(sources, schema=SOURCE_SCHEMA)
    lacking = sources[1]["image_id"]

    def outcome(rows: pa.Table) -> dict:
        return {(r["image_id"] == lacking, r["task"]): (r["status"], r["error"]) for r in rows.to_pylist()}

    expected = {(False, t): ("ok", None) for t in ("caption", "answer", "detect")}
    expected |= {(True, "caption"): ("ok", None), (True, "detect"): ("ok", None),
                 (True, "answer"): ("error", "input: no 'json.question' for task answer")}
    plan = PreprocessPlan.create(config, encoder)
    assert outcome(InferenceStage(config, run_id="r")(preprocess(table, plan))) == expected
    in_ray = ray_local.data.from_arrow(table).map_batches(
        preprocess, batch_size=2, batch_format="pyarrow", num_cpus=0.5, fn_kwargs={"plan": plan}).map_batches(
        InferenceStage, batch_size=2, batch_format="pyarrow", compute=ActorPoolStrategy(size=1), num_cpus=0.5,
        fn_constructor_kwargs={"config": config, "run_id": "r"}).to_arrow_refs()
    assert outcome(pa.concat_tables(ray_local.get(in_ray))) == expected

    # Through the job: a tar whose second sample's json has no question.
    shard = tmp_path / "two.tar"
    with tarfile.open(shard, "w") as tar:
        for key, doc in (("a", {"question": "what color is the shape?"}), ("b", {"caption": "none"})):
            for ext, data in (("png", encode(solid((32, 32), (0, 0, 255)), "PNG")), ("json", json.dumps(doc).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    job = config.model_copy(update={"input": config.input.model_copy(update={"uri": str(shard)}),
                                    "output": config.output.model_copy(update={"uri": str(tmp_path / "out")})})
    run(job)
    lacking = f"{shard}::b"
    assert outcome(read_results(str(tmp_path / "out"))) == expected
