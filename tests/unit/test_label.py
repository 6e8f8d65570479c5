import pandas as pd
import pytest

from truthmap.positions import DEFAULT_POSITIONS, char_span_to_tokens, position_indices, token_char_spans
from truthmap.stages.label import check_labels, label_answers
from truthmap.errors import TruthmapError
from truthmap.grading import alias_match, find_exact_answer
from truthmap.textmatch import Vocabulary


def test_alias_match_whole_word_normalised():
    assert alias_match("The capital of France is Paris.", ["Paris"])[0]
    assert alias_match("It is 19.", ["9"])[0] is False
    assert alias_match("It is 9.0", ["9"])[0]
    assert alias_match("the UNITED states", ["United States", "USA"])[0]


def test_exact_answer_of_correct_answer_is_the_alias():
    text, start, end, reason = find_exact_answer("I think it's Paris, France.", "Capital of France?", ["Paris"], "", {})
    assert (text, reason) == ("Paris", "gold_alias") and (start, end) == (13, 18)


def test_exact_answer_of_wrong_answer_from_vocabulary_skips_question_words():
    vocab = {"city": Vocabulary(["Douala", "Yaounde", "Cameroon"])}
    answer = "The capital of Cameroon is Douala."
    text, start, end, reason = find_exact_answer(answer, "What is the capital of Cameroon?", ["Yaoundé"], "city", vocab)
    assert (text, reason) == ("Douala", "vocabulary") and answer[start:end] == "Douala"


def test_exact_answer_of_wrong_number():
    text, *_, reason = find_exact_answer("12 times 13 is 146.", "What is 12 times 13?", ["156"], "number", {})
    assert (text, reason) == ("146", "number")


@pytest.mark.parametrize("answer,reason", [
    ("", "empty_answer"),
    ("Nothing comes to mind.", "no_candidate_in_answer"),
    ("I do not know.", "refusal"),
    ("The capital of Cameroon is not known yet.", "refusal"),  # not the "exact answer" 'not known yet'
])
def test_exact_answer_absent(answer, reason):
    vocab = {"city": Vocabulary(["Douala"])}
    assert find_exact_answer(answer, "Capital of Cameroon?", ["Yaounde"], "city", vocab) == (None, -1, -1, reason)


@pytest.mark.parametrize("answer,target", [
    ("The capital of France is Paris.", "Paris"),  # leading space inside the token, punctuation after
    ("Paris", "Paris"),  # answer at the very start and very end, no punctuation
    ("It is 12,345 exactly", "12,345"),  # a number split into several tokens
    ("It is Yaoundé.", "Yaoundé"),  # accent split over byte-level tokens
    ("He said 'Kougou'!", "Kougou"),
])
def test_exact_answer_tokens_cover_exactly_the_span(tokenizer, answer, target):
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    spans = token_char_spans(tokenizer, ids, answer)
    assert len(spans) == len(ids) and spans[-1] == (len(answer), len(answer))
    start = answer.index(target)
    first, last = char_span_to_tokens(spans, start, start + len(target), answer)
    covered = tokenizer.decode(ids[first : last + 1])
    assert covered.strip() .strip("'") == target  # the tokens spell the answer, nothing more
    assert target not in tokenizer.decode(ids[first + 1 : last + 1]) and target not in tokenizer.decode(ids[first:last])


def test_spans_fall_back_when_retokenising_differs(tokenizer):
    # "Par" + "is" is not how the tokenizer splits "Paris": offsets come from decoding prefixes
    ids = tokenizer("Par", add_special_tokens=False)["input_ids"] + tokenizer("is", add_special_tokens=False)["input_ids"]
    answer = tokenizer.decode(ids)
    spans = token_char_spans(tokenizer, ids, answer)
    assert spans == [(0, 3), (3, 5)]


def test_position_indices():
    # prompt of 10 tokens, answer of 6 tokens, exact answer = answer tokens 2..3
    index = position_indices(10, 6, (2, 3), DEFAULT_POSITIONS)
    assert index["last_q"] == 9 and index["first_answer"] == 10 and index["second_answer"] == 11
    assert (index["exact_answer_before_first"], index["exact_answer_first"]) == (11, 12)
    assert (index["exact_answer_last"], index["exact_answer_after_last"]) == (13, 14)
    assert index["-1"] == 15 and index["-6"] == 10
    assert index["-7"] == 9 and index["-8"] == 8  # counted over the whole sequence: into the prompt
    assert position_indices(3, 2, None, ["-5", "-6"]) == {"-5": 0, "-6": -1}  # only before the sequence is none


