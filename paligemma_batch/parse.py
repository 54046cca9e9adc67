"""Parse PaliGemma detection/segmentation output (``<locNNNN>``/``<segNNN>`` tokens).

An object is 4 loc tokens (ymin, xmin, ymax, xmax bins), optionally 16 seg tokens
(VQ-VAE mask codes), then a label; objects are separated by ``" ; "``. Malformed
objects are counted with a reason instead of raising, using the checks of
big_vision ``evaluators/proj/paligemma/transfers/segmentation.py``. A loc token has exactly
4 digits and a seg token exactly 3, as the tokenizer spells them: ``<loc00100>`` is malformed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import cast

LOC_BINS = 1024
"""Loc token divisor: normalized coordinate = bin / 1024.

Sources disagree (big_vision's segmentation evaluator divides by 1023); we follow the
HF blog, Google's prompt docs and supervision, which divide by 1024.
"""
SEG_CODES = 128
"""Seg tokens index a 128-entry VQ-VAE codebook."""
SEG_TOKENS = 16
"""Number of seg tokens per object (a 4x4 grid of codes)."""

_LOC_RUN = re.compile(r"<loc[0-9]+>(?:\s*<loc[0-9]+>)*")
_SEG_RUN = re.compile(r"\s*<seg[0-9]+>(?:\s*<seg[0-9]+>)*")
_SEG_TOKEN = re.compile(r"<seg[0-9]+>")
_NUMBER = re.compile(r"[0-9]+")
_DIGITS = {"loc": 4, "seg": 3}


@dataclass(frozen=True)
class ParsedObject:
    """One valid object: its label, loc bins and optional seg codes."""

    label: str
    loc_tokens: tuple[int, int, int, int]
    seg_tokens: tuple[int, ...] | None

    @property
    def box_norm(self) -> tuple[float, float, float, float]:
        """Box as (xmin, ymin, xmax, ymax) in [0, 1]."""
        ymin, xmin, ymax, xmax = self.loc_tokens
        return (xmin / LOC_BINS, ymin / LOC_BINS, xmax / LOC_BINS, ymax / LOC_BINS)

    def box_pixels(self, width: int, height: int) -> tuple[float, float, float, float]:
        """Box as (x0, y0, x1, y1) in original-image pixels.

        The model sees the image squashed to a square (no letterbox), so x scales by
        ``width`` and y by ``height`` independently.
        """
        x0, y0, x1, y1 = self.box_norm
        return (x0 * width, y0 * height, x1 * width, y1 * height)


@dataclass(frozen=True)
class ParseResult:
    """Valid objects, plus the count of rejected objects and one reason for each."""

    objects: list[ParsedObject]
    invalid: int
    reasons: list[str]


def _numbers(tokens: str) -> tuple[str, ...]:
    return tuple(_NUMBER.findall(tokens))


def _value(digits: str) -> int:
    """The number a token's digits spell, clamped so that no length of digits can make ``int`` refuse it."""
    significant = digits.lstrip("0") or "0"
    return int(significant) if len(significant) <= 9 else 10**9


def _spelling(kind: str, digits: tuple[str, ...], limit: int) -> str | None:
    """Why tokens of ``kind`` are not as the tokenizer spells them (exactly 4 or 3 digits), or None."""
    if all(len(d) == _DIGITS[kind] for d in digits):
        return None
    return f"{kind} out of range" if any(_value(d) >= limit for d in digits) else f"malformed {kind} token"


def _check(loc_digits: tuple[str, ...], seg_digits: tuple[str, ...] | None, label: str) -> str | None:
    """Return why an object is invalid, or None when it is valid."""
    loc = tuple(_value(d) for d in loc_digits)
    if len(loc) != 4:
        return f"{len(loc)} loc tokens"
    if not all(0 <= v < LOC_BINS for v in loc):
        return "loc out of range"
    bad = _spelling("loc", loc_digits, LOC_BINS)
    if bad:
        return bad
    ymin, xmin, ymax, xmax = loc
    if ymax <= ymin:
        return "ymax<=ymin"
    if xmax <= xmin:
        return "xmax<=xmin"
    if _SEG_TOKEN.search(label):
        return "seg tokens in label"
    return None if seg_digits is None else _seg_problem(seg_digits)


def _seg_problem(digits: tuple[str, ...]) -> str | None:
    if len(digits) != SEG_TOKENS:
        return f"{len(digits)} seg tokens"
    if not all(_value(d) < SEG_CODES for d in digits):
        return "seg out of range"
    return _spelling("seg", digits, SEG_CODES)


def parse_objects(text: str, segment: bool = False) -> ParseResult:
    """Parse every object in ``text``; never raises on malformed model output.

    Each run of consecutive loc tokens starts an object; it takes the seg tokens right
    after it and, as label, the text up to the next ``;`` or the next run of loc tokens
    (surrounding whitespace stripped, possibly empty). Text outside objects is ignored.

    With ``segment`` (the output of a segment task) every object must have 16 valid seg tokens: one without
    them counts as invalid but is still kept, as a detection with ``seg_tokens=None``.
    """
    objects: list[ParsedObject] = []
    reasons: list[str] = []
    for chunk in text.split(";"):
        runs = list(_LOC_RUN.finditer(chunk))
        for i, run in enumerate(runs):
            loc = _numbers(run.group())
            seg_run = _SEG_RUN.match(chunk, run.end())
            seg = _numbers(seg_run.group()) if seg_run else None
            label_start = seg_run.end() if seg_run else run.end()
            label_end = runs[i + 1].start() if i + 1 < len(runs) else len(chunk)
            label = chunk[label_start:label_end].strip()
            reason = _check(loc, None if segment else seg, label)
            if reason is not None:
                reasons.append(reason)
                continue
            seg_reason = (_seg_problem(seg) if seg else "no seg tokens") if segment else None
            if seg_reason:
                reasons.append(seg_reason)
            loc4 = cast("tuple[int, int, int, int]", tuple(_value(d) for d in loc))
            codes = None if seg is None or seg_reason else tuple(_value(d) for d in seg)
            objects.append(ParsedObject(label, loc4, codes))
    return ParseResult(objects=objects, invalid=len(reasons), reasons=reasons)
