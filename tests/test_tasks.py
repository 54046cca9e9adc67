"""The task registry: each spec's prompt, checks and parser, and the columns it says it fills."""

from __future__ import annotations

import pytest

from paligemma_batch.config import TaskConfig
from paligemma_batch.schema import ANNOTATIONS
from paligemma_batch.tasks import TASKS

TEXT = "<loc0100><loc0200><loc0300><loc0400>" + "".join(f"<seg{c:03d}>" for c in range(16)) + " circle ; " \
       "<loc0010><loc0020><loc0030><loc0040> square"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_each_parser_fills_exactly_the_columns_its_spec_declares(name):
    spec = TASKS[name]
    parsed = spec.parse(TEXT, 640, 480)
    assert set(parsed.columns) == set(spec.columns) and set(spec.columns) <= set(ANNOTATIONS.names)


def test_prompts_follow_the_model_card():
    prompts = {name: TaskConfig(task=name, question="how many?", answer="two", objects=["cat", "dog"],
                                prompt="free text").prompt_for()
               for name in TASKS if name != "answer"}
    prompts["answer"] = TaskConfig(task="answer", question="how many?").prompt_for()
    assert prompts == {"caption": "caption en", "describe": "describe en", "ocr": "ocr",
                       "answer": "answer en how many?", "question": "question en two", "detect": "detect cat ; dog",
                       "segment": "segment cat ; dog", "prompt": "free text"}


def test_a_segment_object_without_seg_tokens_is_a_detection_and_counted_invalid():
    parsed = TASKS["segment"].parse(TEXT, 640, 480)
    assert [d["label"] for d in parsed.columns["detections"]] == ["circle", "square"]
    assert [m["label"] for m in parsed.columns["masks"]] == ["circle"] and parsed.columns["invalid_objects"] == 1


def test_each_tasks_limit_comes_from_its_spec_and_the_object_names_never_above_the_cap():
    from paligemma_batch.fixtures.demo import SHAPES_MODEL
    from paligemma_batch.prompts import PromptEncoder
    from paligemma_batch.tasks import max_new_tokens

    count = PromptEncoder.from_folder(SHAPES_MODEL).count_tokens
    assert count(" circle") >= 1 and count(" red circle") > count(" circle")
    names = ["circle", "red square"]
    one_each = sum(count(" " + n) for n in names)
    limit = {name: max_new_tokens(TaskConfig(task=name, question="q?", answer="a", objects=names, prompt="p"), 1000,
                                  count) for name in TASKS}
    assert limit == {"caption": 1000, "describe": 1000, "ocr": 1000, "prompt": 1000, "answer": 32, "question": 32,
                     "detect": 8 * (2 * (4 + 2) + one_each), "segment": 4 * (2 * (4 + 16 + 2) + one_each)}
    assert max_new_tokens(TaskConfig(task="segment", objects=names), 64, count) == 64  # the model's cap
    assert max_new_tokens(TaskConfig(task="answer", question="q?"), 20, count) == 20
    assert max_new_tokens(TaskConfig(task="caption", max_new_tokens=12), 64, count) == 12  # the task's own
    assert max_new_tokens(TaskConfig(task="answer", question="q?", max_new_tokens=48), 64, count) == 48
