"""The job config: typed, strict, every problem reported as one line naming its key."""

from __future__ import annotations

import pytest

from paligemma_batch.config import ConfigError, JobConfig, load_config, parse_config
from paligemma_batch.tasks import LANGUAGES, TASKS


def _base(**over):
    data = {
        "input": {"uri": "/data/*.tar"},
        "tasks": [{"task": "caption", "lang": "en"}],
        "model": {"source": "google/paligemma2-3b-mix-224"},
        "output": {"uri": "/out"},
    }
    data.update(over)
    return data


def _problems(data) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


def test_defaults_and_descriptions():
    config = parse_config(_base())
    assert config.model.precision == "bfloat16" and config.inference.num_gpus == 0
    # Every field of every section is documented.
    for model in [JobConfig, *[f.annotation for f in JobConfig.model_fields.values() if hasattr(f.annotation, "model_fields")]]:
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


def test_misspelled_key_names_the_key():
    data = _base()
    data["model"] = {"source": "a/b", "precison": "int8"}
    assert _problems(data) == ["model.precison: unknown key"]


def test_unknown_task_and_language_list_the_known_ones():
    problems = _problems(_base(tasks=[{"task": "captoin"}, {"task": "caption", "lang": "xx"}]))
    assert len(problems) == 2
    assert problems[0].startswith("tasks.0: unknown task 'captoin'; known: ") and all(t in problems[0] for t in TASKS)
    assert problems[1].startswith("tasks.1: unknown language 'xx'; known: ") and "fil" in problems[1]
    assert len(LANGUAGES) == 36


@pytest.mark.parametrize(
    "task, message",
    [
        ({"task": "answer"}, "answer needs exactly one of question or question_key"),
        ({"task": "answer", "question": "q?", "question_key": "txt"}, "exactly one of"),
        ({"task": "detect"}, "detect needs objects"),
        ({"task": "segment", "objects": ["a ; b"]}, "must not contain ';'"),
        ({"task": "prompt"}, "prompt needs prompt"),
        ({"task": "question"}, "question needs answer"),
        ({"task": "caption", "question_key": "txt"}, "question_key applies to task 'answer' only"),
    ],
)
def test_task_field_rules(task, message):
    (problem,) = _problems(_base(tasks=[task]))
    assert problem.startswith("tasks.0: ") and message in problem


def test_duplicate_task_names_need_a_name():
    problems = _problems(_base(tasks=[{"task": "caption"}, {"task": "caption", "lang": "fr"}]))
    assert problems == ["tasks: duplicate task name 'caption'; set name: to tell them apart"]
    ok = parse_config(_base(tasks=[{"task": "caption"}, {"task": "caption", "lang": "fr", "name": "caption_fr"}]))
    assert [t.output_name for t in ok.tasks] == ["caption", "caption_fr"]


def test_prompts_follow_the_prompt_guide():
    config = parse_config(_base(tasks=[
        {"task": "caption", "lang": "de"},
        {"task": "describe", "lang": "es", "name": "d"},
        {"task": "ocr"},
        {"task": "answer", "lang": "fr", "question": "combien?"},
        {"task": "answer", "question_key": "json.q", "name": "per_image"},
        {"task": "question", "answer": "two cats"},
        {"task": "detect", "objects": ["cat", " dog "]},
        {"task": "segment", "objects": ["person's hat"]},
        {"task": "prompt", "prompt": "what is this?"},
    ]))
    prompts = [t.prompt_for("is it red?") for t in config.tasks]
    assert prompts == [
        "caption de", "describe es", "ocr", "answer fr combien?", "answer en is it red?",
        "question en two cats", "detect cat ; dog", "segment person's hat", "what is this?",
    ]


def test_fingerprint_ignores_secrets_and_pool_sizes_but_not_tasks():
    a = parse_config(_base())
    b = parse_config(_base(input={"uri": "/data/*.tar", "storage_options": {"key": "K", "secret": "SUPERSECRET-XYZ"}},
                           inference={"min_actors": 2, "max_actors": 4}))
    c = parse_config(_base(tasks=[{"task": "caption", "lang": "fr"}]))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert "SUPERSECRET-XYZ" not in repr(b) and "SUPERSECRET-XYZ" not in str(b.model_dump())


def test_load_config_applies_dotted_overrides(tmp_path):
    import yaml

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_base()))
    config = load_config(path, {"output.uri": "s3://bucket/out", "inference.batch_size": 3})
    assert config.output.uri == "s3://bucket/out" and config.inference.batch_size == 3


def test_load_config_rejects_bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("input: [unclosed")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.problems) == 1 and str(path) in info.value.problems[0]


def test_a_task_limit_above_the_model_cap_and_batch_size_auto():
    tasks = [{"task": "caption"}, {"task": "ocr", "max_new_tokens": 100}]
    assert _problems(_base(tasks=tasks, model={"source": "m", "max_new_tokens": 64})) == [
        "model: max_new_tokens (64) caps every task, but tasks.1.max_new_tokens is 100; raise the cap or lower the "
        "task's limit"]
    assert parse_config(_base(tasks=tasks, model={"source": "m", "max_new_tokens": 100})).tasks[1].max_new_tokens == 100
    assert parse_config(_base()).fingerprint() == parse_config(_base(tasks=[{"task": "caption", "lang": "en",
                                                                              "max_new_tokens": None}])).fingerprint()
    assert parse_config(_base(inference={"batch_size": "auto"})).inference.images_per_call == 16
    assert parse_config(_base(inference={"batch_size": "auto", "num_gpus": 1})).inference.images_per_call == 256
    assert parse_config(_base(inference={"batch_size": 5, "num_gpus": 1})).inference.images_per_call == 5
    assert _problems(_base(inference={"batch_size": "big"})) == [
        "inference.batch_size: expected a whole number of images (1 or more) or auto, not 'big'"]
    assert _problems(_base(inference={"batch_size": 0}))[0].startswith("inference.batch_size: expected")
