"""Each task's correctness and exact-answer rule on hand-written tricky answers (no model needed)."""

from pathlib import Path

import pandas as pd
import pytest

from truthmap.data import load_questions
from truthmap.grading import alias_match, grade_choice, grade_number, stated_number
from truthmap.stages.label import label_answers
from truthmap.tasks import get_task
from truthmap.tasks.nli import SYNONYMS
from truthmap.textmatch import Vocabulary

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def fixture(name):
    return str(FIXTURES / name)


MIKE = "Mike made 69 dollars mowing lawns. He spent 24 dollars on blades. How many 5 dollar games could he buy?"


def grade(task, answer, gold, wrong=(), question=""):
    """(correct, exact answer text, reason) under ``task``'s rule."""
    from truthmap.grading import GRADING_RULES

    rule, _ = GRADING_RULES[get_task(task).grading]
    correct, (text, start, end, reason) = rule(answer, question, list(gold), list(wrong), "", {})
    if text is not None:
        assert answer[start:end] == text  # the span points at the answer's own characters
    return correct, text, reason


def matched(task, answer, gold, wrong=(), question=""):
    """(correct, the gold span's text: the matched alias of a right answer, else None) under ``task``'s rule."""
    from truthmap.grading import grade as grade_rule

    correct, _, span = grade_rule(get_task(task).grading, answer, question, list(gold), list(wrong), "", {})
    return correct, answer[span[0] : span[1]] if span else None


# --- math: the stated number -------------------------------------------------------------------------


@pytest.mark.parametrize("answer,correct,exact", [
    ("9", True, "9"),
    ("9.0", True, "9.0"),  # 9.0 = 9
    ("19", False, "19"),  # 9 is not inside 19
    ("He can buy 19 games.", False, "19"),
    ("Mike can buy 9 games.", True, "9"),
    ("69 - 24 = 45. 45 / 5 = 9.", True, "9"),  # a worked answer: its last sentence, after "="
    ("He has 45 dollars left, so he can buy 9 games.", True, "9"),  # after "so"
    ("The answer is: 9", True, "9"),
    ("He has 45 dollars left.", False, "45"),
    ("After spending 24 dollars he can buy 9 games.", True, "9"),  # 24 is the question's own number
    ("-9", False, "-9"),
    ("Mike could buy nine games.", False, None),  # number words are not read
])
def test_math_correct_when_the_stated_number_equals_the_gold_one(answer, correct, exact):
    ok, text, reason = grade("math", answer, ["9"], question=MIKE)
    assert (ok, text) == (correct, exact)
    assert reason == ("number" if exact else "no_candidate_in_answer")


def test_math_numbers_compare_as_numbers():
    assert grade("math", "The total is 1,200 people.", ["1200"])[0]
    assert grade("math", "Each piece is 2.50 metres.", ["2.5"])[0]
    assert grade("math", "It costs $15.", ["15"])[0]
    assert not grade("math", "It costs $150.", ["15"])[0]
    assert stated_number("There will be 1600 ants after 5 hours.", "How many ants after 5 hours?")[0] == "1600"
    assert grade("math", "", ["9"]) == (False, None, "empty_answer")


# --- winobias / winogrande: the first candidate named ----------------------------------------------------


@pytest.mark.parametrize("answer,correct,exact", [
    ("The pronoun 'he' refers to the carpenter.", True, "carpenter"),
    ("The librarian, not the carpenter.", False, "librarian"),  # the first one named decides
    ("It refers to the carpenter, who thanked the librarian.", True, "carpenter"),
    ("The Carpenter.", True, "Carpenter"),
    ("The carpenters thanked the librarian.", False, "librarian"),  # whole words: 'carpenters' is not it
    ("It is unclear.", False, None),
])
def test_winobias_first_candidate_rule(answer, correct, exact):
    ok, text, reason = grade("winobias", answer, ["carpenter"], ["librarian"])
    assert (ok, text) == (correct, exact)
    assert reason == ("first_choice" if exact else "no_candidate_in_answer")


COOK = "The cook prepared a dish for the teacher because he just learned a new dish. Who does the pronoun 'he' refer to?"
EDITOR = ("The editor called the construction worker because she wanted to know when the house would be ready. "
          "Who does the pronoun 'she' refer to?")


@pytest.mark.parametrize("question,answer,gold,wrong,correct,exact", [
    # a repeated sentence names both candidates in its own order: it is not the answer
    (COOK, "The cook prepared a dish for the teacher because he just learned a new dish. This is a classic example",
     "cook", "teacher", False, None),
    (EDITOR, "The editor called the construction worker because she wanted to know when the house would be ready. "
     "She refers to the construction worker.", "editor", "construction worker", False, "construction worker"),
    (COOK, "The cook prepared a dish for the teacher, so 'he' is the cook.", "cook", "teacher", True, "cook"),
    # a few words in common with the question are no echo
    (COOK, "The pronoun 'he' refers to the cook.", "cook", "teacher", True, "cook"),
])
def test_choice_ignores_an_echo_of_the_question(question, answer, gold, wrong, correct, exact):
    assert grade("winobias", answer, [gold], [wrong], question=question)[:2] == (correct, exact)


