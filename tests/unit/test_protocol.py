"""The two generation protocols (brief, reference): each task's prompts and answer length under both,
and a model without a chat template stopped at its first line break and graded on that line."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _synthetic import fake_model

from truthmap.backends import hf
from truthmap.stages import generate
from truthmap.cli import app
from truthmap.config import Config, load_config
from truthmap.data import load_questions
from truthmap.errors import TruthmapError
from truthmap.stages.generate import decode_answer, run_generate, task_prompts
from truthmap.tasks import REGISTRY, answer_length

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


class ChatTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return f"<user>{messages[0]['content']}</user><assistant>"


class BaseTokenizer:
    chat_template = None


def first(dataset, protocol):
    """(chat prompt, base prompt) of the first question of ``dataset`` under ``protocol``."""
    table, _ = load_questions(dataset, protocol=protocol)
    return (task_prompts(ChatTokenizer(), table.head(1), protocol=protocol)[0],
            task_prompts(BaseTokenizer(), table.head(1), protocol=protocol)[0])


RED_PLANET = "Which planet is known as the Red Planet?"
CARMEN = "In which country was the composer of the opera Carmen born?"


@pytest.mark.parametrize("dataset, brief, reference", [
    (f"triviaqa:{FIXTURES / 'triviaqa_rc_nocontext.jsonl'}",
     (f"<user>{RED_PLANET} Answer briefly.</user><assistant>", f"Q: {RED_PLANET}\nA:"),
     (f"<user>{RED_PLANET}</user><assistant>", f"Q: {RED_PLANET}\nA:")),
    (f"movies:{FIXTURES / 'movie_qa.csv'}",
     ("<user>Who acted as Rick Blaine in the movie 'Casablanca'? Answer briefly.</user><assistant>",
      "Q: Who acted as Rick Blaine in the movie 'Casablanca'?\nA:"),
     ("<user>Who acted as Rick Blaine in the movie 'Casablanca'?</user><assistant>",
      "Q: Who acted as Rick Blaine in the movie 'Casablanca'?\nA:")),
    (f"hotpotqa:{FIXTURES / 'hotpotqa_distractor.jsonl'}",
     (f"<user>{CARMEN} Answer briefly.</user><assistant>", f"Q: {CARMEN}\nA:"),
     (f"<user>{CARMEN}</user><assistant>", f"Q: {CARMEN}\nA:")),
    (f"math:{FIXTURES / 'math.csv'}",
     ("<user>A baker has 9 trays with 4 rolls each. He sells 17 rolls. How many rolls are left? Answer shortly."
      "</user><assistant>",
      "Q: A baker has 9 trays with 4 rolls each. He sells 17 rolls. How many rolls are left?\nA:"),
     ("<user>A baker has 9 trays with 4 rolls each. He sells 17 rolls. How many rolls are left? Answer shortly."
      "</user><assistant>",
      "Q: A baker has 9 trays with 4 rolls each. He sells 17 rolls. How many rolls are left?\nA:")),
    (f"nq_context:{FIXTURES / 'nq_wc.csv'}",
     ("<user>Context: The Declaration of Independence was drafted by Thomas Jefferson and adopted by the "
      "Continental Congress on July 4, 1776.\n\nQuestion: who wrote the declaration of independence Answer briefly."
      "</user><assistant>",
      "Context: The Declaration of Independence was drafted by Thomas Jefferson and adopted by the Continental "
      "Congress on July 4, 1776.\n\nQ: who wrote the declaration of independence\nA:"),
     ("<user>The Declaration of Independence was drafted by Thomas Jefferson and adopted by the Continental "
      "Congress on July 4, 1776.\nwho wrote the declaration of independence</user><assistant>",
      "Context:The Declaration of Independence was drafted by Thomas Jefferson and adopted by the Continental "
      "Congress on July 4, 1776.\nQ: who wrote the declaration of independence\nA:")),
    (f"winobias:{FIXTURES / 'winobias.csv'}",
     ("<user>The carpenter thanked the librarian because he found the book. Who does the pronoun 'he' refer to?"
      "</user><assistant>",
      "The carpenter thanked the librarian because he found the book. The pronoun 'he' refers to the"),
     ("<user>The carpenter thanked the librarian because he found the book. Who does the pronoun 'he' refer to?"
      "</user><assistant>",
      "The carpenter thanked the librarian because he found the book. The pronoun 'he' refers to the")),
    (f"winogrande:{FIXTURES / 'winogrande.csv'}",
     ("<user>The suitcase would not close around the coat because the _ was too big. What does the blank refer "
      "to in the sentence?</user><assistant>",
      "Question: Mia lent her umbrella to Zoe because _ was going out in the rain. Who does the blank refer to in "
      "the sentence?\nAnswer: Zoe\n\nQuestion: The suitcase would not close around the coat because the _ was "
      "too big. What does the blank refer to in the sentence?\nAnswer:"),
     ("<user>The suitcase would not close around the coat because the _ was too big. What does the blank refer "
      "to in the sentence?</user><assistant>",
      "Mia lent her umbrella to Zoe because _ was going out in the rain. The blank refers to: Zoe\n"
      "The suitcase would not close around the coat because the _ was too big. The blank refers to:")),
    (f"nli:{FIXTURES / 'mnli.csv'}",
     ('<user>For the statement, "A man is playing a guitar on stage", does the hypothesis "A person is making '
      'music" represent entailment, contradiction, or neutrality?</user><assistant>',
      'Q: For the statement, "A man is playing a guitar on stage", does the hypothesis "A person is making '
      'music" represent entailment, contradiction, or neutrality?\nA:'),
     ('<user>For the statement, "A man is playing a guitar on stage", does the hypothesis "A person is making '
      'music" represent entailment, contradiction, or neutrality?</user><assistant>',
      'Q: For the statement, "A man is playing a guitar on stage", does the hypothesis "A person is making '
      'music" represent entailment, contradiction, or neutrality?\nA:')),
])
def test_prompts_of_each_task_under_both_protocols(dataset, brief, reference):
    assert first(dataset, "brief") == brief
    assert first(dataset, "reference") == reference


def test_imdb_reference_prompt_is_the_reference_instruction():
    chat, base = first(f"imdb:{FIXTURES / 'imdb.jsonl'}", "reference")
    assert chat.startswith('<user>Classify the following movie reviews as either "positive" or "negative". Start '
                           "with either 'positive' or 'negative' first, then elaborate.\nReview: A wonderful film.")
    assert chat.endswith("\nLabel:</user><assistant>")
    assert base.startswith('Classify the following movie reviews as either "positive" or "negative".\nReview: ')
    assert base.endswith("\nLabel:") and "elaborate" not in base


def test_hotpotqa_context_shows_supporting_paragraphs_brief_and_every_paragraph_reference():
    dataset = f"hotpotqa_context:{FIXTURES / 'hotpotqa_distractor.jsonl'}"
    brief_table, _ = load_questions(dataset)
    reference_table, _ = load_questions(dataset, protocol="reference")
    assert brief_table.context[0] == ("Carmen: Carmen is an opera in four acts by Georges Bizet. It premiered in "
                                      "Paris in 1875.\nGeorges Bizet: Georges Bizet was a composer of the Romantic "
                                      "era. He was born in Paris, France, in 1838.")
    # every sentence of every paragraph, the distractor (Aida) too, one a line, no titles
    assert reference_table.context[0] == ("Carmen is an opera in four acts by Georges Bizet.\nIt premiered in Paris "
                                          "in 1875.\nGeorges Bizet was a composer of the Romantic era.\nHe was born "
                                          "in Paris, France, in 1838.\nAida is an opera by Giuseppe Verdi.\nIt is set "
                                          "in ancient Egypt.")
    chat, base = first(dataset, "reference")
    assert chat == f"<user>{reference_table.context[0]}\n{CARMEN}</user><assistant>"
    assert base == f"Q: {reference_table.context[0]}\n{CARMEN}\nA:"
    assert first(dataset, "brief")[0].startswith("<user>Context: Carmen: Carmen is an opera")


def test_facts_and_generic_ask_the_bare_question_under_reference(tmp_path):
    table, _ = load_questions("facts", limit=1, protocol="reference")
    assert task_prompts(ChatTokenizer(), table, protocol="reference") == [
        f"<user>{table.question[0]}</user><assistant>"]
    path = tmp_path / "q.csv"
    path.write_text("question,answer\nCapital of France?,Paris\n")
    table, _ = load_questions(str(path), protocol="reference")
    assert task_prompts(ChatTokenizer(), table, protocol="reference") == ["<user>Capital of France?</user><assistant>"]
    # a user's template still replaces the chat prompt
    assert task_prompts(ChatTokenizer(), table, "Say: {question}", "reference") == [
        "<user>Say: Capital of France?</user><assistant>"]


def test_answer_length_of_each_protocol():
    assert answer_length(["facts"]) == 24 and answer_length(["math"]) == 64
    assert answer_length(["facts"], None, "reference") == 100 and answer_length(["math"], None, "reference") == 200
    assert answer_length(["facts", "math"], None, "reference") == 200
    assert answer_length(["math"], 12, "reference") == 12  # a configured length wins
    for task in REGISTRY.values():
        assert task.answer_tokens("reference") == (200 if task.name == "math" else 100), task.name


def test_the_protocol_is_a_setting_with_a_clear_error():
    assert Config().protocol == "brief" and load_config(None, protocol="reference").protocol == "reference"
    with pytest.raises(TruthmapError, match="protocol: 'bare' is not a choice; use one of brief, reference"):
        load_config(None, protocol="bare")
    with pytest.raises(TruthmapError, match="protocol 'bare'"):
        load_questions("facts", protocol="bare")


def test_the_cli_flag_reaches_the_generate_stage(tmp_path, monkeypatch):
    seen = {}

    def fake_run_stages(config, stages=None, force=False, given=None):
        seen["protocol"] = config.protocol
        return tmp_path

    monkeypatch.setattr("truthmap.pipeline.run_stages", fake_run_stages)
    app(["generate", "--protocol", "reference", "--out", str(tmp_path / "run")])
    assert seen["protocol"] == "reference"


def test_the_protocol_is_part_of_the_generate_fingerprint():
    from truthmap import pipeline

    stamps = [pipeline.STAGE_TABLE["generate"].settings(Config(protocol=protocol)) for protocol in ("brief", "reference")]
    assert stamps[0]["protocol"] == "brief" and stamps[1]["protocol"] == "reference"
    assert {k: v for k, v in stamps[0].items() if k != "protocol"} == \
        {k: v for k, v in stamps[1].items() if k != "protocol"}


# ------------------------------------------------------------------ stopping at the first line break

class TinyTokenizer:
    """Ten tokens; 5 is "\\n", 6 is ".\\n" (a merged line break), 9 is the end-of-turn token."""

    texts = {0: "<pad>", 1: " Paris", 2: " is", 3: " the", 4: " capital", 5: "\n", 6: ".\n", 7: "Q:", 8: " Rome",
             9: "<eot>"}
    pad_token_id, eos_token_id = 0, 9
    all_special_ids = [0, 9]

    def __init__(self, chat_template):
        self.chat_template = chat_template

    def __len__(self):
        return len(self.texts)

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.texts[i] for i in ids if not (skip_special_tokens and i in self.all_special_ids))

    def batch_decode(self, sequences):
        return [self.decode(ids) for ids in sequences]

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 5 + 1 for c in text]}

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return f"<u>{messages[0]['content']}</u>"


class ScriptedModel:
    """Answers every prompt with ``script``, stopping (and padding) at the first of ``eos_token_id``, as
    transformers' generate does."""

    def __init__(self, script):
        self.script = script
        self.generation_config = SimpleNamespace(eos_token_id=9)
        self.calls = []

    def parameters(self):  # where the model is: the CPU
        yield torch.zeros(1)

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id, **kwargs):
        self.calls.append(list(eos_token_id))
        rows = []
        for prompt in input_ids.tolist():
            out = []
            for t in self.script[:max_new_tokens]:
                out.append(t)
                if t in eos_token_id:
                    break
            rows.append(prompt + out + [pad_token_id] * (max_new_tokens - len(out)))
        return torch.tensor(rows)


