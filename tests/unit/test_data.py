import json

import pandas as pd
import pytest

from truthmap.data import load_questions
from truthmap.errors import TruthmapError


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_csv_with_answer_lists_and_ids(tmp_path):
    path = write(tmp_path / "q.csv", 'id,question,answers\na,"Capital of France?","[""Paris"", ""paris, france""]"\nb,2+2?,4\n')
    table, vocab = load_questions(path)
    assert table.id.tolist() == ["a", "b"]
    assert table.gold.tolist() == [["Paris", "paris, france"], ["4"]]
    assert vocab == {}


def test_jsonl_and_parquet(tmp_path):
    rows = [{"question": "Q1?", "answer": ["A1"]}, {"question": "Q2?", "answer": ["A2", "B2"]}]
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    parquet = tmp_path / "q.parquet"
    pd.DataFrame(rows).to_parquet(parquet)
    for path in (jsonl, parquet):
        table, _ = load_questions(str(path))
        assert table.gold.tolist() == [["A1"], ["A2", "B2"]]
        assert table.id.tolist() == ["0", "1"]


def test_column_mapping(tmp_path):
    path = write(tmp_path / "q.csv", "Question,Answer\nWho?,Me\n")
    table, _ = load_questions(path, question_column="Question", answer_column="Answer")
    assert table.question.tolist() == ["Who?"] and table.gold.tolist() == [["Me"]]


@pytest.mark.parametrize("content,message", [
    ("question,answer\nWhat?,x\n   ,y\n", r"q.csv, row 3, field 'question': empty question"),
    ("question,answer\nWhat?,\n", r"q.csv, row 2, field 'answer': empty gold answer"),
    ("id,question,answer\n1,A?,x\n1,B?,y\n", r"row 3, field 'id': duplicate id '1' \(first at row 2\)"),
    ("query,answer\nWhat?,x\n", r"missing column 'question'"),
    ("", r"q.csv: the file is empty"),
])
def test_bad_rows_name_file_row_field(tmp_path, content, message):
    path = write(tmp_path / "q.csv", content)
    with pytest.raises(TruthmapError, match=message):
        load_questions(path)


def test_non_text_answer_is_named(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "Q?", "answer": {"text": "x"}}) + "\n")
    with pytest.raises(TruthmapError, match=r"row 1, field 'answer': expected text or a list of texts, got dict"):
        load_questions(str(path))


def test_not_utf8_is_named(tmp_path):
    path = tmp_path / "q.csv"
    path.write_bytes(b"question,answer\n\xff\xfe caf\xe9,x\n")
    with pytest.raises(TruthmapError, match="not UTF-8"):
        load_questions(str(path))


def test_limit_is_a_deterministic_sample(tmp_path):
    path = write(tmp_path / "q.csv", "question,answer\n" + "".join(f"Q{i}?,{i}\n" for i in range(50)))
    a, _ = load_questions(path, limit=10, seed=0)
    b, _ = load_questions(path, limit=10, seed=0)
    c, _ = load_questions(path, limit=10, seed=1)
    assert a.id.tolist() == b.id.tolist() and a.id.tolist() != c.id.tolist() and len(a) == 10


def test_unknown_local_file_type(tmp_path):
    path = write(tmp_path / "q.txt", "hello")
    with pytest.raises(TruthmapError, match="unknown file type '.txt'"):
        load_questions(path)


@pytest.mark.parametrize("name,content,message", [
    ("q.jsonl", '{"question": "Q?", "answer": "x"}\n0\n', r"q.jsonl, line 2: a number, not a record"),
    ("q.jsonl", '["Q?", "x"]\n', r"q.jsonl, line 1: a list, not a record"),
    ("q.json", '[{"question": "Q?", "answer": "x"}, "Q2?"]', r"q.json, record 2: a string, not a record"),
])
def test_json_values_that_are_not_records_are_named(tmp_path, name, content, message):
    path = write(tmp_path / name, content)
    with pytest.raises(TruthmapError, match=message):
        load_questions(path)