@pytest.mark.parametrize("answer,gold,correct,exact", [
    ("To decide whether it represents entailment, contradiction, or neutrality, look at it. It is neutral.",
     "neutral", True, "neutral"),
    ("It is either entailment or contradiction.", "entailment", False, None),  # listing is not choosing
    ("Entailment, not contradiction.", "entailment", True, "Entailment"),  # "not" is no list
    ("Contradiction. Entailment and neutrality do not fit.", "neutral", False, "Contradiction"),
])
def test_nli_a_list_of_labels_is_not_a_choice(answer, gold, correct, exact):
    assert nli(answer, gold)[:2] == (correct, exact)


def test_a_list_of_options_is_not_a_choice():
    assert grade("imdb", "Is it positive or negative? It is negative.", ["positive"], ["negative"])[:2] == (False, "negative")
    assert grade("winobias", "The carpenter or the librarian.", ["carpenter"], ["librarian"])[:2] == (False, None)
    assert grade("imdb", "Either 'positive' or 'negative': 'negative'.", ["positive"], ["negative"])[:2] == (False, "negative")


def test_winogrande_longer_option_wins_a_tie():
    # options that share a word: the longer one at the same place is the one named
    assert grade("winogrande", "The new car would be safer.", ["new car"], ["car"])[:2] == (True, "new car")
    assert grade("winogrande", "The car would be safer.", ["new car"], ["car"])[:2] == (False, "car")


# --- nli: the first label word, synonyms included ----------------------------------------------------------


def nli(answer, gold):
    wrong = [w for name, words in SYNONYMS.items() if name != gold for w in words]
    return grade("nli", answer, SYNONYMS[gold], wrong)


@pytest.mark.parametrize("answer,gold,correct,exact", [
    ("Entailment.", "entailment", True, "Entailment"),
    ("The premise entails the hypothesis.", "entailment", True, "entails"),
    ("This represents neutrality.", "neutral", True, "neutrality"),
    ("It is a contradiction.", "contradiction", True, "contradiction"),
    ("The hypothesis contradicts the statement; it is not entailment.", "entailment", False, "contradicts"),
    ("Neutral, though some would call it entailment.", "entailment", False, "Neutral"),
    ("The statement is a logical fallacy.", "neutral", False, None),
])
def test_nli_first_label_word(answer, gold, correct, exact):
    assert nli(answer, gold)[:2] == (correct, exact)


# --- imdb: the first sentiment word -------------------------------------------------------------------


@pytest.mark.parametrize("answer,correct,exact", [
    ("Positive.", True, "Positive"),
    ("positive - the reviewer loved it", True, "positive"),
    ("Positive, despite a few negative remarks.", True, "Positive"),
    ("Negative. Although it has positive moments, the review is critical.", False, "Negative"),
    ("The reviewer enjoyed the film.", False, None),
    ("Positively glowing.", False, None),  # whole words only
])
def test_imdb_first_sentiment_word(answer, correct, exact):
    assert grade("imdb", answer, ["positive"], ["negative"])[:2] == (correct, exact)


# --- alias tasks (triviaqa, movies, hotpotqa, nq, generic, facts) ------------------------------------------


def test_alias_tasks_match_any_alias_whole_word():
    gold = ["William Shakespeare", "Shakespeare", "william shakespeare"]
    assert matched("triviaqa", "It was written by Shakespeare.", gold) == (True, "Shakespeare")
    # located without the gold: what the verb states, as for a wrong answer
    assert grade("triviaqa", "It was written by Shakespeare.", gold)[1:] == ("Shakespeare", "stated_after_verb")
    assert grade("triviaqa", "It was written by Marlowe.", gold)[:2] == (False, "Marlowe")
    assert not grade("triviaqa", "It was a Shakespearean play.", gold)[0]
    assert matched("movies", "Andy Garcia played him.", ["Andy García"]) == (True, "Andy Garcia")
    assert not grade("hotpotqa_context", "The answer is Paris.", ["France"])[0]


