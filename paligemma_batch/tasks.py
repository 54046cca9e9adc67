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


# New tokens of one detected object besides its name: 4 <loc> tokens and the " ;" separating objects; a segmented
# object adds 16 <seg> tokens. big_vision decodes its VQA transfers with a 32-token budget.
DETECTED_OBJECT_TOKENS = 4 + 2
SEGMENTED_OBJECT_TOKENS = 4 + 16 + 2
SHORT_ANSWER_TOKENS = 32

TokenCounter = Callable[[str], int]  # text -> its number of tokens (PromptEncoder.count_tokens)


class TaskFields(Protocol):
    task: str
    lang: str
    prompt: str | None
    question: str | None
    question_key: str | None
    answer: str | None
    objects: list[str]
    max_new_tokens: int | None


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


def _names(t: TaskFields) -> list[str]:
    return [o.strip() for o in t.objects if o.strip()]


def _objects(t: TaskFields) -> str:
    return " ; ".join(_names(t))


@dataclass(frozen=True)
class TaskSpec:
    """One task: how its prompt is built, which config fields it needs, and how its output is read."""

    prompt: Callable[[TaskFields, str | None], str]  # (task config, per-image question) -> prompt text
    needs_lang: bool = False
    needs: str | None = None  # the config field the task requires
    parse: Callable[[str, int, int], Parsed] = _no_columns  # (text, original width, height) -> columns
    columns: tuple[str, ...] = ()  # the output columns ``parse`` fills
    fixed_tokens: int | None = None  # the most new tokens an output takes (short answers)
    object_tokens: int | None = None  # new tokens per found object besides its name (detect, segment)
    instances: int = 1  # found objects allowed per object name, for the budget

    def token_budget(self, t: TaskFields, count: TokenCounter) -> int | None:
        """The new tokens a complete output can take: a short answer's, or ``instances`` of every named object;
        None for free text (captions, OCR, prompts), which only the model's cap bounds."""
        if self.object_tokens is None:
            return self.fixed_tokens
        return self.instances * sum(self.object_tokens + count(" " + name) for name in _names(t))

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
                       needs_lang=True, needs="question", parse=_answer, columns=("answer",),
                       fixed_tokens=SHORT_ANSWER_TOKENS),
    "question": TaskSpec(lambda t, q: f"question {t.lang} {t.answer}", needs_lang=True, needs="answer",
                         fixed_tokens=SHORT_ANSWER_TOKENS),
    "detect": TaskSpec(lambda t, q: f"detect {_objects(t)}", needs="objects", parse=_detect,
                       columns=("detections", "invalid_objects"), object_tokens=DETECTED_OBJECT_TOKENS, instances=8),
    "segment": TaskSpec(lambda t, q: f"segment {_objects(t)}", needs="objects", parse=_segment,
                        columns=("detections", "masks", "invalid_objects"), object_tokens=SEGMENTED_OBJECT_TOKENS,
                        instances=4),
    "prompt": TaskSpec(lambda t, q: str(t.prompt), needs="prompt"),
}


def task_issues(t: TaskFields) -> list[str]:
    """Problems with one task's fields, as messages (empty when it is valid)."""
    spec = TASKS.get(t.task)
    if spec is None:
        return [f"unknown task '{t.task}'; known: {', '.join(TASKS)}"]
    return spec.issues(t)


def max_new_tokens(t: TaskFields, cap: int, count: TokenCounter) -> int:
    """Task ``t``'s generation limit: its own ``max_new_tokens``, else its spec's budget, never above ``cap``."""
    return min(cap, t.max_new_tokens or TASKS[t.task].token_budget(t, count) or cap)


def build_prompt(t: TaskFields, question: str | None = None) -> str:
    """The prompt text for one task; ``question`` is the per-image question of an ``answer`` task."""
    return TASKS[t.task].prompt(t, question)
