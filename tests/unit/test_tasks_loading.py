"""The task registry: resolving --dataset, loading every task's formats, and bad rows."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from truthmap.cli import app
from truthmap.data import load_questions
from truthmap.errors import TruthmapError
from truthmap.grading import GRADING_RULES
from truthmap.tasks import REGISTRY, resolve

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
# the reference study's files, beside the clone (CI has ../shared too); never copied into the project
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "llmsknow"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is not here")

ALL_TASKS = ["facts", "triviaqa", "hotpotqa", "hotpotqa_context", "movies", "nq_context", "math", "winobias",
             "winogrande", "nli", "imdb", "generic"]


def fixture(name):
    return str(FIXTURES / name)


def test_registry_lists_every_task_once_with_a_one_line_description(capsys):
    assert list(REGISTRY) == ALL_TASKS
    app(["tasks"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ALL_TASKS
    for task in REGISTRY.values():
        assert "\n" not in task.description and task.grading in GRADING_RULES


def test_resolve_forms(tmp_path):
    (tmp_path / "movie_qa_train.csv").write_text("Question,Answer\nWho?,Me\n")
    task, source = resolve("movies", str(tmp_path))
    assert (task.name, source.kind, source.path, source.split) == ("movies", "file", tmp_path / "movie_qa_train.csv", "train")
    task, source = resolve("triviaqa", str(tmp_path))  # no official file in the data folder: the hub
    assert (task.name, source.kind, source.hub_id, source.config, source.split) == (
        "triviaqa", "hub", "trivia_qa", "rc.nocontext", "validation")
    (tmp_path / "triviaqa-unfiltered").mkdir()
    (tmp_path / "triviaqa-unfiltered" / "unfiltered-web-dev.json").write_text('{"Data": []}')
    assert resolve("triviaqa", str(tmp_path))[1].path == tmp_path / "triviaqa-unfiltered" / "unfiltered-web-dev.json"
    assert resolve("hotpotqa:train")[1].split == "train"
    assert resolve(f"triviaqa:{fixture('triviaqa_official.json')}")[1].kind == "file"
    task, source = resolve(fixture("movie_qa.csv"))  # a bare path: the generic task
    assert task.name == "generic" and source.kind == "file"
    task, source = resolve("someone/their-dataset:validation")
    assert (task.name, source.hub_id, source.split) == ("generic", "someone/their-dataset", "validation")
    assert resolve("facts")[1].kind == "builtin"


@pytest.mark.parametrize("dataset,message", [
    ("movies:test", r"reads movie_qa_test.csv, which is not in .*; set --data-dir"),
    ("winobias:bogus", r"unknown split 'bogus'; use one of dev, test"),
    ("facts:train", r"is built in and has no splits"),
    ("generic", r"name a file or hub id"),
    ("movies:no/such/file.csv", r"no such file"),
    ("questions.csv", r"no such file"),
])
def test_resolve_errors_say_what_to_do(tmp_path, dataset, message):
    with pytest.raises(TruthmapError, match=message):
        resolve(dataset, str(tmp_path))


def test_data_dir_from_the_environment(tmp_path, monkeypatch):
    (tmp_path / "winogrande_train.csv").write_text("Question,Answer,Wrong_Answer\nA _ b?,x,y\n")
    monkeypatch.setenv("TRUTHMAP_DATA_DIR", str(tmp_path))
    table, _ = load_questions("winogrande")
    assert table.gold.tolist() == [["x"]] and table.wrong_answers.tolist() == [["y"]]


def test_facts_is_the_default_task():
    table, vocabularies = load_questions(limit=5)
    assert set(table.task) == {"facts"} and vocabularies
    assert table.attrs["source_rows"]["used"] > 1000


# --- each task's formats ------------------------------------------------------------------------------


def test_triviaqa_official_json_and_hub_schema_agree():
    official, _ = load_questions(f"triviaqa:{fixture('triviaqa_official.json')}")
    hub, _ = load_questions(f"triviaqa:{fixture('triviaqa_rc_nocontext.jsonl')}")
    assert len(official) == 6 and len(hub) == 40
    assert official.id.tolist() == hub.id.tolist()[:6] and official.question.tolist() == hub.question.tolist()[:6]
    row = hub.iloc[1]
    assert row.question == "Who wrote the play Romeo and Juliet?"
    # aliases and normalized_aliases together, one per normalised form (grading cannot tell them apart)
    assert list(row.gold) == ["William Shakespeare", "Shakespeare", "The Bard"]
    assert (row.task, row.family, row.subgroup) == ("triviaqa", "triviaqa", "WikipediaEntity")


def test_hub_schema_from_parquet(tmp_path):
    """A hub dataset saved as Parquet holds nested structs; they load like the JSON form."""
    rows = [json.loads(line) for line in open(FIXTURES / "hotpotqa_distractor.jsonl", encoding="utf-8")]
    path = tmp_path / "hotpot.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    from_parquet, _ = load_questions(f"hotpotqa_context:{path}")
    from_jsonl, _ = load_questions(f"hotpotqa_context:{fixture('hotpotqa_distractor.jsonl')}")
    assert from_parquet.drop(columns=["gold", "wrong_answers"]).equals(from_jsonl.drop(columns=["gold", "wrong_answers"]))


def test_hotpotqa_with_and_without_context():
    plain, _ = load_questions(f"hotpotqa:{fixture('hotpotqa_distractor.jsonl')}")
    context, _ = load_questions(f"hotpotqa_context:{fixture('hotpotqa_distractor.jsonl')}")
    assert (plain.context == "").all() and len(plain) == len(context) == 24
    first = context.iloc[0]
    assert first.gold == ["France"] and (first.family, first.subgroup) == ("bridge", "easy")
    # the supporting paragraphs, titled, in order; not the distractor
    assert first.context == ("Carmen: Carmen is an opera in four acts by Georges Bizet. It premiered in Paris in 1875.\n"
                             "Georges Bizet: Georges Bizet was a composer of the Romantic era. He was born in Paris, "
                             "France, in 1838.")
    original, _ = load_questions(f"hotpotqa_context:{fixture('hotpotqa_original.json')}")
    assert original.context.tolist() == context.context.tolist()[:3] and original.id.tolist() == ["hp000", "hp001", "hp002"]


def test_nq_csv_and_hub_schema():
    csv, _ = load_questions(f"nq_context:{fixture('nq_wc.csv')}")
    assert len(csv) == 24 and csv.iloc[0].context.startswith("The Declaration of Independence")
    hub, _ = load_questions(f"nq_context:{fixture('natural_questions.jsonl')}")
    # two examples without a short answer (one of them yes/no) are left out by design, and counted
    assert len(hub) == 4 and hub.attrs["source_rows"]["left_out"] == {"no short answer": 2}
    row = hub.iloc[1]
    assert row.question == "when did the berlin wall fall?" and row.gold == ["1989"]
    # the context is the long answer's text, without its HTML tokens
    assert row.context.startswith("The Berlin Wall fell on 9 November 1989") and "<P>" not in row.context


def test_nq_hub_schema_as_arrow_lists_of_structs(tmp_path):
    """Parquet files of the hub hold sequences of objects as lists of dicts, not the dict of lists."""
    rows = [json.loads(line) for line in open(FIXTURES / "natural_questions.jsonl", encoding="utf-8")]
    for row in rows:
        tokens = row["document"]["tokens"]
        row["document"]["tokens"] = [dict(zip(tokens, values)) for values in zip(*tokens.values())]
        ann = row["annotations"]
        row["annotations"] = [dict(zip(ann, values)) for values in zip(*ann.values())]
        for a in row["annotations"]:
            a["short_answers"] = [dict(zip(a["short_answers"], v)) for v in zip(*a["short_answers"].values())]
    path = tmp_path / "nq.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    table, _ = load_questions(f"nq_context:{path}")
    expected, _ = load_questions(f"nq_context:{fixture('natural_questions.jsonl')}")
    assert table.gold.tolist() == expected.gold.tolist() and table.context.tolist() == expected.context.tolist()


def test_math_numbers_are_parsed():
    table, _ = load_questions(f"math:{fixture('math.csv')}")
    assert table.gold.tolist() == [["19"], ["36"], ["15"], ["9"], ["2.5"], ["750"]]
    assert table.family.tolist()[:2] == ["GSM8K", "SVAMP"] and set(table.answer_type) == {"number"}
    assert table.id.tolist()[0] == "m1"


def test_winobias_chat_and_base_questions():
    table, _ = load_questions(f"winobias:{fixture('winobias.csv')}")
    row = table.iloc[0]
    assert row.question == "The carpenter thanked the librarian because he found the book. Who does the pronoun 'he' refer to?"
    assert row.question_base == "The carpenter thanked the librarian because he found the book. The pronoun 'he' refers to the"
    assert (row.gold, row.wrong_answers, row.family, row.subgroup) == (["carpenter"], ["librarian"], "type1", "pro")


def test_nli_labels_carry_their_synonyms():
    table, _ = load_questions(f"nli:{fixture('mnli.csv')}")
    assert table.subgroup.tolist() == ["entailment", "contradiction", "neutral", "entailment"]  # "Entailment" too
    assert "neutrality" in table.iloc[2].gold and "contradicts" in table.iloc[0].wrong_answers


def test_imdb_labels_and_line_breaks():
    table, _ = load_questions(f"imdb:{fixture('imdb.jsonl')}")
    assert len(table) == 40 and table.subgroup.value_counts().to_dict() == {"positive": 20, "negative": 20}
    row = table.iloc[3]
    assert "<br />" not in row.question and "drama with a brilliant lead performance.\n\nHighly" in row.question
    assert (row.gold, row.wrong_answers) == (["positive"], ["negative"])


def test_movies_answers_are_stripped():
    table, _ = load_questions(f"movies:{fixture('movie_qa.csv')}")
    assert table.gold.tolist()[5] == ["Tom Hanks"] and len(table) == 8


@needs_shared
@pytest.mark.parametrize("task,rows", [("movies", 10000), ("winobias", 1584), ("winogrande", 10000),
                                       ("nli", 10000), ("math", 1950)])
def test_the_reference_files_load_whole(task, rows):
    table, _ = load_questions(task, data_dir=str(SHARED))
    report = table.attrs["source_rows"]
    assert (report["read"], report["used"], report["skipped_bad"]) == (rows, rows, 0)
    assert table.id.is_unique and table.question.str.len().min() > 0
    assert all(len(g) > 0 for g in table.gold)


# --- bad rows -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task,content,message", [
    ("movies", "Question,Answer\nWho?,Me\n   ,You\n", r"q.csv, row 3, field 'Question': empty question"),
    ("movies", "Question,Answer\nWho?,\n", r"q.csv, row 2, field 'Answer': empty gold answer"),
    ("math", "question,answer\nHow many?,[9.0]\nHow many more?,nine\n",
     r"q.csv, row 3, field 'answer': unparsable number 'nine'"),
    ("nli", "Question,Answer\nDoes it?,maybe\n", r"q.csv, row 2, field 'Answer': unknown label 'maybe'"),
    ("winogrande", "Question,Answer,Wrong_Answer\nA _ b?,cat,Cat\n", r"row 2, field 'Wrong_Answer': the same as the answer"),
    ("math", "id,question,answer\n1,A?,1\n1,B?,2\n", r"row 3, field 'id': duplicate id '1' \(first at row 2\)"),
])
def test_bad_rows_name_file_row_field_and_the_way_out(tmp_path, task, content, message):
    path = tmp_path / "q.csv"
    path.write_text(content)
    with pytest.raises(TruthmapError, match=message + r".*--on-bad-row skip"):
        load_questions(f"{task}:{path}")


def test_bad_rows_skipped_are_counted(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text("question,answer\nA?,[9.0]\n ,[1]\nB?,lots\nC?,\nD?,2\n")
    table, _ = load_questions(f"math:{path}", on_bad_row="skip")
    assert table.question.tolist() == ["A?", "D?"]
    report = table.attrs["source_rows"]
    assert (report["read"], report["used"], report["skipped_bad"]) == (5, 2, 3)
    assert report["skipped_reasons"]["question: empty question"] == 1
    assert report["skipped_examples"][0].endswith("row 3, field 'question': empty question")


def test_unknown_hub_label_is_a_bad_row(tmp_path):
    path = tmp_path / "imdb.jsonl"
    path.write_text('{"text": "Fine.", "label": 1}\n{"text": "Unlabelled.", "label": -1}\n')
    with pytest.raises(TruthmapError, match=r"imdb.jsonl, row 2, field 'label': unknown label -1"):
        load_questions(f"imdb:{path}")


def test_a_file_of_another_task_is_named(tmp_path):
    with pytest.raises(TruthmapError, match=r"missing column 'sentence' .* is this a file of the 'winobias' task"):
        load_questions(f"winobias:{fixture('movie_qa.csv')}")


def test_hub_loading_honours_offline_mode():
    """No hub access in tests: offline mode must fail fast with a way out (a local copy)."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    code = "from truthmap.data import load_questions\nload_questions('triviaqa')"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "trivia_qa (rc.nocontext) [validation]" in last and "offline mode is set" in last
    assert "--dataset TASK:PATH" in last


def test_hub_datasets_are_read_record_by_record(monkeypatch):
    """A task's hub source is asked for its id, config and split; the rows are read from the Dataset itself."""
    import datasets

    rows = [json.loads(line) for line in open(FIXTURES / "imdb.jsonl", encoding="utf-8")]
    calls = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    table, _ = load_questions("imdb", limit=5)
    assert calls == [("imdb", None, "test")] and len(table) == 5
    assert table.attrs["source_rows"]["source"] == "imdb [test]" and table.attrs["source_rows"]["read"] == 40