def test_nq_context_short_answers_whole_word_and_numbers_as_numbers():
    assert matched("nq_context", "It fell in 1989.", ["1989"]) == (True, "1989")
    # a question asking for a year is located as a number without its gold; "It fell in 1989." states no
    # answer after a verb, so without such a question the extractor model is asked
    assert grade("nq_context", "It fell in 1989.", ["1989"], question="In what year did the wall fall?")[1] == "1989"
    assert grade("nq_context", "It fell in 1989.", ["1989"])[1:] == (None, "no_candidate_in_answer")
    assert not grade("nq_context", "It fell in 19890 BC.", ["1989"])[0]
    assert matched("nq_context", "About 212.0 degrees", ["212"]) == (True, "212.0")
    assert grade("nq_context", "J.K. Rowling wrote them.", ["J. K. Rowling", "Rowling"])[0]
    assert not grade("nq_context", "Rowlings wrote them.", ["Rowling"])[0]


def test_hotpotqa_yes_no_questions_are_a_choice():
    table, _ = load_questions(f"hotpotqa:{fixture('hotpotqa_distractor.jsonl')}")
    row = table[table.gold.apply(lambda g: list(g) == ["yes"])].iloc[0]
    assert list(row.wrong_answers) == ["no"] and list(table.iloc[0].wrong_answers) == []
    lions = "No, they are not; yes, people often think so."
    assert grade("hotpotqa", lions, ["yes"], ["no"])[:2] == (False, "No")
    assert grade("hotpotqa", "Yes, both are big cats.", ["yes"], ["no"])[:2] == (True, "Yes")
    assert grade("hotpotqa", "They are not both in it.", ["yes"], ["no"])[:2] == (False, None)


def test_a_gold_alias_inside_a_longer_candidate_does_not_count():
    countries = Vocabulary(["Republic of the Congo", "Congo-Brazzaville", "Democratic Republic of the Congo", "DR Congo",
                            "Guinea", "Guinea-Bissau", "Equatorial Guinea", "Papua New Guinea", "Sudan", "South Sudan"])
    congo = ["Republic of the Congo", "Congo-Brazzaville"]
    assert alias_match("It is the Democratic Republic of the Congo.", congo, countries)[0] is False
    assert alias_match("It is the Republic of the Congo.", congo, countries)[0] is True
    # the right country named after the wrong one still counts, at its own place
    text = "Not the Democratic Republic of the Congo but the Republic of the Congo."
    ok, (alias, start, end) = alias_match(text, congo, countries)
    assert ok and start == text.rindex("Republic")
    assert alias_match("Guinea-Bissau", ["Guinea"], countries)[0] is False
    assert alias_match("Equatorial Guinea", ["Guinea"], countries)[0] is False
    assert alias_match("Papua New Guinea", ["Guinea"], countries)[0] is False
    assert alias_match("South Sudan", ["Sudan"], countries)[0] is False
    assert alias_match("Sudan, north of South Sudan.", ["Sudan"], countries)[0] is True
    assert alias_match("South Sudan", ["South Sudan"], countries)[0] is True
    assert alias_match("Guinea-Bissau", ["Guinea"])[0] is True  # without a vocabulary there is nothing to tell them apart


def test_the_built_in_facts_are_graded_with_their_vocabularies(facts_questions):
    table, vocabularies = facts_questions
    congo = table[table.gold.apply(lambda g: "Republic of the Congo" in list(g))]
    assert len(congo), "the facts set asks about the Republic of the Congo"
    row = congo.iloc[0]
    answers = ["It is the Democratic Republic of the Congo.", "It is the Republic of the Congo."]
    tok = WordTokenizer()
    graded = label_answers(
        pd.concat([congo.iloc[[0]]] * 2).assign(id=["a", "b"]),
        pd.DataFrame({"id": ["a", "b"], "prompt": ["p", "p"], "prompt_ids": [[1], [1]],
                      "answer_ids": [tok(a)["input_ids"] for a in answers], "answer": answers, "stopped": [True, True]}),
        vocabularies, tok, ["last_q"],
    )
    assert graded.correct.tolist() == [False, True], row.question


def test_krona_alone_is_swedens_currency_and_krone_alone_neither_norways_nor_denmarks(facts_questions):
    table, vocabularies = facts_questions
    by_id = table.set_index("id")
    asked = [("currency-SE", "The currency of Sweden is the krona."), ("currency-SE", "It is the krone."),
             ("currency-NO", "The krona."), ("currency-NO", "The krone."), ("currency-NO", "The Norwegian krone."),
             ("currency-DK", "The krona.")]
    rows = by_id.loc[[qid for qid, _ in asked]].reset_index().assign(id=[f"a{k}" for k in range(len(asked))])
    answers = [answer for _, answer in asked]
    tok = WordTokenizer()
    graded = label_answers(
        rows, pd.DataFrame({"id": rows.id, "prompt": "p", "prompt_ids": [[1]] * len(asked),
                            "answer_ids": [tok(a)["input_ids"] for a in answers], "answer": answers, "stopped": True}),
        vocabularies, tok, ["last_q"],
    )
    assert graded.correct.tolist() == [True, False, False, False, True, False]


