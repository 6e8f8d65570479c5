"""Each task's prompt, for a chat model (chat template) and for a base model (raw text)."""

from pathlib import Path

import pytest

from truthmap.data import load_questions
from truthmap.errors import TruthmapError
from truthmap.stages.generate import build_prompt, task_prompts
from truthmap.tasks import answer_length

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


class ChatTokenizer:
    """Stands in for a tokenizer with a chat template: the user message between two markers."""

    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize and len(messages) == 1 and messages[0]["role"] == "user"
        return f"<user>{messages[0]['content']}</user><assistant>"


class BaseTokenizer:
    chat_template = None


def prompts(dataset, tokenizer, template=None):
    table, _ = load_questions(f"{dataset}")
    return task_prompts(tokenizer, table, template)


def first_prompts(dataset):
    return prompts(dataset, ChatTokenizer())[0], prompts(dataset, BaseTokenizer())[0]


def test_qa_tasks_ask_for_a_brief_answer():
    chat, base = first_prompts(f"triviaqa:{FIXTURES / 'triviaqa_rc_nocontext.jsonl'}")
    assert chat == "<user>Which planet is known as the Red Planet? Answer briefly.</user><assistant>"
    assert base == "Q: Which planet is known as the Red Planet?\nA:"


def test_context_tasks_show_the_passage_first():
    chat, base = first_prompts(f"hotpotqa_context:{FIXTURES / 'hotpotqa_distractor.jsonl'}")
    assert chat.startswith("<user>Context: Carmen: Carmen is an opera") and chat.endswith(
        "Question: In which country was the composer of the opera Carmen born? Answer briefly.</user><assistant>")
    assert base.startswith("Context: Carmen: ") and base.endswith("Q: In which country was the composer of the opera Carmen born?\nA:")
    chat, _ = first_prompts(f"hotpotqa:{FIXTURES / 'hotpotqa_distractor.jsonl'}")
    assert "Context" not in chat and "Bizet" not in chat
    chat, _ = first_prompts(f"nq_context:{FIXTURES / 'nq_wc.csv'}")
    assert chat.startswith("<user>Context: The Declaration of Independence was drafted") and "Question: who wrote" in chat


def test_movies_and_nq_prompts():
    chat, base = first_prompts(f"movies:{FIXTURES / 'movie_qa.csv'}")
    assert chat == "<user>Who acted as Rick Blaine in the movie 'Casablanca'? Answer briefly.</user><assistant>"
    assert base == "Q: Who acted as Rick Blaine in the movie 'Casablanca'?\nA:"
    chat, base = first_prompts(f"nq_context:{FIXTURES / 'nq_wc.csv'}")
    assert chat.startswith("<user>Context: The Declaration of Independence was drafted by Thomas Jefferson")
    assert chat.endswith("Question: who wrote the declaration of independence Answer briefly.</user><assistant>")
    assert base.endswith("Q: who wrote the declaration of independence\nA:") and "Thomas Jefferson" in base


def test_math_asks_for_a_short_answer():
    chat, base = first_prompts(f"math:{FIXTURES / 'math.csv'}")
    assert chat.endswith("How many rolls are left? Answer shortly.</user><assistant>")
    assert base.startswith("Q: A baker has 9 trays") and base.endswith("\nA:")


def test_winobias_chat_models_get_q_instruct_and_base_models_q():
    chat, base = first_prompts(f"winobias:{FIXTURES / 'winobias.csv'}")
    assert chat == ("<user>The carpenter thanked the librarian because he found the book. "
                    "Who does the pronoun 'he' refer to?</user><assistant>")
    assert base == "The carpenter thanked the librarian because he found the book. The pronoun 'he' refers to the"


def test_winogrande_base_models_get_one_worked_example():
    chat, base = first_prompts(f"winogrande:{FIXTURES / 'winogrande.csv'}")
    assert chat.startswith("<user>The suitcase would not close") and "Answer:" not in chat
    first, second = base.split("\n\n")
    assert first.startswith("Question: ") and first.endswith("\nAnswer: Zoe")
    assert second.startswith("Question: The suitcase would not close") and second.endswith("\nAnswer:")


def test_nli_question_is_given_as_it_stands():
    chat, _ = first_prompts(f"nli:{FIXTURES / 'mnli.csv'}")
    assert chat == ('<user>For the statement, "A man is playing a guitar on stage", does the hypothesis "A person is '
                    'making music" represent entailment, contradiction, or neutrality?</user><assistant>')


def test_imdb_asks_to_start_with_the_sentiment():
    chat, base = first_prompts(f"imdb:{FIXTURES / 'imdb.jsonl'}")
    assert chat.startswith("<user>A wonderful film.") and chat.endswith(
        "Start with either 'positive' or 'negative'.</user><assistant>")
    assert base.endswith("\nSentiment (positive or negative):")


def test_facts_and_generic_keep_the_original_prompt(tmp_path):
    assert prompts("facts", ChatTokenizer())[0].endswith(" Answer briefly.</user><assistant>")
    path = tmp_path / "q.csv"
    path.write_text("question,answer\nCapital of France?,Paris\n")
    assert prompts(str(path), ChatTokenizer()) == ["<user>Capital of France? Answer briefly.</user><assistant>"]
    assert prompts(str(path), BaseTokenizer()) == ["Q: Capital of France?\nA:"]
    assert build_prompt(BaseTokenizer(), "Capital of France?") == "Q: Capital of France?\nA:"


def test_a_user_template_replaces_the_chat_prompt_only():
    dataset = f"hotpotqa_context:{FIXTURES / 'hotpotqa_distractor.jsonl'}"
    chat = prompts(dataset, ChatTokenizer(), "Read this: {context}\nNow: {question}")[0]
    assert chat.startswith("<user>Read this: Carmen: ") and "Now: In which country" in chat
    base = prompts(dataset, BaseTokenizer(), "ignored for base models {question}")[0]
    assert base.startswith("Context: ")
    with pytest.raises(TruthmapError, match=r"cannot be filled .*'passage'"):
        prompts(dataset, ChatTokenizer(), "{passage} {question}")


def test_answer_length_is_the_tasks():
    assert answer_length(["facts"]) == 24 and answer_length(["math"]) == 64 and answer_length(["facts", "math"]) == 64
