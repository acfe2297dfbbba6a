"""Final-answer extraction from untrusted model text, in linear time.

The answer is the LAST of: `\\boxed{...}` (or `\\fbox{...}`), GSM8K `#### n`, or a user pattern
(regex, group 1). Only the extracted answer, never the whole response, is handed to math-verify,
so 1 MB of text costs a few string scans rather than a LaTeX parse. The boxed scan itself
(`last_boxed`) lives in `maspo_megatron/utils/latex.py`, which prompt data uses too.
"""
from __future__ import annotations

import re
from typing import Optional

from maspo_megatron.utils.latex import last_boxed

_HASH_ANSWER = re.compile(r"####[ \t]*([^\n]*)")


def last_hash_answer(text: str) -> Optional[tuple[int, str]]:
    """(position, answer) of the last GSM8K-style `#### answer` line, else None."""
    start = text.rfind("####")
    if start < 0:
        return None
    match = _HASH_ANSWER.match(text, start)
    answer = match.group(1).strip().rstrip(".").strip() if match else ""
    return (start, answer) if answer else None


def last_pattern_answer(text: str, pattern: re.Pattern) -> Optional[tuple[int, str]]:
    """(position, group 1) of the last match of `pattern`, else None."""
    last = None
    for last in pattern.finditer(text):  # noqa: B007 - we want the final match
        pass
    if last is None:
        return None
    answer = last.group(1) if pattern.groups else last.group(0)
    return (last.start(), answer.strip()) if answer and answer.strip() else None


def extract_answer(text: str, pattern: Optional[re.Pattern] = None) -> Optional[str]:
    """The final answer of `text` (the latest boxed / #### / pattern answer, stripped), or None if it gives none."""
    candidates = [last_boxed(text), last_hash_answer(text)]
    if pattern is not None:
        candidates.append(last_pattern_answer(text, pattern))
    found = [c for c in candidates if c is not None]
    if not found:
        return None
    answer = max(found, key=lambda c: c[0])[1].strip()
    return answer or None  # an empty final `\boxed{}` is no answer


def compile_pattern(pattern: Optional[str]) -> Optional[re.Pattern]:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"answer_pattern: invalid regex {pattern!r} ({exc})") from None