def test_a_country_abbreviated_with_dots_is_graded_like_its_plain_form(facts_questions):
    table, vocabularies = facts_questions
    rows = table[table.id.isin(["city-US-new_york_city", "city-GB-london"])].sort_values("id")
    assert rows.id.tolist() == ["city-GB-london", "city-US-new_york_city"]
    answers = ["London is in the U.S.A.", "New York City is in the U.S.A."]
    tok = WordTokenizer()
    graded = label_answers(
        rows.assign(id=["a", "b"]),
        pd.DataFrame({"id": ["a", "b"], "prompt": ["p", "p"], "prompt_ids": [[1], [1]],
                      "answer_ids": [tok(a)["input_ids"] for a in answers], "answer": answers, "stopped": [True, True]}),
        vocabularies, tok, ["last_q"],
    )
    assert graded.correct.tolist() == [False, True]
    assert graded.exact_answer.tolist() == ["U.S.A", "U.S.A"]  # the whole abbreviation, to its last letter


# --- the label stage dispatches to each row's task ----------------------------------------------------------


class WordTokenizer:
    """A stand-in tokenizer for the label stage: one token per whitespace-separated word."""

    all_special_ids = [0]

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        import re

        spans = [m.span() for m in re.finditer(r"\S+", text)]
        return {"input_ids": [hash(text[s:e]) % 1000 + 1 for s, e in spans], "offset_mapping": spans}

    def decode(self, ids, skip_special_tokens=True):  # pragma: no cover - only when offsets fail
        raise AssertionError("offsets should be enough")


def labelled(dataset, answers, vocabularies=None):
    questions, vocab = load_questions(dataset)
    questions = questions.head(len(answers))
    tok = WordTokenizer()
    generations = pd.DataFrame({
        "id": questions.id, "prompt": "p", "prompt_ids": [[1, 2, 3]] * len(answers),
        "answer_ids": [tok(a)["input_ids"] for a in answers], "answer": answers, "stopped": True,
    })
    return label_answers(questions, generations, vocabularies or vocab, tok, ["last_q", "exact_answer_first"])


def test_label_stage_uses_each_tasks_rule():
    math = labelled(f"math:{fixture('math.csv')}", ["There are 19 rolls left.", "She read 3 pages.",
                                                    "The sale price is $15.", "He has 9 pencils."])
    assert math.correct.tolist() == [True, False, True, True]
    assert math.exact_answer.tolist() == ["19", "3", "15", "9"] and set(math.exact_answer_reason) == {"number"}
    assert set(math.task) == {"math"}
    wino = labelled(f"winobias:{fixture('winobias.csv')}", ["The carpenter.", "The librarian.", "", "I cannot tell."])
    assert wino.correct.tolist() == [True, False, False, False]
    assert wino.exact_answer_reason.tolist() == ["first_choice", "first_choice", "empty_answer", "no_candidate_in_answer"]
    # no valid exact answer: no exact-answer position, never some other token in its place
    assert wino.pos_exact_answer_first.tolist()[2:] == [-1, -1]
    assert wino.pos_exact_answer_first.tolist()[0] == 4  # "carpenter." is answer token 1, after 3 prompt tokens


def test_choice_rows_never_ask_the_extractor():
    class Extractor:  # would fail the test if asked
        def __getattr__(self, name):
            raise AssertionError("the extractor was asked")

    questions, _ = load_questions(f"nli:{fixture('mnli.csv')}")
    tok = WordTokenizer()
    answers = ["A fallacy."] * len(questions)
    generations = pd.DataFrame({"id": questions.id, "prompt": "p", "prompt_ids": [[1]] * len(answers),
                                "answer_ids": [tok(a)["input_ids"] for a in answers], "answer": answers, "stopped": True})
    table = label_answers(questions, generations, {}, tok, ["last_q"], extractor=Extractor())
    assert not table.exact_answer_valid.any() and set(table.exact_answer_reason) == {"no_candidate_in_answer"}


def test_questions_without_a_task_column_are_graded_as_before():
    questions = pd.DataFrame({"id": ["a"], "question": ["Capital of France?"], "gold": [["Paris"]], "family": ["x"],
                              "subgroup": [""], "answer_type": [""]})
    tok = WordTokenizer()
    generations = pd.DataFrame({"id": ["a"], "prompt": ["p"], "prompt_ids": [[1]], "answer_ids": [tok("It is Paris.")["input_ids"]],
                                "answer": ["It is Paris."], "stopped": [True]})
    table = label_answers(questions, generations, {}, tok, ["last_q"])
    assert table.correct.tolist() == [True] and table.exact_answer.tolist() == ["Paris"] and table.task.tolist() == ["generic"]


def test_grade_functions_are_the_public_rules():
    assert grade_number("9", "", ["9"], [], "", {})[0]
    assert grade_choice("no", "", ["yes"], ["no"], "", {})[0] is False