def scripted_lm(script, chat_template):
    return fake_model(model=ScriptedModel(script), tokenizer=TinyTokenizer(chat_template))


def generations(lm, questions=None, max_new_tokens=10):
    questions = load_questions("facts", limit=2)[0] if questions is None else questions
    return run_generate(lm, questions, max_new_tokens=max_new_tokens, progress=False)


@pytest.fixture(autouse=True)
def _no_context_limit(monkeypatch):
    monkeypatch.setattr(generate, "prompt_room", lambda lm, n: None)


@pytest.mark.parametrize("line_break", [5, 6])
def test_a_model_without_a_chat_template_stops_at_its_first_line_break(line_break):
    # " Paris is the capital" then a line break, then a made-up next question
    lm = scripted_lm([1, 2, 3, 4, line_break, 7, 8, 5, 7], chat_template=None)
    assert set(lm.end_of_turn_ids()) == {5, 6, 9}
    table = generations(lm)
    assert table.answer_ids.map(list).tolist() == [[1, 2, 3, 4, line_break]] * 2
    # the line, without its line break (a merged ".\n" leaves its period on the line)
    assert table.answer.tolist() == [" Paris is the capital" + ("." if line_break == 6 else "")] * 2
    assert table.stopped.all()
    assert 5 in lm.model.calls[0] and 6 in lm.model.calls[0]


