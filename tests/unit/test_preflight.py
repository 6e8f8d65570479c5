"""What is checked before the model answers (truthmap/preflight.py, data.match_columns): column names
matched ignoring case, modes announced, a file too small for the fractions refused at once with what would
work, and a refused input leaves no run folder behind."""

import pytest

from truthmap.cli import app
from truthmap.config import Config
from truthmap.data import load_questions
from truthmap.errors import TruthmapError
from truthmap.preflight import check_class_counts, check_population, check_questions


def _csv(path, n: int, header: str = "question,answer") -> str:
    path.write_text(header + "\n" + "".join(f"What is {i} plus {i}?,{2 * i}\n" for i in range(n)))
    return str(path)


def _refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        app(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_the_readme_header_question_Answer_is_graded(tmp_path):
    table, _ = load_questions(_csv(tmp_path / "q.csv", 3, "Question,Answer"))
    assert table["question"].tolist()[0] == "What is 0 plus 0?" and table["gold"].tolist() == [["0"], ["2"], ["4"]]
    table, _ = load_questions(_csv(tmp_path / "q.csv", 3, "question,GOLD"))
    assert table["gold"].tolist() == [["0"], ["2"], ["4"]]
    # a named column is matched ignoring case too
    table, _ = load_questions(_csv(tmp_path / "q.csv", 2, "Prompt,Target"), question_column="prompt",
                              answer_column="target")
    assert table["gold"].tolist() == [["0"], ["2"]]


def test_an_ambiguous_column_name_is_an_error(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text("question,Answer,answer\nWho?,Ann,Bob\n")
    with pytest.raises(TruthmapError, match=r"q.csv: columns 'Answer', 'answer' all match 'answer' \(names are "
                                            r"matched ignoring case\); rename all but one"):
        load_questions(str(path))


def test_a_file_too_small_is_refused_at_once_with_what_would_work(tmp_path, capsys, monkeypatch):
    import truthmap.backends.hf

    monkeypatch.setattr(truthmap.backends.hf, "_load", lambda *a: pytest.fail("the model was loaded for a refused file"))
    small = _csv(tmp_path / "small.csv", 60)
    line = _refused(["run", "--dataset", small, "--out", str(tmp_path / "run"), "--quiet"], capsys)
    assert line == (f"error: {small}: 60 questions cannot give 10 right and 10 wrong answers to every part of a "
                    f"split: the validation part (0.2 of them) would hold about 12 answers, fewer than the 20 that "
                    f"needs even at 50% accuracy; lower --min-per-class to 6")
    big = _csv(tmp_path / "big.csv", 300)
    line = _refused(["run", "--dataset", big, "--limit", "30", "--out", str(tmp_path / "run")], capsys)
    assert line.endswith("; study at least 100 questions (--limit 100) or lower --min-per-class to 3")
    assert not (tmp_path / "run").exists()  # nothing made: no config.json, lock, manifest or summary


def test_the_class_count_rule_is_exactly_the_expected_part_size():
    config = Config(test_fraction=0.3, validation_fraction=0.2, min_per_class=10)
    check_class_counts(100, 100, config, "d")  # 0.2 × 100 = 20 = 2 × 10: possible
    with pytest.raises(TruthmapError, match="99 questions .* the validation part"):
        check_class_counts(99, 1000, config, "d")
    small_test = Config(test_fraction=0.1, validation_fraction=0.2, min_per_class=5)
    with pytest.raises(TruthmapError, match=r"the test part \(0.1 of them\) would hold about 9 answers.*--limit 100"):
        check_class_counts(90, 1000, small_test, "d")
    with pytest.raises(TruthmapError, match="a study needs at least 100 questions at these fractions"):
        check_class_counts(30, 30, small_test, "d")  # no --limit can add questions; 3 answers cannot hold 2 + 2


def test_a_missing_column_leaves_no_run_folder(tmp_path, capsys):
    bad = tmp_path / "q.csv"
    bad.write_text("query,answer\nWhat?,x\n")
    line = _refused(["run", "--dataset", str(bad), "--out", str(tmp_path / "run"), "--quiet"], capsys)
    assert "missing column 'question'" in line and not (tmp_path / "run").exists()


def test_modes_are_announced_before_the_work(tmp_path, capsys):
    table, _ = load_questions(_csv(tmp_path / "q.csv", 5, "question,notes"))
    check_questions(table, Config(dataset="q.csv"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("truthmap: q.csv: no answer column") and "a label-free study" in err[0]
    table, _ = load_questions("facts", limit=200)
    check_questions(table, Config(protocol="reference"))
    assert capsys.readouterr().err.startswith("truthmap: protocol reference: ")
    check_questions(table, Config())  # the default study: nothing to say
    assert capsys.readouterr().err == ""


def test_a_population_leaving_out_more_than_a_tenth_is_announced(capsys):
    check_population({"population": "common", "left_out": {str(i): "no exact answer" for i in range(10)}}, 100)
    assert capsys.readouterr().err == ""  # a tenth: not more
    check_population({"population": "common", "left_out": {**{str(i): "no exact answer" for i in range(10)},
                                                           "x": "position missing"}}, 100)
    assert capsys.readouterr().err.strip() == (
        "truthmap: population (common): 11 of 100 answers (11%) are left out of every cell (no exact answer: 10, "
        "position missing: 1); --population each gives every column the answers where its position exists")
