"""The lenient grader: a judge model's next-token " yes" against " no" (stages/label.py's judge_answers),
on a fake model whose logits are set by hand, with the default model's real tokenizer and chat template."""

import functools
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from truthmap.backends import hf
from truthmap.positions import DEFAULT_POSITIONS
from truthmap.errors import TruthmapError
from truthmap.grading import lenient_question
from truthmap.stages.label import JUDGE_WORDS, judge_answers, judge_prompt, label_answers, word_token_ids

QUESTION = "What is the capital of France?"


def _ids(tokenizer, word):
    return [i for i, t in enumerate(tokenizer.batch_decode([[i] for i in range(len(tokenizer))]))
            if t.strip().casefold() == word]


def fake_judge(tokenizer, per_paris: float = 10.0, offset: float = -15.0):
    """A judge whose hidden state at a token counts the tokens so far (causal), and whose head gives every
    spelling of "yes" the logit ``per_paris * (tokens reading "paris" so far) + offset``, every spelling of
    "no" 0, everything else -30. The question names Paris nowhere; the gold line names it once, so an
    answer naming Paris has two (yes: +5), one naming Lyon one (no: -5)."""
    vocab = len(tokenizer)
    paris = _ids(tokenizer, "paris")
    yes, no = word_token_ids(tokenizer, JUDGE_WORDS)

    def base_model(input_ids, use_cache=False):
        counts = torch.nn.functional.one_hot(input_ids, vocab).float().cumsum(dim=1)  # [B, T, V]
        return SimpleNamespace(last_hidden_state=counts)

    def head(hidden):  # [B, V] -> [B, V]
        logits = torch.full_like(hidden, -30.0)
        logits[:, yes] = (per_paris * hidden[:, paris].sum(-1) + offset)[:, None]
        logits[:, no] = 0.0
        return logits

    model = SimpleNamespace(base_model=base_model, get_output_embeddings=lambda: head)
    lm = SimpleNamespace(tokenizer=tokenizer, model=model, device="cpu", head_logits=lambda x: x)
    # the Hugging Face backend's next-token scores, run on this scripted model
    lm.next_token_logprobs = functools.partial(hf.next_token_logprobs, lm)
    return lm


def test_the_judge_reads_yes_against_no_at_the_next_token(tokenizer):
    lm = fake_judge(tokenizer)
    answers = ["The capital is Paris.", "The capital is Lyon.", "Paris, of course."]
    odds, tokens = judge_answers(lm, [QUESTION] * 3, [["Paris"]] * 3, answers, batch_size=2)
    prompts = [judge_prompt(tokenizer, QUESTION, ["Paris"], a) for a in answers]
    assert tokens == sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    k_yes, k_no = (len(ids) for ids in word_token_ids(tokenizer, JUDGE_WORDS))
    spellings = float(torch.log(torch.tensor(k_yes / k_no)))
    # log P(yes) - log P(no), each word's mass summed over its spellings: +5 and -5 (a sign error or
    # swapped words give the opposite)
    assert odds == pytest.approx([5 + spellings, -5 + spellings, 5 + spellings], abs=1e-4)
    assert [bool(v > 0) for v in odds] == [True, False, True]


def test_the_judge_is_asked_the_question_the_gold_and_the_answer(tokenizer):
    text = lenient_question(QUESTION, ["Paris", "City of Light"], "It is Paris.")
    assert QUESTION in text and "expected answers to this question: Paris; City of Light." in text
    assert "The proposed answer is: It is Paris.\n" in text and text.endswith("Respond only with yes or no.")
    prompt = judge_prompt(tokenizer, QUESTION, ["Paris"], "It is Paris.")
    assert prompt.endswith("assistant\n") and "The expected answer is: Paris." in prompt  # the chat's reply turn