def test_position_indices_edge_cases():
    index = position_indices(5, 1, (0, 0), DEFAULT_POSITIONS)
    assert index["second_answer"] == -1
    assert index["exact_answer_before_first"] == 4  # the token before the answer: the last prompt token
    assert index["exact_answer_after_last"] == -1  # the answer ends on its last token
    assert index["exact_answer_first"] == index["exact_answer_last"] == 5
    none = position_indices(5, 3, None, DEFAULT_POSITIONS)
    assert all(none[p] == -1 for p in DEFAULT_POSITIONS if p.startswith("exact"))


def test_label_answers_table(tokenizer):
    questions = pd.DataFrame({
        "id": ["a", "b", "c"], "question": ["Capital of France?", "Capital of Cameroon?", "Capital of Peru?"],
        "gold": [["Paris"], ["Yaounde"], ["Lima"]], "family": ["cap"] * 3, "subgroup": [""] * 3,
        "answer_type": ["city"] * 3,
    })
    texts = ["The capital is Paris.", "It is Douala.", "I am not sure."]
    prompt = tokenizer("Q: x\nA:", add_special_tokens=False)["input_ids"]
    generations = pd.DataFrame({
        "id": ["a", "b", "c"], "prompt": ["Q: x\nA:"] * 3, "prompt_ids": [prompt] * 3,
        "answer_ids": [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts],
        "answer": texts, "stopped": [True] * 3,
    })
    answers = label_answers(questions, generations, {"city": ["Paris", "Douala", "Lima"]}, tokenizer,
                            DEFAULT_POSITIONS, extractor=None, progress=False)
    assert answers.correct.tolist() == [True, False, False]
    assert answers.exact_answer.tolist() == ["Paris", "Douala", ""]
    assert answers.exact_answer_valid.tolist() == [True, True, False]
    # label-blind (the default): the right answer's "Paris" is found as the wrong answer's "Douala" is
    assert answers.exact_answer_reason.tolist() == ["vocabulary", "vocabulary", "refusal"]  # "I am not sure."
    assert answers.exact_answer_route.tolist() == ["vocabulary", "vocabulary", "refusal"]
    assert answers.gold_span_differs.tolist() == [False, None, None]  # right answers only
    reference = label_answers(questions, generations, {"city": ["Paris", "Douala", "Lima"]}, tokenizer,
                              DEFAULT_POSITIONS, extractor=None, progress=False, exact_answer="gold")
    assert reference.exact_answer_reason.tolist() == ["gold_alias", "vocabulary", "refusal"]
    assert reference.exact_answer_route.tolist() == answers.exact_answer_route.tolist()
    row = answers.iloc[1]
    full = prompt + list(generations.answer_ids[1])
    assert tokenizer.decode(full[row.pos_exact_answer_first : row.pos_exact_answer_last + 1]).strip() == "Douala"
    assert full[row["pos_-1"]] == tokenizer.eos_token_id and row.pos_last_q == len(prompt) - 1
    assert answers.iloc[2].pos_exact_answer_first == -1


def test_all_right_or_all_wrong_is_refused():
    with pytest.raises(TruthmapError, match="every one of the 3 answers is right"):
        check_labels(pd.DataFrame({"correct": [True] * 3}), "answers.parquet")
    with pytest.raises(TruthmapError, match="is wrong"):
        check_labels(pd.DataFrame({"correct": [False] * 3}), "answers.parquet")


def test_exact_answer_outside_every_vocabulary_is_what_the_verb_states():
    vocab = {"city": Vocabulary(["Douala", "Haiti"])}
    answer = "The capital of Haiti is Port-Íloula."
    text, start, end, reason = find_exact_answer(answer, "What is the capital of Haiti?", ["Port-au-Prince"],
                                                 "city", vocab)
    assert (text, reason) == ("Port-Íloula", "stated_after_verb") and answer[start:end] == text


