"""Final-answer extraction from untrusted model text, in linear time.

The answer is the LAST of: `\\boxed{...}` (or `\\fbox{...}`), GSM8K `#### n`, or a user pattern
(regex, group 1). Only the extracted answer, never the whole response, is handed to math-verify,
so 1 MB of text costs a few string scans rather than a LaTeX parse.
"""
from __future__ import annotations

import re
from typing import Optional

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_HASH_ANSWER = re.compile(r"####[ \t]*([^\n]*)")
# Bounds that keep adversarial text (thousands of unclosed `\boxed{`) linear: how many boxed
# commands are tried from the end, and how far one brace scan may run.
MAX_BOXED_TRIES = 3
MAX_BOXED_SCAN_CHARS = 20_000


def last_boxed(text: str) -> Optional[tuple[int, str]]:
    """(position, content) of the last `\\boxed{content}` with balanced braces, else None."""
    best: Optional[tuple[int, str]] = None
    for command in _BOX_COMMANDS:
        search_end = len(text)
        for _ in range(MAX_BOXED_TRIES):
            start = text.rfind(command, 0, search_end)
            if start < 0:
                break
            content = _braced_argument(text, start + len(command))
            if content is not None:
                if best is None or start > best[0]:
                    best = (start, content)
                break
            search_end = start  # unbalanced: try an earlier one
    return best


def _braced_argument(text: str, pos: int) -> Optional[str]:
    """The content of the `{...}` starting at `pos` (after optional spaces), or None if unbalanced
    (or longer than MAX_BOXED_SCAN_CHARS, which no real answer is)."""
    while pos < len(text) and text[pos] == " ":
        pos += 1
    if pos >= len(text) or text[pos] != "{":
        return None
    depth = 0
    for end in range(pos, min(len(text), pos + MAX_BOXED_SCAN_CHARS)):
        char = text[end]
        if char == "{" and text[end - 1] != "\\":
            depth += 1
        elif char == "}" and text[end - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[pos + 1 : end]
    return None


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