def _tables(tokenizer, texts, gold):
    ids = [f"q{i}" for i in range(len(texts))]
    questions = pd.DataFrame({"id": ids, "question": [QUESTION] * len(texts), "gold": gold,
                              "family": ["cap"] * len(texts), "subgroup": [""] * len(texts),
                              "answer_type": ["city"] * len(texts)})
    prompt = tokenizer("Q: x\nA:", add_special_tokens=False)["input_ids"]
    generations = pd.DataFrame({"id": ids, "prompt": ["Q: x\nA:"] * len(texts), "prompt_ids": [prompt] * len(texts),
                                "answer_ids": [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts],
                                "answer": texts, "stopped": [True] * len(texts)})
    return questions, generations


def test_the_lenient_column_sits_beside_the_others_and_becomes_the_label_when_chosen(tokenizer):
    # the fake judge says yes exactly when the answer names Paris: "… Lyon, not Paris." is right by alias
    # and by this judge, wrong by strict (the answer states Lyon)
    texts = ["The capital is Paris.", "The capital is Lyon, not Paris.", "The capital is Lyon.", "", "Paris."]
    gold = [["Paris"]] * 4 + [[]]  # the last question has no gold answer: no grader labels it
    questions, generations = _tables(tokenizer, texts, gold)
    vocabularies = {"city": ["Paris", "Lyon"]}
    lm = fake_judge(tokenizer)
    plain = label_answers(questions, generations, vocabularies, tokenizer, DEFAULT_POSITIONS, progress=False)
    assert "correct_lenient" not in plain.columns  # no judge asked
    judged = label_answers(questions, generations, vocabularies, tokenizer, DEFAULT_POSITIONS, progress=False,
                           judge=lm)
    assert judged.correct_alias.tolist()[:4] == [True, True, False, False]
    assert judged.correct_strict.tolist()[:4] == [True, False, False, False]
    assert judged.correct_lenient.tolist()[:4] == [True, True, False, False]  # the empty answer: wrong, not asked
    assert judged.correct.tolist() == judged.correct_alias.tolist()  # the default grader
    assert judged.loc[4, ["correct", "correct_alias", "correct_strict", "correct_lenient"]].isna().all()
    assert judged.attrs["judge"]["calls"] == 3  # not the empty answer, not the question without gold
    assert judged.lenient_log_odds[3:].isna().all() and (judged.lenient_log_odds[:3] > 0).tolist() == [True, True, False]
    # a judge that says no to everything: the lenient label, chosen, follows it alone
    never = fake_judge(tokenizer, per_paris=0.0, offset=-20.0)
    lenient = label_answers(questions, generations, vocabularies, tokenizer, DEFAULT_POSITIONS, progress=False,
                            judge=never, grader="lenient")
    assert lenient.correct.tolist()[:4] == lenient.correct_lenient.tolist()[:4] == [False] * 4
    assert lenient.correct_alias.tolist()[:4] == [True, True, False, False]
    with pytest.raises(TruthmapError, match="grader 'lenient' needs the judge"):
        label_answers(questions, generations, vocabularies, tokenizer, DEFAULT_POSITIONS, progress=False,
                      grader="lenient")


def test_sampled_answers_carry_every_graders_column_and_the_runs_grader(tokenizer):
    from truthmap.analyses.resample import label_resamples

    questions, generations = _tables(tokenizer, ["The capital is Paris."], [["Paris"]])
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    samples = ["It is Paris.", "Lyon, not Paris.", "Lyon."]
    drawn = [[(encode(a), True) for a in samples]]
    lm = fake_judge(tokenizer)
    plain = label_resamples(lm, questions, generations, drawn, {"city": ["Paris", "Lyon"]}, ["-1"])
    assert {"correct_alias", "correct_strict"} <= set(plain.columns) and "correct_lenient" not in plain.columns
    judged = label_resamples(lm, questions, generations, drawn, {"city": ["Paris", "Lyon"]}, ["-1"], judge=lm,
                             grader="strict")
    assert judged.correct_alias.tolist() == [True, True, False]
    assert judged.correct_strict.tolist() == judged.correct.tolist() == [True, False, False]  # the run's grader
    assert judged.correct_lenient.tolist() == [True, True, False]
    assert judged.attrs["judge"]["calls"] == 3