def test_a_chat_model_is_not_stopped_by_a_line_break():
    lm = scripted_lm([1, 5, 8, 9, 7], chat_template="{{ messages }}")
    assert lm.end_of_turn_ids() == [9]
    table = generations(lm)
    assert table.answer_ids.map(list).tolist() == [[1, 5, 8, 9]] * 2
    assert table.answer.tolist() == [" Paris\n Rome"] * 2 and table.stopped.all()


def test_an_answer_cut_by_the_length_limit_is_not_stopped():
    lm = scripted_lm([1, 2, 3, 4, 5], chat_template=None)
    table = generations(lm, max_new_tokens=3)
    assert table.answer_ids.map(list).tolist() == [[1, 2, 3]] * 2 and not table.stopped.any()


def test_graded_on_the_first_line(monkeypatch):
    from truthmap.stages.label import label_answers

    # right on the first line, a wrong made-up follow-up after it: graded right
    lm = scripted_lm([1, 5, 7, 8], chat_template=None)
    questions = load_questions("facts", limit=1)[0].assign(gold=[["Paris"]], answer_type="free_text", family="x")
    table = generations(lm, questions)
    assert decode_answer(lm.tokenizer, [1, 5, 7, 8]) == " Paris"
    monkeypatch.setattr("truthmap.stages.label.token_char_spans", lambda tok, ids, text: [(0, 6), (6, 6)])
    labelled = label_answers(questions, table, {}, lm.tokenizer, ["-1"], extractor=None, progress=False)
    assert labelled.correct.tolist() == [True] and labelled.answer.tolist() == [" Paris"]
    # the same ids from a chat model are graded on the whole text: Rome is named too
    assert decode_answer(TinyTokenizer("{{ messages }}"), [1, 5, 7, 8]) == " Paris\nQ: Rome"


