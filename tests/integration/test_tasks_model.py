"""Model-backed (small): the default model answers 18 questions of six tasks in one table; every task's
prompt reaches the model through the chat template, and every exact answer maps onto answer tokens."""

from pathlib import Path

import pandas as pd
import pytest

from truthmap.data import load_questions
from truthmap.stages.generate import run_generate
from truthmap.positions import DEFAULT_POSITIONS
from truthmap.stages.label import label_answers
from truthmap.textmatch import canonical_number, normalize

pytestmark = pytest.mark.model
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SOURCES = {"winobias": "winobias.csv", "winogrande": "winogrande.csv", "nli": "mnli.csv", "math": "math.csv",
           "imdb": "imdb.jsonl", "triviaqa": "triviaqa_rc_nocontext.jsonl"}
PER_TASK = 3


@pytest.fixture(scope="module")
def labelled(default_model):
    tables = []
    for task, name in SOURCES.items():
        table, _ = load_questions(f"{task}:{FIXTURES / name}", limit=PER_TASK, seed=1)
        tables.append(table.assign(id=task + "-" + table.id))
    questions = pd.concat(tables, ignore_index=True)
    generations = run_generate(default_model, questions, max_new_tokens=24, progress=False)
    answers = label_answers(questions, generations, {}, default_model.tokenizer, DEFAULT_POSITIONS, extractor=None,
                            progress=False)
    return questions, generations, answers


def test_each_task_prompt_goes_through_the_chat_template(labelled):
    questions, generations, _ = labelled
    prompts = dict(zip(generations.id, generations.prompt))
    for row in questions.itertuples():
        prompt = prompts[row.id]
        assert "<|im_start|>user" in prompt and prompt.rstrip().endswith("<|im_start|>assistant")
        expected = {"math": "Answer shortly.", "imdb": "Start with either 'positive' or 'negative'.",
                    "triviaqa": "Answer briefly.", "winobias": "Who does the pronoun"}.get(row.task, row.question)
        assert expected in prompt, (row.task, prompt)


def test_exact_answers_follow_each_tasks_rule_and_sit_on_answer_tokens(labelled, tokenizer):
    questions, generations, answers = labelled
    options = {row.id: (list(row.gold), list(row.wrong_answers)) for row in questions.itertuples()}
    ids = dict(zip(generations.id, generations.prompt_ids.map(list) + generations.answer_ids.map(list)))
    assert len(answers) == PER_TASK * len(SOURCES) and set(answers.task) == set(SOURCES)
    for row in answers.itertuples():
        if not row.exact_answer_valid:
            assert row.pos_exact_answer_first == -1 and row.exact_answer == ""
            continue
        assert row.answer[row.exact_answer_start : row.exact_answer_end] == row.exact_answer
        covered = tokenizer.decode(ids[row.id][row.pos_exact_answer_first : row.pos_exact_answer_last + 1])
        assert normalize(row.exact_answer) in normalize(covered), (row.exact_answer, covered)
        gold, wrong = options[row.id]
        if row.task in ("winobias", "winogrande", "nli", "imdb"):
            assert row.exact_answer_reason == "first_choice"
            assert row.correct == (normalize(row.exact_answer) in {normalize(g) for g in gold})
            assert normalize(row.exact_answer) in {normalize(o) for o in gold + wrong}
        elif row.task == "math":
            assert row.exact_answer_reason == "number" and canonical_number(row.exact_answer.replace(",", "")) is not None
            assert row.correct == (canonical_number(row.exact_answer) in gold)