@pytest.mark.parametrize("answer,expected", [
    ("The chemical element with the symbol Ir is also known as Iridion.", "Iridion"),
    ("In the film, Frank Calder was played by John C. Reilly.", "John C. Reilly"),
    ("The main character is a young and brilliant detective.", None),  # no name: describes
    ("The main character is Karen.", None),  # only repeats the question's "Karen"
    ("Nepal is located in the Indian subcontinent.", "Indian subcontinent"),
    ("Denmark is a country in Northern Europe, bordering Norway to the north.", None),  # describes
    ("The chemical element with the symbol Pu is a member of the actinides family of elements.", None),
])
def test_the_phrase_after_the_verb_names_the_answer_or_nothing(answer, expected):
    text, *_ = find_exact_answer(answer, "Which one played Karen?", ["Gold"], "city", {"city": Vocabulary(["Douala"])})
    assert text == expected


def test_a_short_code_in_lower_case_is_a_word_not_a_candidate():
    vocab = {"country": Vocabulary(["TO", "Norway"])}
    text, *_ = find_exact_answer("It lies next to Norway.", "Which country?", ["Sweden"], "country", vocab)
    assert text == "Norway"


def test_an_operand_of_a_working_is_not_the_stated_number():
    text, *_ = find_exact_answer("To add 655 and 724, we need to multiply 655 by 72", "What is 655 plus 724?",
                                 ["1379"], "number", {})
    assert text is None
    assert find_exact_answer("655 plus 724 is 1389.", "What is 655 plus 724?", ["1379"], "number", {})[0] == "1389"


def test_strict_grader_needs_the_located_answer_to_be_a_gold_alias(tokenizer):
    texts = ["Paris", "The capital is Paris, not Lyon.", "The capital is Lyon, not Paris.",
             "The capital is the lovely old city of Paris.", "It is PARIS!", "It is Lyon."]
    ids = [f"q{i}" for i in range(len(texts))]
    questions = pd.DataFrame({
        "id": ids, "question": ["What is the capital of France?"] * len(texts), "gold": [["Paris"]] * len(texts),
        "family": ["cap"] * len(texts), "subgroup": [""] * len(texts), "answer_type": ["city"] * len(texts),
    })
    prompt = tokenizer("Q: x\nA:", add_special_tokens=False)["input_ids"]
    generations = pd.DataFrame({
        "id": ids, "prompt": ["Q: x\nA:"] * len(texts), "prompt_ids": [prompt] * len(texts),
        "answer_ids": [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts],
        "answer": texts, "stopped": [True] * len(texts),
    })
    vocabularies = {"city": ["Paris", "Lyon"]}
    answers = label_answers(questions, generations, vocabularies, tokenizer, DEFAULT_POSITIONS, progress=False)
    assert answers.correct_alias.tolist() == [True, True, True, True, True, False]
    # located without the gold: Paris, Paris, Lyon (stated first), Paris (the vocabulary's city), PARIS
    # (equal once normalised), Lyon
    assert answers.correct_strict.tolist() == [True, True, False, True, True, False]
    assert answers.correct.tolist() == answers.correct_alias.tolist()  # grader: alias (the default)
    strict = label_answers(questions, generations, vocabularies, tokenizer, DEFAULT_POSITIONS, progress=False,
                           grader="strict")
    assert strict.correct.tolist() == [True, True, False, True, True, False]
    # the phrase the verb states, with no vocabulary to find the city in, is not the alias itself
    bare = label_answers(questions, generations, {}, tokenizer, DEFAULT_POSITIONS, progress=False, grader="strict")
    assert bare.correct_alias.tolist() == answers.correct_alias.tolist()
    assert bare.loc[3, "exact_answer"] != "Paris" and not bare.loc[3, "correct_strict"]
    assert bare.loc[0, "exact_answer_valid"] == False and bare.loc[0, "correct_strict"] == False  # noqa: E712
    with pytest.raises(TruthmapError, match="grader 'lenient'"):
        label_answers(questions, generations, vocabularies, tokenizer, DEFAULT_POSITIONS, progress=False,
                      grader="lenient")


def test_the_grader_is_part_of_the_label_stage_fingerprint():
    from truthmap.config import Config
    from truthmap.pipeline import STAGE_TABLE

    settings = STAGE_TABLE["label"].settings
    assert settings(Config(grader="strict"))["grader"] == "strict" != settings(Config())["grader"]
    assert settings(Config(judge_grader=True))["judge_grader"] is True
    with pytest.raises(TruthmapError, match="grader"):
        Config(grader="judge")
