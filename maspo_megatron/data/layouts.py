"""Field mapping of the common prompt-file layouts into (prompt, ground truth, metadata).

| layout | prompt | ground truth | metadata |
|---|---|---|---|
| verl   | `prompt`: chat messages | `reward_model.ground_truth` | `data_source`, `extra_info`, `ability` |
| slime  | `prompt`: text or chat messages | `label` | `metadata` (a mapping) |
| plain  | `question` | `answer` | every other field |
| gsm8k  | `question` | `answer` after `####` (commas removed) | `solution`: the worked answer |
| math   | `problem` | `answer`, else the last `\\boxed{}` of `solution` | `level`, `type`, `subject`, ... |

`prompt_key` / `answer_key` override the field names (dotted for nesting, e.g.
`reward_model.ground_truth`). A prompt is either a string (the user turn) or a list of
`{"role", "content"}` messages.
"""
from __future__ import annotations

from typing import Any, Optional, Union

from maspo_megatron.data.records import DataError
from maspo_megatron.utils.latex import last_boxed

Prompt = Union[str, list]

_DEFAULT_KEYS = {
    "verl": ("prompt", "reward_model.ground_truth"),
    "slime": ("prompt", "label"),
    "plain": ("question", "answer"),
    "gsm8k": ("question", "answer"),
    "math": ("problem", "answer"),
}
_METADATA_KEYS = {
    "verl": ("data_source", "ability", "extra_info"),
    "math": ("level", "type", "subject", "unique_id", "solution"),
}


def detect_layout(row: dict) -> str:
    """Guesses the layout from the first row's fields."""
    if "reward_model" in row and "prompt" in row:
        return "verl"
    if "prompt" in row and "label" in row:
        return "slime"
    if "problem" in row and ("solution" in row or "answer" in row):
        return "math"
    if "question" in row and isinstance(row.get("answer"), str) and "####" in row["answer"]:
        return "gsm8k"
    if "question" in row and "answer" in row:
        return "plain"
    raise DataError(f"cannot detect the layout from fields {sorted(row)[:8]}; set data.format (verl, slime, plain, gsm8k, math)")


def _get(row: dict, dotted: str, where: str) -> Any:
    node: Any = row
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise DataError(f"{where}: missing field {dotted!r}")
        node = node[part]
    return node


def _check_prompt(prompt: Any, key: str, where: str) -> Prompt:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: field {key!r} is an empty string")
        return prompt
    if isinstance(prompt, (list, tuple)) and prompt:
        # parquet hands back numpy-free lists of dicts via to_pylist(); each needs role + content
        for i, message in enumerate(prompt):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)):
                raise DataError(f"{where}: field {key!r}[{i}] must be a {{'role': str, 'content': str}} message")
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise DataError(f"{where}: field {key!r} must be a string or a list of chat messages, got {type(prompt).__name__}")


def _check_answer(answer: Any, key: str, where: str) -> str:
    if isinstance(answer, bool) or answer is None:
        raise DataError(f"{where}: field {key!r} must be a string or number, got {answer!r}")
    if isinstance(answer, (int, float)):
        return str(answer)
    if isinstance(answer, list) and len(answer) == 1 and isinstance(answer[0], (str, int, float)):
        return str(answer[0])
    if not isinstance(answer, str):
        raise DataError(f"{where}: field {key!r} must be a string or number, got {type(answer).__name__}")
    if not answer.strip():
        raise DataError(f"{where}: field {key!r} is an empty string")
    return answer.strip()


def map_row(row: dict, layout: str, where: str, prompt_key: Optional[str] = None, answer_key: Optional[str] = None) -> tuple[Prompt, str, dict]:
    """(prompt, ground truth, metadata) of one row; `where` ("file:row N") prefixes every error."""
    default_prompt, default_answer = _DEFAULT_KEYS[layout]
    prompt_key = prompt_key or default_prompt
    prompt = _check_prompt(_get(row, prompt_key, where), prompt_key, where)

    if layout == "math" and answer_key is None and "answer" not in row:
        solution = _get(row, "solution", where)
        boxed = last_boxed(solution) if isinstance(solution, str) else None
        if boxed is None:
            raise DataError(f"{where}: no field 'answer' and no \\boxed{{}} answer in field 'solution'")
        answer = _check_answer(boxed[1], "solution", where)
    else:
        answer_key = answer_key or default_answer
        answer = _check_answer(_get(row, answer_key, where), answer_key, where)
        if layout == "gsm8k" and answer_key == "answer":
            if "####" not in answer:
                raise DataError(f"{where}: gsm8k field 'answer' has no '#### <number>' line")
            answer = answer.rsplit("####", 1)[1].strip().replace(",", "")

    if layout == "slime":
        metadata = row.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise DataError(f"{where}: field 'metadata' must be a mapping, got {type(metadata).__name__}")
        metadata = dict(metadata)
    elif layout in _METADATA_KEYS:
        metadata = {k: row[k] for k in _METADATA_KEYS[layout] if k in row}
    else:
        used = {prompt_key.split(".")[0], (answer_key or default_answer).split(".")[0]}
        metadata = {k: v for k, v in row.items() if k not in used}
    if layout == "gsm8k":
        metadata["solution"] = row.get("answer")
    return prompt, answer, metadata
