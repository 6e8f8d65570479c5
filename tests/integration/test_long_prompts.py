"""Model-backed: a prompt longer than the model's context is cut in its middle, or its question skipped."""

import pandas as pd
import pytest

from truthmap.stages import generate
from truthmap.errors import TruthmapError

pytestmark = pytest.mark.model
ROOM = 120  # the context these tests pretend the model has, less max_new_tokens


@pytest.fixture
def small_context(monkeypatch):
    from truthmap.backends.hf import LoadedModel

    monkeypatch.setattr(LoadedModel, "context_length", lambda lm: ROOM + 8)


def questions():
    long = "Here is some background. " * 60 + "What is the capital of France?"
    return pd.DataFrame({"id": ["short", "long"], "question": ["What is the capital of France?", long]})


def test_a_long_prompt_loses_its_middle_and_is_counted(default_model, small_context):
    table = generate.run_generate(default_model, questions(), max_new_tokens=8, progress=False)
    short, long = table.set_index("id").loc["short"], table.set_index("id").loc["long"]
    assert short.prompt_cut == 0 and long.prompt_cut > 0
    assert len(long.prompt_ids) == ROOM
    full = generate.encode_prompt(default_model.tokenizer, generate.task_prompts(
        default_model.tokenizer, questions().iloc[[1]])[0])
    assert long.prompt_cut == len(full) - ROOM
    # the start (the chat template's system turn) and the end (the question and the generation prompt) stay
    assert list(long.prompt_ids[:20]) == full[:20] and list(long.prompt_ids[-20:]) == full[-20:]
    assert long.prompt == default_model.tokenizer.decode(list(long.prompt_ids), skip_special_tokens=False)
    assert long.answer.strip()


def test_skip_leaves_the_long_question_out(default_model, small_context):
    table = generate.run_generate(default_model, questions(), max_new_tokens=8, progress=False, long_prompts="skip")
    assert table.id.tolist() == ["short"] and table.prompt_cut.tolist() == [0]
    with pytest.raises(TruthmapError, match="every prompt is longer than the model's room of 120 prompt tokens"):
        generate.run_generate(default_model, questions().iloc[[1]], max_new_tokens=8, progress=False,
                              long_prompts="skip")
