"""LaTeX scanning shared by prompt data (the MATH layout's ground truth) and rewards (answer extraction).

It sits on the lowest floor so that `data/` needs nothing from `rewards/`. Bounded for untrusted
model text: linear time however many unclosed `\\boxed{` a response holds.
"""
from __future__ import annotations

from typing import Optional

_BOX_COMMANDS = ("\\boxed", "\\fbox")
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
