"""The task registry: each PaliGemma task's prompt and the parser that reads its output.

Prompts follow the PaliGemma model card and Google's prompt guide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

# The 36 XM3600 languages PaliGemma's multilingual captioning was trained and evaluated on.
LANGUAGES = (
    "ar bn cs da de el en es fa fi fil fr he hi hr hu id it ja ko mi nl no pl pt quz ro ru sv sw te th tr uk vi zh"
).split()

Output = Literal["text", "detect", "segment"]


@dataclass(frozen=True)
class TaskSpec:
    """How one task builds its prompt and how its output is read."""

    output: Output
    needs_lang: bool = False
    needs: str | None = None  # the config field the task requires


TASKS: dict[str, TaskSpec] = {
    "caption": TaskSpec("text", needs_lang=True),
    "describe": TaskSpec("text", needs_lang=True),
    "ocr": TaskSpec("text"),
    "answer": TaskSpec("text", needs_lang=True, needs="question"),
    "question": TaskSpec("text", needs_lang=True, needs="answer"),
    "detect": TaskSpec("detect", needs="objects"),
    "segment": TaskSpec("segment", needs="objects"),
    "prompt": TaskSpec("text", needs="prompt"),
}


class _TaskFields(Protocol):
    task: str
    lang: str
    prompt: str | None
    question: str | None
    question_key: str | None
    answer: str | None
    objects: list[str]


def task_issues(t: _TaskFields) -> list[str]:
    """Problems with one task's fields, as messages (empty when it is valid)."""
    spec = TASKS.get(t.task)
    if spec is None:
        return [f"unknown task '{t.task}'; known: {', '.join(TASKS)}"]
    problems = []
    if spec.needs_lang and t.lang not in LANGUAGES:
        problems.append(f"unknown language '{t.lang}'; known: {' '.join(LANGUAGES)}")
    if spec.needs == "question" and bool(t.question) == bool(t.question_key):
        problems.append("answer needs exactly one of question or question_key")
    elif spec.needs == "objects" and not [o for o in t.objects if o.strip()]:
        problems.append(f"{t.task} needs objects: a list of object names")
    elif spec.needs in ("answer", "prompt") and not getattr(t, spec.needs):
        problems.append(f"{t.task} needs {spec.needs}")
    if t.question_key and t.task != "answer":
        problems.append("question_key applies to task 'answer' only")
    if any(";" in o for o in t.objects):
        problems.append("objects must not contain ';' (it separates objects in the prompt)")
    return problems


def build_prompt(t: _TaskFields, question: str | None = None) -> str:
    """The prompt text for one task; ``question`` is the per-image question of an ``answer`` task."""
    name = t.task
    if name in ("caption", "describe"):
        return f"{name} {t.lang}"
    if name == "ocr":
        return "ocr"
    if name == "answer":
        return f"answer {t.lang} {question if t.question_key else t.question}".strip()
    if name == "question":
        return f"question {t.lang} {t.answer}"
    if name in ("detect", "segment"):
        return f"{name} " + " ; ".join(o.strip() for o in t.objects if o.strip())
    return str(t.prompt)


def output_kind(task_name: str) -> Output:
    """Which parser reads a task's output."""
    return TASKS[task_name].output
