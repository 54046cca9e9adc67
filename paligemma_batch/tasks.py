"""The task registry: each task's config checks, prompt, parser and the output columns it fills.

Prompts follow the PaliGemma model card and Google's prompt guide. A text task is one :class:`TaskSpec`
entry; a structured task is one entry with a parser, plus its columns in :mod:`paligemma_batch.schema`.
Knows nothing of Ray or torch: masks are decoded by :mod:`paligemma_batch.annotate`, batched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from paligemma_batch.parse import ParsedObject, parse_objects

# The 36 XM3600 languages PaliGemma's multilingual captioning was trained and evaluated on.
LANGUAGES = (
    "ar bn cs da de el en es fa fi fil fr he hi hr hu id it ja ko mi nl no pl pt quz ro ru sv sw te th tr uk vi zh"
).split()


class TaskFields(Protocol):
    task: str
    lang: str
    prompt: str | None
    question: str | None
    question_key: str | None
    answer: str | None
    objects: list[str]


@dataclass
class Parsed:
    """What a parser read from one output: column values, and masks waiting for the batched decoder."""

    columns: dict[str, Any] = field(default_factory=dict)
    masks: list[tuple[dict, ParsedObject]] = field(default_factory=list)  # (mask column entry, its object)


def _no_columns(text: str, width: int, height: int) -> Parsed:
    return Parsed()


def _answer(text: str, width: int, height: int) -> Parsed:
    return Parsed({"answer": text})


def _detection(obj: ParsedObject, width: int, height: int) -> dict[str, Any]:
    return {
        "label": obj.label,
        "box_xyxy": list(obj.box_pixels(width, height)),
        "box_norm": list(obj.box_norm),
        "loc_tokens": list(obj.loc_tokens),
    }


def _detect(text: str, width: int, height: int) -> Parsed:
    parsed = parse_objects(text)
    return Parsed({"detections": [_detection(o, width, height) for o in parsed.objects],
                   "invalid_objects": parsed.invalid})


def _segment(text: str, width: int, height: int) -> Parsed:
    """Every object with a valid box is a detection; those with 16 seg tokens also get a mask entry."""
    parsed = parse_objects(text, segment=True)
    out = Parsed({"detections": [_detection(o, width, height) for o in parsed.objects], "masks": [],
                  "invalid_objects": parsed.invalid})
    for obj in parsed.objects:
        if obj.seg_tokens is None:
            continue
        mask = {"label": obj.label, "box_xyxy": list(obj.box_pixels(width, height)),
                "seg_tokens": list(obj.seg_tokens), "rle": None, "area": None}
        out.columns["masks"].append(mask)
        out.masks.append((mask, obj))
    return out


def _objects(t: TaskFields) -> str:
    return " ; ".join(o.strip() for o in t.objects if o.strip())


@dataclass(frozen=True)
class TaskSpec:
    """One task: how its prompt is built, which config fields it needs, and how its output is read."""

    prompt: Callable[[TaskFields, str | None], str]  # (task config, per-image question) -> prompt text
    needs_lang: bool = False
    needs: str | None = None  # the config field the task requires
    parse: Callable[[str, int, int], Parsed] = _no_columns  # (text, original width, height) -> columns
    columns: tuple[str, ...] = ()  # the output columns ``parse`` fills

    def issues(self, t: TaskFields) -> list[str]:
        """Problems with one task's fields, as messages (empty when it is valid)."""
        problems = []
        if self.needs_lang and t.lang not in LANGUAGES:
            problems.append(f"unknown language '{t.lang}'; known: {' '.join(LANGUAGES)}")
        if self.needs == "question" and bool(t.question) == bool(t.question_key):
            problems.append("answer needs exactly one of question or question_key")
        elif self.needs == "objects" and not _objects(t):
            problems.append(f"{t.task} needs objects: a list of object names")
        elif self.needs in ("answer", "prompt") and not getattr(t, self.needs):
            problems.append(f"{t.task} needs {self.needs}")
        if t.question_key and self.needs != "question":
            problems.append("question_key applies to task 'answer' only")
        if any(";" in o for o in t.objects):
            problems.append("objects must not contain ';' (it separates objects in the prompt)")
        return problems


TASKS: dict[str, TaskSpec] = {
    "caption": TaskSpec(lambda t, q: f"caption {t.lang}", needs_lang=True),
    "describe": TaskSpec(lambda t, q: f"describe {t.lang}", needs_lang=True),
    "ocr": TaskSpec(lambda t, q: "ocr"),
    "answer": TaskSpec(lambda t, q: f"answer {t.lang} {q if t.question_key else t.question}".strip(),
                       needs_lang=True, needs="question", parse=_answer, columns=("answer",)),
    "question": TaskSpec(lambda t, q: f"question {t.lang} {t.answer}", needs_lang=True, needs="answer"),
    "detect": TaskSpec(lambda t, q: f"detect {_objects(t)}", needs="objects", parse=_detect,
                       columns=("detections", "invalid_objects")),
    "segment": TaskSpec(lambda t, q: f"segment {_objects(t)}", needs="objects", parse=_segment,
                        columns=("detections", "masks", "invalid_objects")),
    "prompt": TaskSpec(lambda t, q: str(t.prompt), needs="prompt"),
}


def task_issues(t: TaskFields) -> list[str]:
    """Problems with one task's fields, as messages (empty when it is valid)."""
    spec = TASKS.get(t.task)
    if spec is None:
        return [f"unknown task '{t.task}'; known: {', '.join(TASKS)}"]
    return spec.issues(t)


def build_prompt(t: TaskFields, question: str | None = None) -> str:
    """The prompt text for one task; ``question`` is the per-image question of an ``answer`` task."""
    return TASKS[t.task].prompt(t, question)
