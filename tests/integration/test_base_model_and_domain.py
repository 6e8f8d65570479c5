"""Model-backed: the default model without its chat template (a base model) answers one line, and a
detector says when an answer it scores is not the model's own."""

import numpy as np
import pandas as pd
import pytest
import torch

from truthmap import Detector, ModelScorer
from truthmap.cli import app
from truthmap.data import load_questions
from truthmap.stages.generate import build_prompt, run_generate
from truthmap.constants import DEFAULT_MODEL

pytestmark = pytest.mark.model

PERU = "What is the capital of Peru?"
BOGOTA = "The capital of Peru is Bogotá."


@pytest.fixture
def base_model(default_model, monkeypatch):
    """The default model as a base model: its tokenizer without a chat template (put back after the test)."""
    monkeypatch.setattr(default_model.tokenizer, "chat_template", None)
    return default_model


def test_a_base_model_stops_at_its_first_line_break_and_is_graded_on_that_line(base_model):
    from truthmap.stages.label import label_answers

    questions, vocabularies = load_questions("facts", limit=4)
    table = run_generate(base_model, questions, max_new_tokens=40, progress=False, protocol="reference")
    assert table.prompt[0].startswith("Q: ") and table.prompt[0].endswith("\nA:")
    tok = base_model.tokenizer
    last = [tok.decode(list(ids)[-1:]) for ids in table.answer_ids]
    assert table.stopped.all() and table.answer_ids.map(len).max() < 40  # each stopped on its own
    assert sum("\n" in text for text in last) >= 2  # most at a line break (the rest at end-of-turn)
    for ids, answer, end in zip(table.answer_ids, table.answer, last):
        assert "\n" in end or list(ids)[-1] == tok.eos_token_id
        assert "\n" not in tok.decode(list(ids)[:-1])  # nothing after the first line break
        assert answer == tok.decode(list(ids)[:-1], skip_special_tokens=True)  # the line, without its break
    # without the line break as a stop, this model goes on past the line (the made-up next "Q: …")
    eos_only = [t for t in base_model.end_of_turn_ids() if t in (tok.eos_token_id, base_model.model.generation_config.eos_token_id)]
    from truthmap.backends.hf import answer_prompts

    longer, _ = answer_prompts(base_model, table.prompt_ids.map(list).tolist(), 40, 4, eos_only)
    assert any("\n" in tok.decode(ids).strip() for ids, _ in longer)
    answers = label_answers(questions, table, vocabularies, tok, ["-1"], extractor=None, progress=False)
    assert answers.answer.tolist() == table.answer.tolist()  # the line is what was graded


def synthetic_detector(lm, folder) -> Detector:
    """A detector on the default model's residual layer 10, last answer token, with the chat prompt frame
    of the default study (its weights do not matter here: the domain check does not read them)."""
    prompt = build_prompt(lm.tokenizer, "QUESTION")
    prefix, suffix = prompt.split("QUESTION")
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, lm.hidden_size)), np.arange(40) % 2
    card = {"model": DEFAULT_MODEL, "model_revision": lm.revision, "site": "residual", "layer": 10,
            "position": "-1", "prompt_prefix": prefix, "prompt_suffix": suffix, "max_new_tokens": 24}
    Detector(card=card).fit(X, y).save(folder)
    return Detector.load(folder)


def test_score_says_when_an_answer_is_not_the_models_own(default_model, tmp_path, monkeypatch, capsys):
    detector = synthetic_detector(default_model, tmp_path / "det")
    scorer = ModelScorer(detector, default_model)
    own = scorer.ask(PERU)[0]["answer"].strip()
    assert "Bogot" not in own  # the model answers otherwise (else this test shows nothing)
    checked = scorer.own_answers([PERU, PERU], [BOGOTA, own])
    assert [c["own_answer"] for c in checked] == [False, True]
    assert checked[0]["model_answer"] == checked[1]["model_answer"] == own
    assert checked[1]["answer_logprob"] > checked[0]["answer_logprob"]
    # the mean log-probability of the own answer, recomputed here from one forward pass
    from truthmap.analyses.detector import answer_token_ids

    prompt, answer = scorer.prompt_ids(default_model, PERU), answer_token_ids(default_model, own)
    with torch.inference_mode():
        logits = default_model.model(input_ids=torch.tensor([prompt + answer])).logits[0].float()
    logp = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1].gather(1, torch.tensor(answer)[:, None])
    assert checked[1]["answer_logprob"] == pytest.approx(logp.mean().item(), abs=1e-4)

    # the command: a column per check, and a warning naming the question of the answer that is not its own
    monkeypatch.setattr("truthmap.backends.hf.load_model", lambda *args, **kwargs: default_model)
    pairs = tmp_path / "pairs.csv"
    pd.DataFrame({"question": [PERU, PERU], "answer": [BOGOTA, own]}).to_csv(pairs, index=False)
    app(["score", "--detector", str(tmp_path / "det"), "--file", str(pairs)])
    printed = capsys.readouterr()
    warnings = [line for line in printed.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and PERU in warnings[0] and "not the model's own" in warnings[0]
    assert own in warnings[0]  # it says what the model answers instead
    scored = pd.read_csv(tmp_path / "pairs.scored.csv")
    assert scored.own_answer.tolist() == [False, True] and scored.model_answer.tolist() == [own, own]
    assert scored.answer_logprob.tolist() == pytest.approx([c["answer_logprob"] for c in checked], abs=1e-6)
    assert "NOT the model's own answer" in printed.out.splitlines()[1]
