"""Layouts read from real jsonl/parquet files; bad files give one-line errors naming file and row."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from maspo_megatron.data import DataError, load_prompt_file


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_verl_parquet(tmp_path):
    path = tmp_path / "verl.parquet"
    table = pa.Table.from_pylist([
        {"data_source": "gsm8k", "prompt": [{"role": "user", "content": "1+1?"}], "ability": "math",
         "reward_model": {"style": "rule", "ground_truth": "2"}, "extra_info": {"index": 0}},
        {"data_source": "gsm8k", "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "2+2?"}], "ability": "math",
         "reward_model": {"style": "rule", "ground_truth": "4"}, "extra_info": {"index": 1}},
    ])
    pq.write_table(table, path)
    raws = load_prompt_file(path)
    assert [r.ground_truth for r in raws] == ["2", "4"]
    assert raws[1].prompt == [{"role": "system", "content": "s"}, {"role": "user", "content": "2+2?"}]
    assert raws[0].metadata == {"data_source": "gsm8k", "ability": "math", "extra_info": {"index": 0}}
    assert raws[1].source == f"{path}:row 2"


def test_slime_plain_gsm8k_math_jsonl(tmp_path):
    slime = load_prompt_file(write_jsonl(tmp_path / "s.jsonl", [{"prompt": "Q1", "label": "3", "metadata": {"k": 1}}]))
    assert (slime[0].prompt, slime[0].ground_truth, slime[0].metadata) == ("Q1", "3", {"k": 1})
    plain = load_prompt_file(write_jsonl(tmp_path / "p.jsonl", [{"question": "Q", "answer": 7, "id": "x"}]))
    assert (plain[0].prompt, plain[0].ground_truth, plain[0].metadata) == ("Q", "7", {"id": "x"})
    gsm = load_prompt_file(write_jsonl(tmp_path / "g.jsonl", [{"question": "Q", "answer": "3 * 400 = 1200\n#### 1,200"}]))
    assert gsm[0].ground_truth == "1200" and gsm[0].metadata["solution"].startswith("3 * 400")
    math_rows = [
        {"problem": "P1", "solution": "So $x=\\boxed{\\frac{1}{2}}$.", "level": "Level 2", "type": "Algebra"},
        {"problem": "P2", "solution": "...", "answer": "\\{1,2\\}", "subject": "Algebra"},
    ]
    math = load_prompt_file(write_jsonl(tmp_path / "m.jsonl", math_rows))
    assert [m.ground_truth for m in math] == ["\\frac{1}{2}", "\\{1,2\\}"]
    assert math[0].metadata["level"] == "Level 2"


def test_custom_keys(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"input": {"text": "Q"}, "target": "5"}])
    raws = load_prompt_file(path, layout="plain", prompt_key="input.text", answer_key="target")
    assert (raws[0].prompt, raws[0].ground_truth) == ("Q", "5")


@pytest.mark.parametrize("rows,layout,message", [
    ([{"prompt": "a", "label": "1"}, {"prompt": "b"}], "slime", r"row 2: missing field 'label'"),
    ([{"question": "a", "answer": "1"}, {"question": "b", "answer": "2"}, {"question": 3, "answer": "1"}], "plain",
     r"row 3: field 'question' must be a string or a list of chat messages, got int"),
    ([{"question": "a", "answer": None}], "plain", r"row 1: field 'answer' must be a string or number, got None"),
    ([{"prompt": [{"role": "user"}], "label": "1"}], "slime", r"row 1: field 'prompt'\[0\] must be a"),
    ([{"question": "a", "answer": "no hashes"}], "gsm8k", r"row 1: gsm8k field 'answer' has no '#### <number>' line"),
    ([{"problem": "a", "solution": "no box"}], "math", r"row 1: no field 'answer' and no \\boxed\{\} answer"),
    ([{"foo": 1}], "auto", r"row 1: cannot detect the layout"),
])
def test_bad_rows_name_file_and_row(tmp_path, rows, layout, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=message) as info:
        load_prompt_file(path, layout=layout)
    assert str(info.value).startswith(f"{path}:row ")
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=rf"^{empty}: empty file"):
        load_prompt_file(empty)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "label": "1"}\n{"prompt": "b", "lab\n')
    with pytest.raises(DataError, match=rf"^{broken}:row 2: invalid JSON"):
        load_prompt_file(broken)
    not_utf8 = tmp_path / "latin1.jsonl"
    not_utf8.write_bytes(b'{"question": "a", "answer": "1"}\n{"question": "\xe9", "answer": "1"}\n')
    with pytest.raises(DataError, match=rf"^{not_utf8}:row 2: not valid UTF-8"):
        load_prompt_file(not_utf8)
    array_row = tmp_path / "array.jsonl"
    array_row.write_text('[1, 2]\n')
    with pytest.raises(DataError, match=rf"^{array_row}:row 1: expected a JSON object"):
        load_prompt_file(array_row)
    with pytest.raises(DataError, match="file not found"):
        load_prompt_file(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="unknown file type '.csv'"):
        (tmp_path / "x.csv").write_text("a,b\n")
        load_prompt_file(tmp_path / "x.csv")


def test_corrupt_parquet(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": f"q{i}", "answer": str(i)} for i in range(100)]), good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"^{truncated}: not a readable parquet file"):
        load_prompt_file(truncated)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1" + b"\x00" * 64)
    with pytest.raises(DataError, match=rf"^{garbage}: not a readable parquet file"):
        load_prompt_file(garbage)
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.Table.from_pylist([], schema=pa.schema([("question", pa.string()), ("answer", pa.string())])), empty)
    with pytest.raises(DataError, match=rf"^{empty}: empty file"):
        load_prompt_file(empty)
    wrong_type = tmp_path / "wrong_type.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "a", "answer": "1"}, {"question": "b", "answer": None}]), wrong_type)
    with pytest.raises(DataError, match=rf"^{wrong_type}:row 2: field 'answer' must be a string or number, got None"):
        load_prompt_file(wrong_type)


def test_corrupt_parquet_pages_name_the_row(tmp_path):
    path = tmp_path / "pages.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": f"q{i}" * 50, "answer": str(i)} for i in range(1000)]), path)
    data = bytearray(path.read_bytes())
    for i in range(100, 2000):  # inside the first column chunk; the footer stays readable
        data[i] = (data[i] * 7 + 3) % 256
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"^{path}:row 1: corrupt parquet data"):
        load_prompt_file(path)