def _sized_model(device: str):
    """What auto_batch_size reads of a model: 30 layers, 3 KV heads of 64, a 49152-token vocabulary."""
    config = SimpleNamespace(num_key_value_heads=3, num_attention_heads=9, head_dim=64, hidden_size=576,
                             vocab_size=49152)
    config.get_text_config = lambda: config
    return SimpleNamespace(device=torch.device(device), n_layers=30,
                           model=SimpleNamespace(config=config, dtype=torch.float32))


def test_cpu_batch_size_is_the_cap_when_memory_allows_and_shrinks_when_it_does_not(monkeypatch):
    lm = _sized_model("cpu")
    per_sequence = hf._bytes_per_sequence(lm, 100)
    assert per_sequence > 100 * 2 * 30 * 3 * 64 * 4  # at least the KV cache of 100 tokens
    pages = {"SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(hf.os, "sysconf", lambda name: pages[name])
    pages["SC_AVPHYS_PAGES"] = (1 << 35) // 4096  # 32 GiB available
    assert hf.auto_batch_size(lm, 100) == hf.CPU_BATCH
    pages["SC_AVPHYS_PAGES"] = 10 * per_sequence * 4 // 4096  # a quarter of it holds ten sequences
    assert hf.auto_batch_size(lm, 100) in (9, 10)
    pages["SC_AVPHYS_PAGES"] = 0
    assert hf.auto_batch_size(lm, 100) == 1

    def missing(name):
        raise ValueError(name)

    monkeypatch.setattr(hf.os, "sysconf", missing)  # no such counters: the cap
    assert hf.auto_batch_size(lm, 100) == hf.CPU_BATCH


@pytest.mark.parametrize("answer, question, gold, brief, reference", [
    ("It is in PARIS.", "What is the capital of France?", ["Paris"], True, True),  # case-insensitive in both
    ("Parisian cooking.", "What is the capital of France?", ["Paris"], False, True),  # no word boundary
    ("The answer is the result of the division by 9.", "What is 81 divided by 9?", ["9"], False, True),  # operand
    ("It is Lyon.", "What is the capital of France?", ["Paris"], False, False),
])
def test_reference_grades_an_alias_that_is_a_substring_of_the_answer(answer, question, gold, brief, reference):
    from truthmap.grading import grade

    assert grade("alias", answer, question, gold, [], "", {})[0] is brief
    correct, _, span = grade("alias", answer, question, gold, [], "", {}, substring=True)
    assert correct is reference
    if correct:  # the gold span is where the alias occurs in the answer
        assert answer[span[0] : span[1]].lower() == gold[0].lower()


def test_the_label_stage_grades_by_substring_under_the_reference_protocol(tokenizer):
    import pandas as pd

    from truthmap.pipeline import STAGE_TABLE
    from truthmap.stages.label import label_answers

    rows = [("What is the capital of France?", "Parisian cooking.", ["Paris"]),
            ("What is the capital of Peru?", "Lima.", ["Lima"]),
            ("Which side won the game?", "Our side did.", ["yes"])]  # a choice-graded task is not affected
    questions = pd.DataFrame({"id": ["a", "b", "c"], "question": [q for q, _, _ in rows], "gold": [g for *_, g in rows],
                              "family": "", "subgroup": "", "answer_type": "", "task": ["facts", "facts", "winobias"],
                              "wrong_answers": [[], [], ["no"]]})
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    generations = pd.DataFrame({"id": questions.id, "prompt": questions.question,
                                "prompt_ids": [encode(q) for q, _, _ in rows],
                                "answer_ids": [encode(a) for _, a, _ in rows], "answer": [a for _, a, _ in rows],
                                "stopped": True})
    graded = {p: label_answers(questions, generations, {}, tokenizer, ["-1"], progress=False, protocol=p)
              for p in ("brief", "reference")}
    assert graded["brief"].correct.tolist() == [False, True, False]
    assert graded["reference"].correct.tolist() == [True, True, False]
    with pytest.raises(TruthmapError, match="protocol 'paper'"):
        label_answers(questions, generations, {}, tokenizer, ["-1"], progress=False, protocol="paper")
    settings = STAGE_TABLE["label"].settings
    assert settings(Config(protocol="reference"))["protocol"] != settings(Config())["protocol"]
